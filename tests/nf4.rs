//! NF4 against bitsandbytes' own output (fixtures in tests/fixtures/nf4, made by
//! tests/fixtures/make_nf4_fixtures.py): quantize bit for bit, dequantize, the pre-quantized checkpoint's logits,
//! adapter gradients on an NF4 base, and bad inputs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_peft::adapters::{inject, AdapterConfig, LoraConfig, Targets};
use candle_peft::weights::Weights;
use candle_peft::loading::{load_model, load_model_with};
use candle_peft::quant::BaseWeight;
use candle_peft::model::{Llama, LlamaConfig};
use candle_peft::quant::nf4::{self, Absmax, Nf4Tensor};
use candle_peft::quant::Quantization;
use candle_peft::training::{causal_lm_loss, TrainBatch};

/// The bitsandbytes fixtures (`tests/fixtures/nf4`, made by `tests/fixtures/make_nf4_fixtures.py`):
/// missing, they fail the test that needs them.
fn fixtures() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nf4");
    assert!(p.join("cases.json").exists(), "NF4 fixtures not found at {} (they ship in the repository)", p.display());
    p
}

fn load_all(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn cases(dir: &Path) -> Vec<(String, serde_json::Value)> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("cases.json")).unwrap()).unwrap();
    v.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[test]
fn code_tables_equal_the_fixture() {
    let dir = fixtures();
    let t = load_all(&dir.join("matrices.safetensors"));
    for (name, c) in cases(&dir) {
        assert_eq!(bits(&f32s(&t[&format!("{name}.quant_map")])), bits(&nf4::NF4_CODE), "{name}: quant_map");
        if c["double_quant"].as_bool().unwrap() {
            let fixture = f32s(&t[&format!("{name}.nested_quant_map")]);
            let ours = nf4::dynamic_map_signed();
            let diff: Vec<_> = (0..256)
                .filter(|&i| fixture[i].to_bits() != ours[i].to_bits())
                .map(|i| (i, fixture[i], ours[i]))
                .collect();
            assert!(diff.is_empty(), "{name}: nested_quant_map differs at {diff:?}");
        }
    }
}

#[test]
fn quantize_equals_bitsandbytes_bit_for_bit() {
    let dir = fixtures();
    let t = load_all(&dir.join("matrices.safetensors"));
    for (name, c) in cases(&dir) {
        let dq = c["double_quant"].as_bool().unwrap();
        let input = &t[&format!("{name}.input")];
        let q = Nf4Tensor::quantize(input, c["blocksize"].as_u64().unwrap() as usize, dq).unwrap();
        let want = u8s(&t[&format!("{name}.packed")]);
        let bad: Vec<usize> = (0..want.len()).filter(|&i| q.packed.get(i) != Some(&want[i])).collect();
        assert_eq!(q.packed.len(), want.len(), "{name}: packed length");
        let show: Vec<_> = bad.iter().take(5).map(|&i| (i, q.packed[i], want[i])).collect();
        assert!(bad.is_empty(), "{name}: {} packed bytes differ (index, ours, theirs): {show:?}", bad.len());
        match &q.absmax {
            Absmax::F32(a) => assert_eq!(bits(a), bits(&f32s(&t[&format!("{name}.absmax")])), "{name}: absmax"),
            Absmax::Double { quantized, nested_absmax, offset, nested_blocksize, .. } => {
                assert!(dq);
                assert_eq!(*nested_blocksize, c["nested_blocksize"].as_u64().unwrap() as usize);
                assert_eq!(offset.to_bits(), f32s(&t[&format!("{name}.offset")])[0].to_bits(), "{name}: offset");
                assert_eq!(
                    bits(nested_absmax),
                    bits(&f32s(&t[&format!("{name}.nested_absmax")])),
                    "{name}: nested_absmax"
                );
                assert_eq!(quantized, &u8s(&t[&format!("{name}.absmax")]), "{name}: quantized absmax");
            }
        }
    }
}

/// The fixture's quantized tensors as an `Nf4Tensor` (what a checkpoint holds).
fn from_fixture(t: &HashMap<String, Tensor>, name: &str, c: &serde_json::Value) -> Nf4Tensor {
    let shape: Vec<usize> = c["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let dtype = match c["dtype"].as_str().unwrap() {
        "float32" => DType::F32,
        "bfloat16" => DType::BF16,
        _ => DType::F16,
    };
    let absmax = if c["double_quant"].as_bool().unwrap() {
        Absmax::Double {
            quantized: u8s(&t[&format!("{name}.absmax")]),
            nested_absmax: f32s(&t[&format!("{name}.nested_absmax")]),
            nested_code: f32s(&t[&format!("{name}.nested_quant_map")]),
            offset: f32s(&t[&format!("{name}.offset")])[0],
            nested_blocksize: c["nested_blocksize"].as_u64().unwrap() as usize,
        }
    } else {
        Absmax::F32(f32s(&t[&format!("{name}.absmax")]))
    };
    Nf4Tensor {
        shape,
        dtype,
        blocksize: c["blocksize"].as_u64().unwrap() as usize,
        code: f32s(&t[&format!("{name}.quant_map")]),
        packed: u8s(&t[&format!("{name}.packed")]),
        absmax,
        device: Device::Cpu,
        on_device: Default::default(),
    }
}

#[test]
fn dequantize_equals_bitsandbytes() {
    let dir = fixtures();
    let t = load_all(&dir.join("matrices.safetensors"));
    for (name, c) in cases(&dir) {
        let q = from_fixture(&t, &name, &c);
        q.validate().unwrap();
        let want = &t[&format!("{name}.dequant")];
        assert_eq!(want.dtype(), q.dtype, "{name}");
        let got = q.dequantize(q.dtype).unwrap();
        assert_eq!(got.dims(), want.dims(), "{name}");
        let (g, w) = (f32s(&got), f32s(want));
        let bad: Vec<_> = (0..w.len()).filter(|&i| g[i].to_bits() != w[i].to_bits()).map(|i| (i, g[i], w[i])).collect();
        assert!(bad.is_empty(), "{name}: {} values differ, first {:?}", bad.len(), &bad[..bad.len().min(5)]);
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap();
    d.flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn prequantized_checkpoint_gives_the_fixture_logits() {
    let dir = fixtures();
    let l = load_all(&dir.join("logits.safetensors"));
    let ids = l["input_ids"].to_dtype(DType::U32).unwrap();
    let model = load_model(dir.join("tiny-llama-bnb-4bit").to_str().unwrap(), DType::F32, &Device::Cpu).unwrap().model;
    let nf4_layers = model
        .named_linears()
        .iter()
        .filter(|(_, lin)| matches!(lin.base().base_weight(), BaseWeight::Nf4 { .. }))
        .count();
    assert_eq!(nf4_layers, 14);
    let logits = model.forward(&ids, None, None, false).unwrap();
    let to_bnb = max_abs_diff(&logits, &l["logits_bnb_4bit"]);
    let to_bf16 = max_abs_diff(&logits, &l["logits_bf16"]);
    eprintln!("max |ours - bnb 4bit| = {to_bnb}, max |ours - bf16| = {to_bf16}");
    assert!(to_bnb < 0.1, "{to_bnb}");
    assert!(to_bf16 > 10.0 * to_bnb);
}

#[test]
fn quantize_at_load_equals_the_bnb_checkpoint() {
    let dir = fixtures();
    let ours = load_model_with(
        dir.join("tiny-llama-bf16").to_str().unwrap(),
        DType::F32,
        &Device::Cpu,
        Some(Quantization::Nf4),
    )
    .unwrap()
    .model;
    let theirs = load_model(dir.join("tiny-llama-bnb-4bit").to_str().unwrap(), DType::F32, &Device::Cpu).unwrap().model;
    assert!(ours.lm_head.is_some());
    let dense = load_model(dir.join("tiny-llama-bf16").to_str().unwrap(), DType::F32, &Device::Cpu).unwrap().model;
    let mut near_ties = 0;
    for (((name, a), (_, b)), (_, w)) in
        ours.named_linears().iter().zip(theirs.named_linears().iter()).zip(dense.named_linears().iter())
    {
        let (BaseWeight::Nf4 { weight: a, .. }, BaseWeight::Nf4 { weight: b, .. }) =
            (a.base().base_weight(), b.base().base_weight())
        else {
            panic!("{name}: not NF4")
        };
        assert_eq!(a.packed, b.packed, "{name}: packed");
        let (
            Absmax::Double { quantized: qa, offset: oa, nested_absmax: na, nested_code, .. },
            Absmax::Double { quantized: qb, offset: ob, nested_absmax: nb, .. },
        ) = (&a.absmax, &b.absmax)
        else {
            panic!("{name}: not double-quantized")
        };
        assert_eq!((oa.to_bits(), bits(na)), (ob.to_bits(), bits(nb)), "{name}: offset and nested_absmax");
        // The 8-bit absmax codes agree except in 13 of the ~2,000 blocks, where the normalised
        // value x lies within 2e-5 of the midpoint between two codes and the checkpoint holds the
        // lower one although x is (barely) nearer the upper: not explained yet (transformers'
        // load path computes x slightly differently?). bitsandbytes' quantize_4bit called directly
        // (the matrices fixture, 3,000+ blocks) agrees with ours bit for bit.
        let plain = Nf4Tensor::quantize(&w.base().weight().unwrap(), 64, false).unwrap();
        let Absmax::F32(absmax) = &plain.absmax else { unreachable!() };
        for i in 0..qa.len() {
            if qa[i] != qb[i] {
                let x = (absmax[i] - oa) * (1.0 / na[i / 256]);
                let (ours, theirs) = (nested_code[qa[i] as usize], nested_code[qb[i] as usize]);
                eprintln!("{name} block {i}: x {x}, ours {} ({ours}), bitsandbytes {} ({theirs})", qa[i], qb[i]);
                let midpoint = (ours + theirs) / 2.0;
                assert!(
                    (qa[i] as i32 - qb[i] as i32).abs() == 1
                        && (x - midpoint).abs() < 2e-5
                        && (x - theirs).abs() > (x - ours).abs(),
                    "{name} block {i}"
                );
                near_ties += 1;
            }
        }
    }
    assert!(near_ties <= 13, "{near_ties} absmax codes differ");
}

fn lora() -> AdapterConfig {
    AdapterConfig::new(LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: Targets::List(["q_proj", "v_proj", "down_proj"].iter().map(|s| s.to_string()).collect()),
        use_rslora: false,
        use_dora: false,
    })
}

fn batch() -> TrainBatch {
    let ids = Tensor::new(&[[1u32, 5, 9, 13, 2, 7, 11, 3]], &Device::Cpu).unwrap();
    let labels = Tensor::new(&[[1i64, 5, 9, 13, 2, 7, 11, 3]], &Device::Cpu).unwrap();
    TrainBatch { input_ids: ids, mask: vec![vec![1; 8]], labels }
}

/// The model with every NF4 base replaced by its dequantized dense weight.
fn dequantized_copy(config: &LlamaConfig, quantized: &Llama) -> Llama {
    let mut w = quantized.hf_weights().unwrap();
    w.retain(|_, _| true);
    Llama::load(config.clone(), &Weights::from_tensors(w, "dequantized"), DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn adapter_gradients_on_nf4_equal_those_on_the_dequantized_base() {
    let mut c = LlamaConfig::tiny(50);
    c.rope_scaling = None;
    let dense = Llama::random(c.clone(), 3, DType::F32, &Device::Cpu).unwrap();
    let weights = Weights::from_tensors(dense.hf_weights().unwrap(), "random");
    let mut q = Llama::load_with(c.clone(), &weights, DType::F32, &Device::Cpu, Some(Quantization::Nf4)).unwrap();
    let mut d = dequantized_copy(&c, &q);
    for use_dora in [false, true] {
        let mut cfg = lora();
        cfg.downcast_mut::<LoraConfig>().unwrap().use_dora = use_dora;
        inject(&mut q, &cfg, 1).unwrap();
        inject(&mut d, &cfg, 1).unwrap();
        // give B nonzero values (identical in both) so every gradient is nonzero
        for ((_, vq), (_, vd)) in q.trainable_params().iter().zip(d.trainable_params().iter()) {
            let r = Tensor::randn(0f32, 0.1, vq.shape(), &Device::Cpu).unwrap();
            vq.set(&r).unwrap();
            vd.set(&r).unwrap();
        }
        let b = batch();
        let (lq, ld) = (causal_lm_loss(&q, &b, true).unwrap(), causal_lm_loss(&d, &b, true).unwrap());
        assert!(max_abs_diff(&lq, &ld) < 1e-5);
        let (gq, gd) = (lq.backward().unwrap(), ld.backward().unwrap());
        for ((name, vq), (_, vd)) in q.trainable_params().iter().zip(d.trainable_params().iter()) {
            let (a, b) = (gq.get(vq.as_tensor()).unwrap(), gd.get(vd.as_tensor()).unwrap());
            let scale = f32s(b).iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{name}: zero gradient");
            assert!(max_abs_diff(a, b) <= 1e-4 * scale, "dora={use_dora} {name}: {}", max_abs_diff(a, b));
        }
        // merging on NF4 writes the dequantized base plus the update
        let x = Tensor::randn(0f32, 1.0, (2, c.hidden_size), &Device::Cpu).unwrap();
        let (name, lin) = q.named_linears_mut().into_iter().find(|(n, _)| n.ends_with("q_proj")).unwrap();
        let before = lin.forward(&x, false).unwrap();
        lin.merge().unwrap();
        assert!(matches!(lin.base().base_weight(), BaseWeight::Dense(_)), "{name}");
        assert!(max_abs_diff(&lin.forward(&x, false).unwrap(), &before) < 1e-4);
        // fresh models for the next round
        q = Llama::load_with(c.clone(), &weights, DType::F32, &Device::Cpu, Some(Quantization::Nf4)).unwrap();
        d = dequantized_copy(&c, &q);
    }
}

#[test]
fn nf4_forward_and_dx_equal_the_dense_reference() {
    let w = Tensor::randn(0f32, 0.05, (24, 40), &Device::Cpu).unwrap();
    let q = Nf4Tensor::quantize(&w, 64, true).unwrap();
    let deq = q.dequantize(DType::F32).unwrap();
    let lin = candle_peft::model::linear::FrozenLinear::nf4(q, DType::F32);
    let x = candle_core::Var::randn(0f32, 1.0, (3, 5, 40), &Device::Cpu).unwrap();
    let y = lin.forward(x.as_tensor()).unwrap();
    let dy = Tensor::randn(0f32, 1.0, (3, 5, 24), &Device::Cpu).unwrap();
    let grads = (&y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = grads.get(x.as_tensor()).unwrap();
    let want_y = x.as_tensor().broadcast_matmul(&deq.t().unwrap()).unwrap();
    let want_dx = dy.broadcast_matmul(&deq).unwrap();
    assert!(max_abs_diff(&y, &want_y) < 1e-5);
    assert!(max_abs_diff(dx, &want_dx) < 1e-5);
}

/// The fixture checkpoint's tensors in memory, for breaking one.
fn checkpoint_tensors(dir: &Path) -> HashMap<String, Tensor> {
    load_all(&dir.join("tiny-llama-bnb-4bit/model.safetensors"))
}

fn config(dir: &Path) -> LlamaConfig {
    LlamaConfig::from_file(&dir.join("tiny-llama-bnb-4bit/config.json")).unwrap()
}

const Q: &str = "model.layers.1.self_attn.q_proj.weight";

fn load_err(dir: &Path, t: HashMap<String, Tensor>) -> String {
    match Llama::load(config(dir), &Weights::from_tensors(t, "broken"), DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loaded a broken checkpoint"),
        Err(e) => e.to_string(),
    }
}

fn with_state(t: &mut HashMap<String, Tensor>, key: &str, edit: impl Fn(&mut serde_json::Value)) {
    let k = format!("{Q}.{}", nf4::QUANT_STATE_NF4);
    let mut v: serde_json::Value = serde_json::from_slice(&u8s(&t[&k])).unwrap();
    edit(&mut v);
    let bytes = serde_json::to_vec(&v).unwrap();
    t.remove(&k);
    let n = bytes.len();
    t.insert(format!("{Q}.{key}"), Tensor::from_vec(bytes, n, &Device::Cpu).unwrap());
}

#[test]
fn bad_checkpoints_are_refused_naming_the_tensor() {
    let dir = fixtures();
    // a quant state naming fp4 (under either key)
    let mut t = checkpoint_tensors(&dir);
    with_state(&mut t, nf4::QUANT_STATE_NF4, |v| v["quant_type"] = "fp4".into());
    let e = load_err(&dir, t);
    assert!(e.contains(Q) && e.contains("fp4"), "{e}");
    let mut t = checkpoint_tensors(&dir);
    with_state(&mut t, nf4::QUANT_STATE_FP4, |v| v["quant_type"] = "fp4".into());
    let e = load_err(&dir, t);
    assert!(e.contains(Q) && e.contains("fp4"), "{e}");
    // a block size the format does not have
    let mut t = checkpoint_tensors(&dir);
    with_state(&mut t, nf4::QUANT_STATE_NF4, |v| v["blocksize"] = 48.into());
    let e = load_err(&dir, t);
    assert!(e.contains(Q) && e.contains("block size 48"), "{e}");
    // a packed buffer of the wrong length
    let mut t = checkpoint_tensors(&dir);
    let short = t[Q].narrow(0, 0, 100).unwrap();
    t.insert(Q.to_string(), short);
    let e = load_err(&dir, t);
    assert!(e.contains(Q) && e.contains("100 bytes"), "{e}");
    // quantize refuses a block size too
    let w = Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap();
    assert!(Nf4Tensor::quantize(&w, 100, true).unwrap_err().to_string().contains("block size 100"));
}

#[test]
fn storage_of_7b_linears() {
    // LLaMA-2-7B: 32 layers of q,k,v,o [4096,4096] and gate,up [11008,4096], down [4096,11008]
    let (h, im, layers) = (4096usize, 11008usize, 32usize);
    let per_layer = [h * h, h * h, h * h, h * h, im * h, im * h, h * im];
    let packed: usize = per_layer.iter().map(|&n| n.div_ceil(2)).sum::<usize>() * layers;
    let total: usize = per_layer.iter().map(|&n| Nf4Tensor::storage_bytes_for(n, 64, true)).sum::<usize>() * layers;
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    // the rest stays bf16: embeddings and head [32000, 4096] each, 65 norms of 4096
    let rest = 2 * (2 * 32000 * h + (2 * layers + 1) * h);
    let n: usize = per_layer.iter().sum::<usize>() * layers;
    eprintln!(
        "7B linears: {n} weights, packed {:.3} GiB, with scales {:.3} GiB (bf16: {:.3} GiB); whole model with bf16 embeddings, head, norms: {:.3} GiB",
        gib(packed),
        gib(total),
        gib(2 * n),
        gib(total + rest)
    );
    // the formula agrees with a real quantized matrix
    let w = Tensor::randn(0f32, 1.0, (96, 300), &Device::Cpu).unwrap();
    assert_eq!(
        Nf4Tensor::quantize(&w, 64, true).unwrap().storage_bytes(),
        Nf4Tensor::storage_bytes_for(96 * 300, 64, true)
    );
}

#[test]
fn merge_on_the_bnb_checkpoint_writes_a_dequantized_model() {
    let dir = fixtures();
    let l = load_all(&dir.join("logits.safetensors"));
    let ids = l["input_ids"].to_dtype(DType::U32).unwrap();
    let mut loaded = load_model(dir.join("tiny-llama-bnb-4bit").to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    inject(&mut loaded.model, &lora(), 1).unwrap();
    for (_, v) in loaded.model.trainable_params() {
        v.set(&Tensor::randn(0f32, 0.1, v.shape(), &Device::Cpu).unwrap()).unwrap();
    }
    let adapted = loaded.model.forward(&ids, None, None, false).unwrap();
    for (_, lin) in loaded.model.named_linears_mut() {
        lin.merge().unwrap();
    }
    let out = tempfile::tempdir().unwrap().keep().join("merged");
    candle_peft::cli::commands::write_hf_dir(&loaded, &out).unwrap();
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert!(config.get("quantization_config").is_none());
    let merged = load_model(out.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap().model;
    assert!(merged.named_linears().iter().all(|(_, lin)| matches!(lin.base().base_weight(), BaseWeight::Dense(_))));
    let d = max_abs_diff(&merged.forward(&ids, None, None, false).unwrap(), &adapted);
    assert!(d < 1e-4, "{d}");
    let _ = std::fs::remove_dir_all(out.parent().unwrap());
}

#[test]
fn a_quantization_config_other_than_bnb_nf4_is_refused() {
    let dir = fixtures();
    let src = dir.join("tiny-llama-bnb-4bit");
    for (key, value, needle) in [
        ("bnb_4bit_quant_type", serde_json::json!("fp4"), "fp4"),
        ("load_in_8bit", serde_json::json!(true), "8-bit"),
        ("quant_method", serde_json::json!("gptq"), "gptq"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
        config["quantization_config"][key] = value;
        std::fs::write(tmp.path().join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
        for f in ["model.safetensors", "tokenizer.json"] {
            std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
        }
        let e = match load_model(tmp.path().to_str().unwrap(), DType::F32, &Device::Cpu) {
            Ok(_) => panic!("{key}: loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("config.json") && e.contains(needle), "{e}");
    }
}

#[derive(clap::Parser)]
struct MethodCli {
    #[command(flatten)]
    adapter: candle_peft::cli::AdapterArgs,
}

/// Every method trains on an NF4 base exactly as on its dequantized dense copy.
#[test]
fn every_method_on_an_nf4_base_equals_the_dequantized_base() {
    use candle_peft::training::configure_trainer;
    use candle_peft::training::{AdamWConfig, StepConfig, Trainer};
    use clap::Parser;
    let mut c = LlamaConfig::tiny(50);
    c.rope_scaling = None;
    let dense = Llama::random(c.clone(), 3, DType::F32, &Device::Cpu).unwrap();
    let weights = Weights::from_tensors(dense.hf_weights().unwrap(), "random");
    let b = batch();
    let config = |method: &str| MethodCli::parse_from(["x", "--method", method]).adapter.to_config().unwrap();
    // Every method that attaches to LLaMA (SynQT is a ViT's).
    for method in candle_peft::adapters::registry::METHODS.iter().map(|m| m.name).filter(|m| config(m).trains_llama()) {
        let mut losses = Vec::new();
        for quantized in [true, false] {
            let q = Llama::load_with(c.clone(), &weights, DType::F32, &Device::Cpu, Some(Quantization::Nf4)).unwrap();
            let model = if quantized { q } else { dequantized_copy(&c, &q) };
            let mut model = model;
            let mut adapter = MethodCli::parse_from(["x", "--method", method]).adapter.to_config().unwrap();
            inject(&mut model, &adapter, 0).unwrap();
            if adapter.init_batches() > 0 {
                adapter.initialize_from_data(&mut model, std::slice::from_ref(&b), 0).unwrap();
            }
            let steps = StepConfig {
                optim: AdamWConfig { lr: 1e-2, ..Default::default() },
                warmup_steps: 0,
                total_steps: 3,
                max_grad_norm: Some(1.0),
                gradient_checkpointing: false,
            };
            let mut trainer = Trainer::new(&model, steps, |_| 1.0).unwrap();
            configure_trainer(&mut trainer, &model, &adapter).unwrap();
            let l: Vec<f64> = (0..3).map(|_| trainer.step(&model, std::slice::from_ref(&b)).unwrap().loss).collect();
            losses.push(l);
        }
        eprintln!("{method}: nf4 {:?} dequantized {:?}", losses[0], losses[1]);
        for (a, d) in losses[0].iter().zip(&losses[1]) {
            assert!(
                a.is_finite() && (a - d).abs() < 1e-4 * d.abs().max(1.0),
                "{method}: {:?} vs {:?}",
                losses[0],
                losses[1]
            );
        }
        assert!(losses[0][2] < losses[0][0], "{method}: loss does not fall {:?}", losses[0]);
    }
}

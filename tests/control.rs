//! Parallel Control, Double Control, Control + LoRA and the nonlinear Control: each forward
//! against its formula, zero change at init, gradients against finite differences, save/load,
//! cached generation, and loss falling when overfitting.

mod common;

use common::{central_difference, max_diff};
use candle_core::{DType, Device, Tensor, Var};
use candle_peft::adapters::{
    inject, load_adapter, save_adapter, AdapterConfig, ControlConfig, LoraConfig, NonlinearControl, NonlinearControlConfig,
    ParallelControl, Targets,
};
use candle_peft::hub::ModelSource;
use candle_peft::weights::Weights;
use candle_peft::model::llama::random_weights;
use candle_peft::ops::nn as ops;
use candle_peft::model::{BlockControl, ControlContext, KvCache, Llama, LlamaConfig};
use candle_peft::training::{causal_lm_loss, AdamWConfig, StepConfig, TrainBatch, Trainer};
use rand::{rngs::StdRng, Rng, SeedableRng};

const CPU: Device = Device::Cpu;

fn tiny() -> Llama {
    Llama::random(LlamaConfig::tiny(50), 7, DType::F32, &CPU).unwrap()
}

fn control(rank: usize, double: Option<usize>, lora: bool) -> AdapterConfig {
    AdapterConfig::new(ControlConfig {
        control_rank: rank,
        control_alpha: 0.5,
        control_dropout: 0.0,
        double_control: double.is_some(),
        double_control_rank: double.unwrap_or(64),
        lora: lora.then(|| LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: Targets::List(vec!["q_proj".into(), "k_proj".into(), "v_proj".into()]),
            use_rslora: false,
            use_dora: false,
        }),
    })
}

fn nonlinear(rank: usize, stable_mode: bool) -> AdapterConfig {
    AdapterConfig::new(NonlinearControlConfig { control_rank: rank, stable_mode })
}

/// Every method, small ranks: Parallel, Double, Control + LoRA, nonlinear, nonlinear stable.
fn methods() -> Vec<(&'static str, AdapterConfig)> {
    vec![
        ("parallel", control(4, None, false)),
        ("double", control(4, Some(3), false)),
        ("control+lora", control(4, None, true)),
        ("nonlinear", nonlinear(4, false)),
        ("nonlinear stable", nonlinear(4, true)),
    ]
}

fn randomize(model: &Llama, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (_, v) in model.trainable_params() {
        let data: Vec<f32> = (0..v.elem_count()).map(|_| rng.random_range(-0.2..0.2)).collect();
        v.set(&Tensor::from_vec(data, v.shape(), &CPU).unwrap()).unwrap();
    }
}

fn set(v: &Var, data: &[f32]) {
    v.set(&Tensor::from_vec(data.to_vec(), v.shape(), &CPU).unwrap()).unwrap();
}

/// A left-padded row (pad queries attend to themselves only) and a full row.
fn batch() -> TrainBatch {
    let ids = Tensor::new(&[[0u32, 0, 5, 9, 13, 2, 7, 11], [3, 4, 5, 6, 7, 8, 9, 10]], &CPU).unwrap();
    let mask = vec![vec![0, 0, 1, 1, 1, 1, 1, 1], vec![1; 8]];
    let labels = Tensor::new(&[[-100i64, -100, 5, 9, 13, 2, 7, 11], [3, 4, 5, 6, 7, 8, 9, 10]], &CPU).unwrap();
    TrainBatch { input_ids: ids, mask, labels }
}

fn logits(model: &Llama) -> Tensor {
    let b = batch();
    model.forward(&b.input_ids, Some(&b.mask), None, false).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.squeeze(0).unwrap().to_vec2::<f32>().unwrap()
}

fn assert_close(got: &[Vec<f32>], want: &[[f32; 2]]) {
    for (g, w) in got.iter().zip(want) {
        for (a, b) in g.iter().zip(w) {
            assert!((a - b).abs() < 1e-5, "got {got:?}, want {want:?}");
        }
    }
}

#[test]
fn parallel_control_by_hand() {
    // d = 2, r = 1, α = 0.5: A = [1 2], B = [3 -1]ᵀ, x = [1 1] → A x = 3 → α B (3) = [4.5 -1.5].
    let c = ParallelControl::new(2, 1, 0.5, 0.0, &mut StdRng::seed_from_u64(0), &CPU).unwrap();
    set(&c.a, &[1.0, 2.0]);
    set(&c.b, &[3.0, -1.0]);
    let x = Tensor::new(&[[[1f32, 1.0]]], &CPU).unwrap();
    let bias = Tensor::zeros((1, 1, 1, 1), DType::F32, &CPU).unwrap();
    let out = c.forward(&x, &ControlContext { bias: &bias, past_input: None }, false).unwrap();
    assert_close(&rows(&out), &[[4.5, -1.5]]);
}

#[test]
fn nonlinear_control_by_hand_is_causal_and_masks_padding() {
    // d = 2, r = 1: down = [1 0] (+0), up = [1 0]ᵀ + [0 1], so U = [s₀, 1].
    // s = ([1 0], [2 0]) → U₀ = [1 1], U₁ = [2 1]. Causal: C₀ = U₀ + U₀ = [2 2];
    // C₁ = softmax(U₁·U₀, U₁·U₁) = softmax(3, 5) mixes (U₀, U₁), plus U₁:
    // w₀ = 1/(1+e²) = 0.1192029, so C₁ = [2 - w₀ + 2, 1 + 1] = [3.8807971, 2].
    let c = NonlinearControl::new(2, 1, None, &mut StdRng::seed_from_u64(0), &CPU).unwrap();
    set(&c.down_w, &[1.0, 0.0]);
    set(&c.up_w, &[1.0, 0.0]);
    set(&c.up_b, &[0.0, 1.0]);
    let x = Tensor::new(&[[[1f32, 0.0], [2.0, 0.0]]], &CPU).unwrap();
    let run = |mask: Vec<u32>| {
        let bias = ops::attention_bias(&[mask], 2, DType::F32, &CPU).unwrap();
        rows(&c.forward(&x, &ControlContext { bias: &bias, past_input: None }, true).unwrap())
    };
    assert_close(&run(vec![1, 1]), &[[2.0, 2.0], [3.880797, 2.0]]);
    // Token 0 is padding: it sees itself only, and token 1 no longer sees it: C₁ = 2 U₁.
    assert_close(&run(vec![0, 1]), &[[2.0, 2.0], [4.0, 2.0]]);
}

/// Training takes the flash-style attention op in rank space; the seed computes
/// `softmax(U Uᵀ) U + U` with U in model space. Values and all four gradients must agree.
#[test]
fn nonlinear_control_training_path_equals_the_seeds_direct_form() {
    let (b, t, d, r) = (2, 7, 12, 5);
    let mut rng = StdRng::seed_from_u64(11);
    let c = NonlinearControl::new(d, r, None, &mut rng, &CPU).unwrap();
    let mut random = |v: &Var| set(v, &(0..v.elem_count()).map(|_| rng.random_range(-0.5f32..0.5)).collect::<Vec<_>>());
    for v in [&c.down_w, &c.down_b, &c.up_w, &c.up_b] {
        random(v);
    }
    let x = Tensor::randn(0f32, 1.0, (b, t, d), &CPU).unwrap();
    let weight = Tensor::randn(0f32, 1.0, (b, t, d), &CPU).unwrap();
    let bias = ops::attention_bias(&[vec![0, 0, 1, 1, 1, 1, 1], vec![1; t]], t, DType::F32, &CPU).unwrap();

    let fused = c.forward(&x, &ControlContext { bias: &bias, past_input: None }, true).unwrap();
    let linear = |x: &Tensor, w: &Var, b: &Var| x.broadcast_matmul(&w.as_tensor().t().unwrap()).unwrap().broadcast_add(b.as_tensor()).unwrap();
    let u = linear(&linear(&x, &c.down_w, &c.down_b), &c.up_w, &c.up_b);
    let scores = u.matmul(&u.t().unwrap()).unwrap();
    let scores = (scores + (bias.squeeze(1).unwrap().lt(0f64).unwrap().to_dtype(DType::F32).unwrap() * -1e30).unwrap()).unwrap();
    let e = scores.broadcast_sub(&scores.max_keepdim(2).unwrap()).unwrap().exp().unwrap();
    let p = e.broadcast_div(&e.sum_keepdim(2).unwrap()).unwrap();
    let direct = (p.matmul(&u).unwrap() + &u).unwrap();

    let scale = direct.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let diff = (&fused - &direct).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff <= 1e-5 * scale, "values differ by {diff} (scale {scale})");
    let gf = (&fused * &weight).unwrap().sum_all().unwrap().backward().unwrap();
    let gd = (&direct * &weight).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in c.params() {
        let (a, e) = (gf.get(v.as_tensor()).unwrap(), gd.get(v.as_tensor()).unwrap());
        let scale = e.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = (a - e).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(scale > 0.0 && diff <= 1e-4 * scale, "{name}: gradients differ by {diff} (scale {scale})");
    }
}

/// A one-layer model whose attention and MLP output nothing (o_proj, down_proj zero), so the
/// layer computes h + controls only, and a post-attention norm that is not all ones.
fn bare_layer_model() -> Llama {
    let mut c = LlamaConfig::tiny(50);
    c.num_hidden_layers = 1;
    let mut w = random_weights(&c, 0.125, 3).unwrap();
    for name in ["model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"] {
        w.insert(name.into(), w[name].zeros_like().unwrap());
    }
    let norm: Vec<f32> = (0..c.hidden_size).map(|i| 0.5 + i as f32 / c.hidden_size as f32).collect();
    w.insert("model.layers.0.post_attention_layernorm.weight".into(), Tensor::new(norm, &CPU).unwrap());
    Llama::load(c, &Weights::from_tensors(w, "test"), DType::F32, &CPU).unwrap()
}

fn var(model: &Llama, suffix: &str) -> Tensor {
    let p = model.trainable_params().into_iter().find(|(k, _)| k.ends_with(suffix)).unwrap();
    p.1.as_tensor().clone()
}

/// `x Wᵀ` for x [t, d].
fn lin(x: &Tensor, w: &Tensor) -> Tensor {
    x.matmul(&w.t().unwrap()).unwrap()
}

#[test]
fn double_control_sits_across_both_blocks() {
    let mut model = bare_layer_model();
    inject(&mut model, &control(4, Some(3), false), 1).unwrap();
    randomize(&model, 2);
    let ids = Tensor::new(&[[3u32, 14, 15, 9, 2]], &CPU).unwrap();
    let hidden = model.forward_hidden(&ids, None, None, false).unwrap().squeeze(0).unwrap();
    let h = model.embed_tokens.index_select(&ids.squeeze(0).unwrap(), 0).unwrap();
    let ctl = |x: &Tensor, block: &str| {
        let z = lin(x, &var(&model, &format!("{block}.lora_A.weight")));
        (lin(&z, &var(&model, &format!("{block}.lora_B.weight"))) * 0.5).unwrap()
    };
    let h2 = (&h + ctl(&h, "attn_control")).unwrap();
    let out = (&h2 + ctl(&h2, "mlp_control")).unwrap();
    let want = ops::rms_norm(&out, &model.norm, 1e-6, true).unwrap();
    assert!(max_diff(&hidden, &want) < 1e-5, "{}", max_diff(&hidden, &want));
}

#[test]
fn nonlinear_control_sits_across_the_mlp_block_in_stable_mode() {
    let mut model = bare_layer_model();
    inject(&mut model, &nonlinear(4, true), 1).unwrap();
    randomize(&model, 2);
    let ids = Tensor::new(&[[3u32, 14, 15, 9, 2]], &CPU).unwrap();
    let hidden = model.forward_hidden(&ids, None, None, false).unwrap().squeeze(0).unwrap();
    let h = model.embed_tokens.index_select(&ids.squeeze(0).unwrap(), 0).unwrap();
    let s = ops::rms_norm(&h, &model.layers[0].post_attention_layernorm, 1e-6, true).unwrap();
    let d = lin(&s, &var(&model, "down_proj.weight")).broadcast_add(&var(&model, "down_proj.bias")).unwrap();
    let u = lin(&d, &var(&model, "up_proj.weight")).broadcast_add(&var(&model, "up_proj.bias")).unwrap();
    // Causal softmax row by row: token i mixes tokens 0..=i.
    let mut c = Vec::new();
    for i in 0..5 {
        let seen = u.narrow(0, 0, i + 1).unwrap();
        let ui = u.narrow(0, i, 1).unwrap();
        let p = candle_nn::ops::softmax_last_dim(&ui.matmul(&seen.t().unwrap()).unwrap()).unwrap();
        c.push((p.matmul(&seen).unwrap() + ui).unwrap());
    }
    let out = (&h + Tensor::cat(&c, 0).unwrap()).unwrap();
    let want = ops::rms_norm(&out, &model.norm, 1e-6, true).unwrap();
    assert!(max_diff(&hidden, &want) < 1e-5, "{}", max_diff(&hidden, &want));
}

#[test]
fn controls_change_nothing_at_init() {
    let base = logits(&tiny());
    for (name, cfg) in methods() {
        let mut model = tiny();
        inject(&mut model, &cfg, 1).unwrap();
        assert_eq!(max_diff(&logits(&model), &base), 0.0, "{name}");
    }
}

#[test]
fn gradients_equal_finite_differences() {
    let b = batch();
    for (method, cfg) in methods() {
        let mut model = tiny();
        inject(&mut model, &cfg, 1).unwrap();
        randomize(&model, 2);
        let grads = causal_lm_loss(&model, &b, true).unwrap().backward().unwrap();
        for (name, var) in model.trainable_params() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{method}: no gradient for {name}"));
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (idx, &analytic) = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap();
            let numeric = central_difference(&model, &var, idx, 1e-2, &b);
            let tol = 2e-2 * analytic.abs().max(1e-2) as f64;
            assert!((numeric - analytic as f64).abs() < tol, "{method} {name}[{idx}]: analytic {analytic}, numeric {numeric}");
        }
    }
}

#[test]
fn save_then_load_reproduces_logits() {
    for (name, cfg) in methods() {
        let mut model = tiny();
        inject(&mut model, &cfg, 1).unwrap();
        randomize(&model, 4);
        let want = logits(&model);
        let dir = tempfile::tempdir().unwrap();
        save_adapter(&model, &cfg, &dir.path().join("adapter"), None).unwrap();
        let mut fresh = tiny();
        let source = ModelSource::parse(dir.path().join("adapter").to_str().unwrap()).unwrap();
        assert_eq!(load_adapter(&mut fresh, &source).unwrap(), cfg, "{name}");
        assert_eq!(max_diff(&want, &logits(&fresh)), 0.0, "{name}");
    }
}

#[test]
fn adapter_files_name_layers_and_blocks() {
    let mut model = tiny();
    inject(&mut model, &control(4, Some(3), true), 1).unwrap();
    let mut keys: Vec<String> = model.trainable_params().into_iter().map(|(k, _)| k).collect();
    keys.sort();
    assert_eq!(keys.len(), 2 * (2 + 2 + 3 * 2));
    assert!(keys.contains(&"base_model.model.model.layers.1.attn_control.lora_A.weight".to_string()));
    assert!(keys.contains(&"base_model.model.model.layers.0.mlp_control.lora_B.weight".to_string()));
    assert!(keys.contains(&"base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight".to_string()));
    let json = control(4, Some(3), true);
    let v = json_of(&json);
    assert_eq!(v["peft_type"], "CONTROL");
    assert_eq!(v["lora"]["r"], 4);
    assert_eq!(json_of(&nonlinear(8, true))["peft_type"], "NONLINEAR_CONTROL");
}

fn json_of(cfg: &AdapterConfig) -> serde_json::Value {
    cfg.to_peft_json(None)
}

#[test]
fn cached_generation_equals_the_full_forward() {
    for (name, cfg) in methods() {
        let mut model = tiny();
        inject(&mut model, &cfg, 1).unwrap();
        randomize(&model, 5);
        let b = batch();
        let full = model.forward(&b.input_ids, Some(&b.mask), None, false).unwrap();
        let mut cache = KvCache::new();
        let prefix: Vec<Vec<u32>> = b.mask.iter().map(|m| m[..5].to_vec()).collect();
        let mut parts = vec![model.forward(&b.input_ids.narrow(1, 0, 5).unwrap(), Some(&prefix), Some(&mut cache), false).unwrap()];
        for i in 5..8 {
            let ids = b.input_ids.narrow(1, i, 1).unwrap();
            parts.push(model.forward(&ids, Some(&[vec![1], vec![1]]), Some(&mut cache), false).unwrap());
        }
        let stepped = Tensor::cat(&parts, 1).unwrap();
        // Padding positions are undefined; compare the real tokens.
        let real = |t: &Tensor| Tensor::cat(&[t.narrow(0, 0, 1).unwrap().narrow(1, 2, 6).unwrap(), t.narrow(0, 1, 1).unwrap()], 1).unwrap();
        assert!(max_diff(&real(&full), &real(&stepped)) < 1e-4, "{name}: {}", max_diff(&real(&full), &real(&stepped)));
    }
}

#[test]
fn loss_falls_when_overfitting_a_tiny_batch() {
    let b = batch();
    for (name, cfg) in methods() {
        let mut model = tiny();
        inject(&mut model, &cfg, 1).unwrap();
        let step = StepConfig {
            optim: AdamWConfig { lr: 1e-2, ..Default::default() },
            warmup_steps: 0,
            total_steps: 40,
            max_grad_norm: Some(1.0),
            gradient_checkpointing: false,
        };
        let mut trainer = Trainer::new(&model, step, |_| 1.0).unwrap();
        let first = trainer.step(&model, std::slice::from_ref(&b)).unwrap().loss;
        let mut last = first;
        for _ in 1..40 {
            last = trainer.step(&model, std::slice::from_ref(&b)).unwrap().loss;
        }
        assert!(last < 0.5 * first, "{name}: loss {first} -> {last}");
    }
}

#[test]
fn gradients_flow_to_every_control_tensor_in_bf16() {
    for (name, cfg) in methods() {
        let mut model = Llama::random(LlamaConfig::tiny(50), 7, DType::BF16, &CPU).unwrap();
        inject(&mut model, &cfg, 1).unwrap();
        randomize(&model, 3);
        let loss = causal_lm_loss(&model, &batch(), true).unwrap();
        let grads = loss.backward().unwrap();
        for (key, var) in model.trainable_params() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {key}"));
            let g = g.to_dtype(DType::F32).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(g.is_finite() && g > 0.0, "{name} {key}: gradient magnitude {g}");
        }
    }
}

//! `Llama::mixed`: rows of the base, LoRA, DoRA, Parallel + Double Control and IA3 adapters in
//! one batch give each row what its own model gives it alone; a batch of one model's rows takes
//! that model's own path bit for bit.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_peft::adapters::{inject, AdapterConfig, ControlConfig, Ia3Config, LoraConfig, Targets};
use candle_peft::model::Llama;

fn lora(targets: &[&str], dora: bool) -> AdapterConfig {
    AdapterConfig::new(LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: Targets::List(targets.iter().map(|s| s.to_string()).collect()),
        use_rslora: false,
        use_dora: dora,
    })
}

fn control() -> AdapterConfig {
    AdapterConfig::new(ControlConfig { control_rank: 4, control_alpha: 0.5, control_dropout: 0.0, double_control: true, double_control_rank: 4, lora: None })
}

/// The base's weights with `cfg` attached, its trainable tensors random (not the identity init).
fn adapted(base: &Llama, cfg: &AdapterConfig, seed: u64) -> Llama {
    let mut m = base.share_base();
    inject(&mut m, cfg, seed).unwrap();
    for (_, var) in m.trainable_params() {
        let noise = Tensor::randn(0f32, 0.2, var.shape(), &Device::Cpu).unwrap();
        var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
    }
    m
}

fn logits(m: &Llama, ids: &Tensor) -> Vec<Vec<Vec<f32>>> {
    m.forward(ids, None, None, false).unwrap().to_vec3().unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter().flatten().zip(b.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max)
}

/// Row r of the mixed batch's logits `got` against model `assignment[r]`'s own, `alone[m]`.
fn each_row_matches_its_model(got: &[Vec<Vec<f32>>], alone: &[Vec<Vec<Vec<f32>>>], assignment: &[usize]) {
    for (r, &m) in assignment.iter().enumerate() {
        let diff = max_diff(&got[r], &alone[m][r]);
        assert!(diff < 1e-4, "row {r} of model {m}: max |diff| {diff}");
    }
}

#[test]
fn each_row_of_a_mixed_batch_gets_its_own_models_logits() {
    let base = common::tiny(DType::F32);
    let ia3 = AdapterConfig::new(Ia3Config { target_modules: Targets::List(vec!["k_proj".into(), "down_proj".into()]), feedforward_modules: Some(Targets::List(vec!["down_proj".into()])) });
    let models = vec![
        base.share_base(),
        adapted(&base, &lora(&["q_proj", "v_proj", "down_proj"], false), 1),
        adapted(&base, &lora(&["k_proj", "up_proj"], true), 2),
        adapted(&base, &control(), 3),
        adapted(&base, &ia3, 4),
        adapted(&base, &lora(&["o_proj", "gate_proj"], false), 5),
    ];
    let ids = Tensor::new(&[[3u32, 8, 1, 9, 4], [7, 7, 2, 5, 11], [1, 2, 3, 4, 5], [9, 8, 7, 6, 5], [4, 4, 4, 2, 1], [6, 1, 3, 3, 8], [2, 9, 9, 1, 4]], &Device::Cpu).unwrap();
    let assignment = vec![1, 0, 2, 3, 1, 4, 5];
    let alone: Vec<Vec<Vec<Vec<f32>>>> = models.iter().map(|m| logits(m, &ids)).collect();
    let (mixed, rows) = Llama::mixed(models).unwrap();

    rows.set(assignment.clone());
    each_row_matches_its_model(&logits(&mixed, &ids), &alone, &assignment);
    // Model 1's rows alone differ from the base's: the test sees the adapters.
    let moved = max_diff(&alone[1][0], &alone[0][0]);
    assert!(moved > 1e-3, "{moved}");

    // Every row one model's: its own path, the same bits.
    for (m, want) in alone.iter().enumerate() {
        rows.set(vec![m; 7]);
        assert_eq!(&logits(&mixed, &ids), want, "model {m}");
    }
    // An assignment of the wrong length is an error, not a wrong answer.
    rows.set(vec![0; 3]);
    let err = mixed.forward(&ids, None, None, false).unwrap_err().to_string();
    assert!(err.contains("7 rows") && err.contains("3 rows"), "{err}");
}

#[test]
fn adapters_load_and_unload_in_a_running_mixed_model() {
    let base = common::tiny(DType::F32);
    let ids = Tensor::new(&[[3u32, 8, 1, 9, 4], [7, 7, 2, 5, 11], [1, 2, 3, 4, 5]], &Device::Cpu).unwrap();
    let (one, two) = (adapted(&base, &lora(&["q_proj", "down_proj"], false), 1), adapted(&base, &control(), 2));
    let (want_base, want_one, want_two) = (logits(&base, &ids), logits(&one, &ids), logits(&two, &ids));
    let (mut mixed, rows) = Llama::mixed(vec![base.share_base(), one]).unwrap();
    rows.set(vec![1, 0, 1]);
    let got = logits(&mixed, &ids);
    assert_eq!((&got[0], &got[1], &got[2]), (&want_one[0], &want_base[1], &want_one[2]));
    // A model at a new index, with a control (no layer had one): rows 0 and 2 take it.
    mixed.set_mixed_model(&rows, 2, Some(two)).unwrap();
    rows.set(vec![2, 1, 2]);
    let got = logits(&mixed, &ids);
    let close = |a: &[Vec<f32>], b: &[Vec<f32>]| a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) < 1e-4;
    assert!(close(&got[0], &want_two[0]) && close(&got[1], &want_one[1]) && close(&got[2], &want_two[2]));
    // Unloaded, model 1's rows are the base's.
    mixed.set_mixed_model(&rows, 1, None).unwrap();
    rows.set(vec![1, 1, 1]);
    assert_eq!(logits(&mixed, &ids), want_base);
    assert!(mixed.set_mixed_model(&rows, 0, None).unwrap_err().to_string().contains("model 0 is the base"));
}

/// A packed base (interleaved Q8_0 blocks, as a GGUF decodes on the CPU): a mixed batch of the
/// base's and LoRA adapters' rows takes q, k, v (and gate, up) in one product with each row's
/// low-rank term added after (`packed_siblings`), and still gives each row its own model's logits.
#[test]
fn a_packed_base_shares_its_sibling_products_across_the_rows_of_a_mixed_batch() {
    let config = candle_peft::model::LlamaConfig { intermediate_size: 192, ..candle_peft::model::LlamaConfig::tiny(50) };
    let base = candle_peft::loading::random_packed(config, candle_peft::quant::ggml::BlockType::Q8_0, 3).unwrap();
    let models = vec![
        base.share_base(),
        adapted(&base, &lora(&["q_proj", "v_proj", "down_proj"], false), 1),
        adapted(&base, &lora(&["k_proj", "gate_proj", "up_proj"], false), 2),
    ];
    let ids = Tensor::new(&[[3u32, 8, 1], [7, 7, 2], [1, 2, 3], [9, 8, 7]], &Device::Cpu).unwrap();
    let assignment = vec![1, 0, 2, 1];
    let alone: Vec<Vec<Vec<Vec<f32>>>> = models.iter().map(|m| logits(m, &ids)).collect();
    let moved = max_diff(&alone[2][0], &alone[0][0]);
    assert!(moved > 1e-3, "the adapters change the logits: {moved}");
    let (mixed, rows) = Llama::mixed(models).unwrap();
    rows.set(assignment.clone());
    each_row_matches_its_model(&logits(&mixed, &ids), &alone, &assignment);
    for (m, want) in alone.iter().enumerate() {
        rows.set(vec![m; 4]);
        assert_eq!(&logits(&mixed, &ids), want, "model {m}");
    }
}

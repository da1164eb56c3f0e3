//! The trainable LLaMA: adapter gradients against finite differences, gradient flow in bf16,
//! merge/unmerge, save/load, padding, and loss falling when overfitting.

mod common;

use common::{batch, central_difference, logits, max_diff, tiny};
use candle_core::{DType, Device, Tensor};
use candle_peft::adapters::{inject, load_adapter, save_adapter, AdapterConfig, LoraConfig, Targets};
use candle_peft::hub::ModelSource;
use candle_peft::model::Llama;
use candle_peft::training::{causal_lm_loss, AdamWConfig, StepConfig, Trainer};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn lora(r: usize, targets: &[&str]) -> AdapterConfig {
    AdapterConfig::new(LoraConfig {
        r,
        lora_alpha: 2.0 * r as f64,
        lora_dropout: 0.0,
        target_modules: Targets::List(targets.iter().map(|s| s.to_string()).collect()),
        use_rslora: false,
        use_dora: false,
    })
}

const ALL: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Give every adapter tensor random values so that no gradient is trivially zero.
fn randomize(model: &Llama, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (_, v) in model.trainable_params() {
        let data: Vec<f32> = (0..v.elem_count()).map(|_| rng.random_range(-0.2..0.2)).collect();
        v.set(&Tensor::from_vec(data, v.shape(), &Device::Cpu).unwrap()).unwrap();
    }
}

#[test]
fn adapter_gradients_equal_finite_differences() {
    let mut model = tiny(DType::F32);
    inject(&mut model, &lora(4, &ALL), 1).unwrap();
    randomize(&model, 2);
    let b = batch();
    let grads = causal_lm_loss(&model, &b, true).unwrap().backward().unwrap();
    let mut checked = 0;
    for (name, var) in model.trainable_params() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The entry with the largest gradient: the finite difference is most informative there.
        let (idx, &analytic) = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap();
        let eps = 1e-2f32;
        let numeric = central_difference(&model, &var, idx, eps, &b);
        let tol = 2e-2 * analytic.abs().max(1e-2) as f64;
        assert!((numeric - analytic as f64).abs() < tol, "{name}[{idx}]: analytic {analytic}, numeric {numeric}");
        checked += 1;
    }
    assert_eq!(checked, 2 * 7 * 2, "every LoRA tensor of both layers is checked");
}

#[test]
fn gradients_flow_to_every_adapter_tensor_in_bf16() {
    let mut model = tiny(DType::BF16);
    inject(&mut model, &lora(4, &ALL), 1).unwrap();
    randomize(&model, 3);
    let grads = causal_lm_loss(&model, &batch(), true).unwrap().backward().unwrap();
    for (name, var) in model.trainable_params() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        let g = g.to_dtype(DType::F32).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(g.is_finite() && g > 0.0, "{name}: gradient magnitude {g}");
    }
}

#[test]
fn merged_and_unmerged_lora_agree_and_save_load_reproduces() {
    let mut model = tiny(DType::F32);
    inject(&mut model, &lora(4, &ALL), 1).unwrap();
    randomize(&model, 4);
    let base = tiny(DType::F32);
    let unmerged = logits(&model);
    assert!(max_diff(&unmerged, &logits(&base)) > 1e-2, "the adapter must change the logits");
    for (_, l) in model.named_linears_mut() {
        l.merge().unwrap();
    }
    assert!(max_diff(&unmerged, &logits(&model)) < 1e-4);
    for (_, l) in model.named_linears_mut() {
        l.unmerge().unwrap();
    }
    assert!(max_diff(&unmerged, &logits(&model)) < 1e-4);

    let dir = tempfile::tempdir().unwrap();
    let cfg = lora(4, &ALL);
    save_adapter(&model, &cfg, &dir.path().join("adapter"), None).unwrap();
    let mut fresh = tiny(DType::F32);
    let source = ModelSource::parse(dir.path().join("adapter").to_str().unwrap()).unwrap();
    let loaded = load_adapter(&mut fresh, &source).unwrap();
    assert_eq!(loaded, cfg);
    assert!(max_diff(&unmerged, &logits(&fresh)) < 1e-6);
}

#[test]
fn left_padded_rows_equal_rows_run_alone() {
    let model = tiny(DType::F32);
    let padded = Tensor::new(&[[0u32, 0, 0, 5, 9, 13, 2, 7], [3, 4, 5, 6, 7, 8, 9, 10]], &Device::Cpu).unwrap();
    let mask = vec![vec![0, 0, 0, 1, 1, 1, 1, 1], vec![1; 8]];
    let both = model.forward(&padded, Some(&mask), None, false).unwrap();
    let alone0 = model.forward(&Tensor::new(&[[5u32, 9, 13, 2, 7]], &Device::Cpu).unwrap(), None, None, false).unwrap();
    let alone1 = model.forward(&padded.narrow(0, 1, 1).unwrap(), None, None, false).unwrap();
    assert!(max_diff(&both.narrow(0, 0, 1).unwrap().narrow(1, 3, 5).unwrap(), &alone0) < 1e-4);
    assert!(max_diff(&both.narrow(0, 1, 1).unwrap(), &alone1) < 1e-4);
}

#[test]
fn loss_falls_when_overfitting_a_tiny_set() {
    let mut model = tiny(DType::F32);
    inject(&mut model, &lora(8, &ALL), 1).unwrap();
    let cfg = StepConfig {
        optim: AdamWConfig { lr: 1e-2, ..Default::default() },
        warmup_steps: 0,
        total_steps: 40,
        max_grad_norm: Some(1.0),
        gradient_checkpointing: false,
    };
    let mut trainer = Trainer::new(&model, cfg, |_| 1.0).unwrap();
    let b = batch();
    let first = trainer.step(&model, std::slice::from_ref(&b)).unwrap().loss;
    let mut last = first;
    for _ in 1..40 {
        last = trainer.step(&model, std::slice::from_ref(&b)).unwrap().loss;
    }
    assert!(last < 0.3 * first, "loss {first} -> {last}");
}

#[test]
fn a_non_finite_loss_stops_training_and_names_the_step() {
    let mut model = tiny(DType::F32);
    inject(&mut model, &lora(4, &ALL), 1).unwrap();
    let cfg = StepConfig { optim: AdamWConfig::default(), warmup_steps: 0, total_steps: 10, max_grad_norm: Some(1.0), gradient_checkpointing: false };
    let mut trainer = Trainer::new(&model, cfg, |_| 1.0).unwrap();
    let b = batch();
    trainer.step(&model, std::slice::from_ref(&b)).unwrap();
    let (_, a) = &model.trainable_params()[0];
    a.set(&(a.as_tensor() * f64::NAN).unwrap()).unwrap();
    let err = trainer.step(&model, std::slice::from_ref(&b)).unwrap_err().to_string();
    assert!(err.contains("non-finite loss") && err.contains("step 2"), "{err}");
}

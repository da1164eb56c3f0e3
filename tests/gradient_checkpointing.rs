//! Gradient checkpointing changes memory, not results: the same losses and the same gradients as
//! backward through the whole graph, for every kind of adapter (on linears, across blocks,
//! token-mixing, with dropout, with a loss regulariser and step hooks).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_peft::adapters::control::ControlConfig;
use candle_peft::adapters::{
    configure_trainer, inject, set_dropout_key, AdaLoraConfig, AdapterConfig, FullConfig, Ia3Config, LoraConfig,
    NonlinearControlConfig, SiftConfig, SnellConfig, Targets,
};
use candle_peft::model::{Llama, LlamaConfig};
use candle_peft::training::{causal_lm_loss, causal_lm_loss_from_hidden, AdamWConfig, LayerTape, StepConfig, Trainer};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn targets(names: &[&str]) -> Targets {
    Targets::List(names.iter().map(|s| s.to_string()).collect())
}

fn lora(dropout: f64, use_dora: bool) -> LoraConfig {
    LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: dropout,
        target_modules: targets(&["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
        use_rslora: false,
        use_dora,
    }
}

/// A 3-layer random LLaMA (one layer more than `common::tiny`, so that a middle layer exists).
fn model(cfg: &AdapterConfig) -> Llama {
    let mut config = LlamaConfig::tiny(50);
    config.num_hidden_layers = 3;
    let mut model = Llama::random(config, 7, DType::F32, &Device::Cpu).unwrap();
    inject(&mut model, cfg, 1).unwrap();
    // Away from the initialisation (LoRA's B = 0 would leave A without a gradient).
    let mut rng = StdRng::seed_from_u64(2);
    for (_, v) in model.trainable_params() {
        let noise: Vec<f32> = (0..v.elem_count()).map(|_| rng.random_range(-0.1..0.1)).collect();
        let noise = Tensor::from_vec(noise, v.shape(), &Device::Cpu).unwrap().to_dtype(v.dtype()).unwrap();
        v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
    }
    model
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn checkpointed_gradients_equal_the_whole_graphs() {
    let configs = [
        ("lora with dropout", AdapterConfig::Lora(lora(0.1, false))),
        ("dora", AdapterConfig::Lora(lora(0.0, true))),
        ("ia3", AdapterConfig::Ia3(Ia3Config { target_modules: targets(&["k_proj", "v_proj", "down_proj"]), feedforward_modules: Some(targets(&["down_proj"])) })),
        (
            "double control + lora",
            AdapterConfig::Control(ControlConfig {
                control_rank: 4,
                control_alpha: 1.0,
                control_dropout: 0.1,
                double_control: true,
                double_control_rank: 4,
                lora: Some(lora(0.0, false)),
            }),
        ),
        ("nonlinear control", AdapterConfig::NonlinearControl(NonlinearControlConfig { control_rank: 4, stable_mode: true })),
        ("snell", AdapterConfig::Snell(SnellConfig { r: 4, heads: 2, sparsity: 0.5, target_modules: targets(&["q_proj", "down_proj"]) })),
        ("full", AdapterConfig::Full(FullConfig { target_modules: targets(&["v_proj"]), galore: None })),
    ];
    let batch = common::batch();
    for (name, cfg) in configs {
        let model = model(&cfg);
        set_dropout_key(3, 1);
        let whole_loss = causal_lm_loss(&model, &batch, true).unwrap();
        let whole = whole_loss.backward().unwrap();
        let (hidden, tape) = LayerTape::forward(&model, &batch.input_ids, &batch.mask, true).unwrap();
        let loss = causal_lm_loss_from_hidden(&model, &hidden, &batch).unwrap();
        let checkpointed = tape.backward(&loss).unwrap();
        let (a, b) = (whole_loss.to_scalar::<f32>().unwrap(), loss.to_scalar::<f32>().unwrap());
        assert_eq!(a, b, "{name}: the loss changed with checkpointing");
        let params = model.trainable_params();
        assert!(!params.is_empty());
        for (param, var) in params {
            let g = whole.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {param}"));
            let c = checkpointed.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no checkpointed gradient for {param}"));
            let scale = max_abs(g);
            assert!(scale > 0.0, "{name}: {param}'s gradient is zero, the comparison would prove nothing");
            let diff = max_abs(&(g - c).unwrap());
            assert!(diff <= 1e-5 * scale, "{name}: {param} differs by {diff} (largest entry {scale})");
        }
    }
}

/// Whole training steps, with AdaLoRA's orthogonality regulariser and rank allocator and SIFT's
/// index selection (which read the gradients through the step hooks).
#[test]
fn checkpointed_training_follows_the_same_path() {
    let ada = {
        let mut c = AdaLoraConfig::new(targets(&["q_proj", "v_proj"]), 6, 2, 4);
        c.tinit = 1;
        c.tfinal = 1;
        c.delta_t = 1;
        c
    };
    let configs = [
        ("adalora", AdapterConfig::AdaLora(ada)),
        ("sift", AdapterConfig::Sift(SiftConfig { target_modules: targets(&["v_proj", "up_proj"]), sparse_rate: 0.2 })),
        ("lora with dropout", AdapterConfig::Lora(lora(0.1, false))),
    ];
    for (name, cfg) in configs {
        let run = |gradient_checkpointing: bool| -> (Vec<f64>, Vec<(String, Var)>) {
            let model = model(&cfg);
            let steps = StepConfig {
                optim: AdamWConfig { lr: 1e-2, ..Default::default() },
                warmup_steps: 0,
                total_steps: 4,
                max_grad_norm: Some(1.0),
                gradient_checkpointing,
            };
            let mut trainer = Trainer::new(&model, steps, |_| 1.0).unwrap();
            configure_trainer(&mut trainer, &model, &cfg).unwrap();
            let losses = (0..4).map(|_| trainer.step(&model, &[common::batch(), common::batch()]).unwrap().loss).collect();
            (losses, model.trainable_params())
        };
        let ((plain_losses, plain), (ckpt_losses, ckpt)) = (run(false), run(true));
        for (step, (a, b)) in plain_losses.iter().zip(&ckpt_losses).enumerate() {
            assert!((a - b).abs() <= 1e-5 * a.abs(), "{name}: step {} loss {a} against {b} checkpointed", step + 1);
        }
        assert!(plain_losses[3] < plain_losses[0], "{name}: training did not lower the loss: {plain_losses:?}");
        for ((param, p), (_, c)) in plain.iter().zip(&ckpt) {
            let diff = max_abs(&(p.as_tensor() - c.as_tensor()).unwrap());
            assert!(diff <= 1e-4 * max_abs(p.as_tensor()).max(1e-3), "{name}: {param} ended {diff} apart");
        }
    }
}

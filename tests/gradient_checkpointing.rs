//! Gradient checkpointing changes memory, not results: the same losses and the same gradients as
//! backward through the whole graph, for every kind of adapter (on linears, across blocks,
//! token-mixing, with dropout, with a loss regulariser and step hooks, on a dense or an NF4
//! base), although the recomputed layers skip the down projection's product.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_peft::adapters::control::ControlConfig;
use candle_peft::adapters::{inject, AdaLoraConfig, AdapterConfig, FullConfig, Ia3Config, LoraConfig, NonlinearControlConfig, SiftConfig, SnellConfig, Targets};
use candle_peft::training::configure_trainer;
use candle_peft::ops::dropout::set_dropout_key;
use candle_peft::model::{Llama, LlamaConfig};
use candle_peft::quant::Quantization;
use candle_peft::training::{causal_lm_loss, causal_lm_loss_from_hidden, AdamWConfig, LayerTape, StepConfig, Trainer};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn targets(names: &[&str]) -> Targets {
    Targets::List(names.iter().map(|s| s.to_string()).collect())
}

const EVERY_LINEAR: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

fn lora(dropout: f64, use_dora: bool) -> LoraConfig {
    lora_on(&EVERY_LINEAR, dropout, use_dora)
}

fn lora_on(modules: &[&str], dropout: f64, use_dora: bool) -> LoraConfig {
    LoraConfig { r: 4, lora_alpha: 8.0, lora_dropout: dropout, target_modules: targets(modules), use_rslora: false, use_dora }
}

fn double_control() -> AdapterConfig {
    AdapterConfig::new(ControlConfig {
        control_rank: 4,
        control_alpha: 1.0,
        control_dropout: 0.1,
        double_control: true,
        double_control_rank: 4,
        lora: Some(lora(0.0, false)),
    })
}

/// A 3-layer random LLaMA (one layer more than `common::tiny`, so that a middle layer exists).
fn model(cfg: &AdapterConfig) -> Llama {
    model_on(cfg, None)
}

fn model_on(cfg: &AdapterConfig, quantize: Option<Quantization>) -> Llama {
    let mut config = LlamaConfig::tiny(50);
    config.num_hidden_layers = 3;
    let mut model = Llama::random_with(config, 7, DType::F32, &Device::Cpu, quantize).unwrap();
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
    let nf4 = Some(Quantization::Nf4);
    let configs = [
        ("lora with dropout", AdapterConfig::new(lora(0.1, false)), None),
        ("lora", AdapterConfig::new(lora(0.0, false)), None),
        ("lora on q, v (a frozen down_proj)", AdapterConfig::new(lora_on(&["q_proj", "v_proj"], 0.0, false)), None),
        ("qlora with dropout", AdapterConfig::new(lora(0.1, false)), nf4),
        ("qlora on q, v", AdapterConfig::new(lora_on(&["q_proj", "v_proj"], 0.0, false)), nf4),
        ("dora", AdapterConfig::new(lora(0.0, true)), None),
        ("ia3", AdapterConfig::new(Ia3Config { target_modules: targets(&["k_proj", "v_proj", "down_proj"]), feedforward_modules: Some(targets(&["down_proj"])) }), None),
        ("double control + lora", double_control(), None),
        ("qcontrol: double control + lora on nf4", double_control(), nf4),
        ("nonlinear control", AdapterConfig::new(NonlinearControlConfig { control_rank: 4, stable_mode: true }), None),
        ("snell", AdapterConfig::new(SnellConfig { r: 4, heads: 2, sparsity: 0.5, target_modules: targets(&["q_proj", "down_proj"]) }), None),
        ("full", AdapterConfig::new(FullConfig { target_modules: targets(&["v_proj"]), galore: None }), None),
    ];
    let batch = common::batch();
    for (name, cfg, quantize) in configs {
        let model = model_on(&cfg, quantize);
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

/// The graph a checkpointed backward recomputes gives a decoder layer's gradients, with respect
/// to its input and to every adapter in it, without running the down projection's product: its
/// value is not the layer's (which is how this test knows the skip happened).
#[test]
fn the_backward_graph_has_the_layers_gradients_without_its_down_product() {
    let nf4 = Some(Quantization::Nf4);
    let cases = [
        ("lora with dropout", lora(0.1, false), None),
        ("lora on q, v (a frozen down_proj)", lora_on(&["q_proj", "v_proj"], 0.0, false), None),
        ("qlora", lora(0.0, false), nf4),
    ];
    let batch = common::batch();
    for (name, cfg, quantize) in cases {
        let model = model_on(&AdapterConfig::new(cfg), quantize);
        set_dropout_key(5, 0);
        let (b, t) = batch.input_ids.dims2().unwrap();
        let positions = model.positions(&batch.mask, t).unwrap();
        let hidden = model.config.hidden_size;
        let mut rng = StdRng::seed_from_u64(9);
        let mut normal = |n: usize| Tensor::from_vec((0..n).map(|_| rng.random_range(-1f32..1.0)).collect::<Vec<_>>(), (b, t, hidden), &Device::Cpu).unwrap();
        let (h, upstream) = (normal(b * t * hidden), normal(b * t * hidden));
        let run = |backward_graph: bool| {
            let x = Var::from_tensor(&h).unwrap();
            let out = if backward_graph {
                model.layer_backward_graph(1, x.as_tensor(), &positions, true).unwrap()
            } else {
                model.layer(1, x.as_tensor(), &positions, true).unwrap()
            };
            let grads = (&out * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            (out.detach(), grads, x)
        };
        let ((value, whole, x_whole), (skipped, graph, x_graph)) = (run(false), run(true));
        let scale = max_abs(&value);
        let apart = max_abs(&(&value - &skipped).unwrap());
        assert!(apart > 1e-2 * scale, "{name}: the backward graph's value is the layer's ({apart} apart): the product ran");
        let mut compared = vec![(whole.get(x_whole.as_tensor()).unwrap().clone(), graph.get(x_graph.as_tensor()).unwrap().clone(), "the input".to_string())];
        for (param, var) in model.trainable_params().into_iter().filter(|(p, _)| p.contains("layers.1.")) {
            compared.push((whole.get(var.as_tensor()).unwrap().clone(), graph.get(var.as_tensor()).unwrap().clone(), param));
        }
        assert!(compared.len() > 1, "{name}: layer 1 has no adapter");
        for (g, c, what) in compared {
            let scale = max_abs(&g);
            assert!(scale > 0.0, "{name}: {what}'s gradient is zero, the comparison would prove nothing");
            let diff = max_abs(&(&g - &c).unwrap());
            assert!(diff <= 1e-6 * scale, "{name}: {what}'s gradient differs by {diff} (largest entry {scale})");
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
        ("adalora", AdapterConfig::new(ada)),
        ("sift", AdapterConfig::new(SiftConfig { target_modules: targets(&["v_proj", "up_proj"]), sparse_rate: 0.2 })),
        ("lora with dropout", AdapterConfig::new(lora(0.1, false))),
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

//! Gradient checkpointing keeps less: the peak of live heap bytes over a training step of an
//! 8-layer model falls to well under half. This test binary counts heap bytes in its allocator,
//! so it holds this one test only: others running beside it would count too.

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use candle_core::{DType, Device, Tensor};
use candle_peft::adapters::{inject, AdapterConfig, LoraConfig, Targets};
use candle_peft::model::{Llama, LlamaConfig};
use candle_peft::training::{AdamWConfig, StepConfig, TrainBatch, Trainer};

/// Peak heap bytes over the live bytes before, across one training step (after a first step that
/// pays for first-use buffers), and the step's loss.
fn step_peak(gradient_checkpointing: bool) -> (usize, f64) {
    let mut config = LlamaConfig::tiny(50);
    config.num_hidden_layers = 8;
    let mut model = Llama::random(config, 7, DType::F32, &Device::Cpu).unwrap();
    let lora = LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: Targets::Pattern("all-linear".into()),
        use_rslora: false,
        use_dora: false,
    };
    inject(&mut model, &AdapterConfig::new(lora), 1).unwrap();
    let (b, t) = (4, 128);
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % 47) as u32 + 3).collect();
    let batch = TrainBatch {
        input_ids: Tensor::from_vec(ids.clone(), (b, t), &Device::Cpu).unwrap(),
        mask: vec![vec![1; t]; b],
        labels: Tensor::from_vec(ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), (b, t), &Device::Cpu).unwrap(),
    };
    let steps = StepConfig {
        optim: AdamWConfig::default(),
        warmup_steps: 0,
        total_steps: 2,
        max_grad_norm: Some(1.0),
        gradient_checkpointing,
    };
    let mut trainer = Trainer::new(&model, steps, |_| 1.0).unwrap();
    trainer.step(&model, std::slice::from_ref(&batch)).unwrap();
    let before = counting_alloc::live();
    counting_alloc::reset_peak();
    let loss = trainer.step(&model, std::slice::from_ref(&batch)).unwrap().loss;
    (counting_alloc::peak() - before, loss)
}

#[test]
fn checkpointing_keeps_under_half_the_activations() {
    let (whole, whole_loss) = step_peak(false);
    let (checkpointed, loss) = step_peak(true);
    eprintln!("step peak: {whole} bytes over the whole graph, {checkpointed} checkpointed");
    assert!((whole_loss - loss).abs() <= 1e-6 * whole_loss, "loss {whole_loss} against {loss} checkpointed");
    assert!(checkpointed * 2 < whole, "checkpointed step peaked at {checkpointed} bytes, the whole graph's at {whole}");
}

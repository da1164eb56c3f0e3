//! The training loop: a run interrupted after a checkpoint and resumed ends exactly where an
//! uninterrupted run ends (CPU training is deterministic), and the output directory keeps the
//! adapter, the checkpoint and the metrics side by side.

use std::path::Path;

use candle_core::{DType, Device};
use candle_peft::adapters::{adapter_tensors, inject, AdapterConfig, LoraConfig, Targets};
use candle_peft::data::tokenize::{tokenize_example, TokenizeOptions, Tokenized};
use candle_peft::model::{Llama, LlamaConfig};
use candle_peft::training::run::{train, RunConfig};
use candle_peft::training::{AdamWConfig, StepConfig};

fn setup() -> (Llama, AdapterConfig, Vec<Tokenized>) {
    let (train_examples, _) = candle_peft::demo::task(0, 12);
    let tok = candle_peft::demo::tokenizer(&train_examples).unwrap();
    let mut model = Llama::random(LlamaConfig::tiny(tok.get_vocab_size(true)), 3, DType::F32, &Device::Cpu).unwrap();
    let cfg = AdapterConfig::Lora(LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        target_modules: Targets::List(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()]),
        use_rslora: false,
        use_dora: false,
    });
    inject(&mut model, &cfg, 5).unwrap();
    let opts = TokenizeOptions::default();
    let data = train_examples[..40].iter().map(|e| tokenize_example(&tok, e, None, 2, &opts).unwrap()).collect();
    (model, cfg, data)
}

fn run_cfg(dir: &Path, total_steps: usize, resume: bool) -> RunConfig {
    RunConfig {
        output_dir: dir.to_path_buf(),
        batch_size: 8,
        micro_batch_size: 4,
        steps: StepConfig { optim: AdamWConfig { lr: 1e-2, ..Default::default() }, warmup_steps: 2, total_steps, max_grad_norm: Some(1.0) },
        eval_steps: 3,
        save_steps: 3,
        seed: 9,
        pad_id: 0,
        resume,
        base_model: None,
        progress: false,
    }
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, cfg, data) = setup();
    let (train_set, val_set) = data.split_at(32);
    let whole = tmp.path().join("whole");
    train(&model, &cfg, train_set, val_set, &run_cfg(&whole, 6, false), |_| 1.0).unwrap();
    let expected = adapter_tensors(&model).unwrap();

    // Interrupted: stop after 3 steps (a checkpoint is written there), then a new process resumes.
    let split = tmp.path().join("split");
    let (model, _, _) = setup();
    train(&model, &cfg, train_set, val_set, &run_cfg(&split, 3, false), |_| 1.0).unwrap();
    let (model, _, _) = setup();
    let summary = train(&model, &cfg, train_set, val_set, &run_cfg(&split, 6, true), |_| 1.0).unwrap();
    assert_eq!(summary.steps, 6);
    for (name, t) in adapter_tensors(&model).unwrap() {
        let diff = (t - &expected[&name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-6, "{name} differs by {diff} after resuming");
    }
    for f in ["adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "checkpoint/trainer_state.json", "best/adapter_config.json"] {
        assert!(split.join(f).is_file(), "{f} missing from the output directory");
    }
    let metrics = std::fs::read_to_string(split.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"loss\"")).count(), 6, "one line per step over both runs");
}

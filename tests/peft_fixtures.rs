//! The engine reads adapters saved by PEFT 0.21 and computes the logits PyTorch computed
//! (tests/fixtures/peft, made by PEFT itself), unmerged and merged.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_peft::adapters::load_adapter;
use candle_peft::hub::{ModelFiles, ModelSource};
use candle_peft::weights::Weights;
use candle_peft::model::{Llama, LlamaConfig};

fn fixtures() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft");
    assert!(p.is_dir(), "PEFT fixtures not found at {} (they ship in the repository)", p.display());
    p
}

fn load_base() -> Llama {
    let source = ModelSource::parse(fixtures().join("tiny-llama").to_str().unwrap()).unwrap();
    let files = ModelFiles::resolve(&source).unwrap();
    let config = LlamaConfig::from_file(&files.config).unwrap();
    let weights = Weights::from_safetensors(&files.weights).unwrap();
    Llama::load(config, &weights, DType::F32, &Device::Cpu).unwrap()
}

struct Batch {
    ids: Tensor,
    mask: Vec<Vec<u32>>,
    expected: Weights,
}

fn batch() -> Batch {
    let expected = Weights::from_safetensors(&[fixtures().join("logits.safetensors")]).unwrap();
    let ids = expected.get_any("input_ids", DType::U32, &Device::Cpu).unwrap();
    let mask = expected.get_any("attention_mask", DType::U32, &Device::Cpu).unwrap().to_vec2::<u32>().unwrap();
    Batch { ids, mask, expected }
}

/// Max |ours - PEFT's| over the positions that are real tokens (padding positions are undefined).
fn max_err(model: &Llama, b: &Batch, key: &str) -> f32 {
    let ours = model.forward(&b.ids, Some(&b.mask), None, false).unwrap();
    let theirs = b.expected.get_any(key, DType::F32, &Device::Cpu).unwrap();
    let diff = (ours - theirs).unwrap().abs().unwrap().max_keepdim(2).unwrap().squeeze(2).unwrap();
    let diff = diff.to_vec2::<f32>().unwrap();
    let mut worst = 0f32;
    for (row, m) in diff.iter().zip(&b.mask) {
        for (d, &keep) in row.iter().zip(m) {
            if keep == 1 {
                worst = worst.max(*d);
            }
        }
    }
    worst
}

#[test]
fn base_model_matches_pytorch() {
    let b = batch();
    let err = max_err(&load_base(), &b, "logits.base");
    assert!(err < 1e-4, "base logits differ from PyTorch's by {err}");
}

fn check_adapter(name: &str) {
    let b = batch();
    let mut model = load_base();
    let dir = ModelSource::parse(fixtures().join(name).to_str().unwrap()).unwrap();
    load_adapter(&mut model, &dir).unwrap();
    let err = max_err(&model, &b, &format!("logits.{name}"));
    assert!(err < 1e-4, "{name}: unmerged logits differ from PEFT's by {err}");
    for (_, lin) in model.named_linears_mut() {
        lin.merge().unwrap();
    }
    let err = max_err(&model, &b, &format!("logits.{name}.merged"));
    assert!(err < 1e-4, "{name}: merged logits differ from PEFT's by {err}");
    for (_, lin) in model.named_linears_mut() {
        lin.unmerge().unwrap();
    }
    let err = max_err(&model, &b, &format!("logits.{name}"));
    assert!(err < 1e-4, "{name}: logits after unmerge differ from PEFT's by {err}");
}

#[test]
fn lora_all_projections() {
    check_adapter("lora_r4_all");
}

#[test]
fn lora_rslora_q_v() {
    check_adapter("lora_r8_qv_rslora");
}

#[test]
fn dora_with_moved_magnitude() {
    check_adapter("dora_r4_all");
}

#[test]
fn ia3_with_feedforward_down() {
    check_adapter("ia3_kv_down");
}

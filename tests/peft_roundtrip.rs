//! The other direction of tests/peft_fixtures.rs, checked by PEFT itself: an adapter that the
//! engine trained and saved loads in PEFT 0.21 (tests/fixtures/peft_logits.py) and gives
//! the engine's logits, unmerged and merged, for every method PEFT also has (LoRA, rsLoRA, DoRA,
//! IA3).
//!
//! These tests need PyTorch, transformers and PEFT, so they are ignored by a plain `cargo test`;
//! when asked for, they require `CANDLE_PEFT_PYTHON` and fail (never skip) without it:
//!
//!   python=$(scripts/peft_venv.sh) || exit 1
//!   CANDLE_PEFT_PYTHON="$python" cargo test --test peft_roundtrip -- --ignored
//!
//! Each case: a tiny random LLaMA (f32) saved as a Hugging Face directory, an adapter injected
//! and trained a few steps with a high learning rate (so that every adapter tensor leaves its
//! initial value: LoRA's B its zeros, DoRA's magnitude the weight norms, IA3's vectors their
//! ones, and a wrong key or layout would show in the logits), saved with `save_adapter`, then
//! read by PEFT. The batch has a left-padded row; only real-token positions are compared.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use candle_peft::adapters::adalora::AdaLoraConfig;
use candle_peft::adapters::lora::init::{save_converted, InitKind, LoraInitConfig};
use candle_peft::adapters::{inject, save_adapter, AdapterConfig, Ia3Config, LoraConfig, Targets};
use candle_peft::weights::Weights;
use candle_peft::model::llama::random_weights;
use candle_peft::model::{Llama, LlamaConfig};
use candle_peft::training::{AdamWConfig, StepConfig, TrainBatch, Trainer};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;

const ALL: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
const VOCAB: usize = 128;
const TRAIN_STEPS: usize = 5;
/// High enough that 5 AdamW steps move every adapter tensor far from its initial value.
const LR: f64 = 2e-2;
/// Max |engine − PEFT| over real-token logits.
const TOLERANCE: f32 = 1e-4;
/// The adapter must change some logit by more than this, or the comparison would prove nothing.
const MIN_EFFECT: f32 = 1e-3;

/// The Python that has torch, transformers and PEFT: required, since these tests only run when
/// asked for, and a silent skip would pass CI without checking anything.
fn python() -> PathBuf {
    match std::env::var_os("CANDLE_PEFT_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "CANDLE_PEFT_PYTHON is not set: the PEFT round-trip tests need a Python with torch 2.11.0, \
             transformers 5.17.0 and peft 0.21.0. Run `python=$(scripts/peft_venv.sh)` and then \
             `CANDLE_PEFT_PYTHON=\"$python\" cargo test --test peft_roundtrip -- --ignored`"
        ),
    }
}

fn names(list: &[&str]) -> Targets {
    Targets::List(list.iter().map(|s| s.to_string()).collect())
}

fn lora(r: usize, alpha: f64, targets: &[&str], dropout: f64, use_rslora: bool, use_dora: bool) -> AdapterConfig {
    AdapterConfig::new(LoraConfig {
        r,
        lora_alpha: alpha,
        lora_dropout: dropout,
        target_modules: names(targets),
        use_rslora,
        use_dora,
    })
}

/// Token ids with a padding mask; row 1 is left-padded.
struct Batch {
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<u32>>,
}

impl Batch {
    fn random(seed: u64, len: usize, pad: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut row = |pads: usize| -> Vec<u32> {
            (0..len).map(|i| if i < pads { 0 } else { rng.random_range(3..VOCAB as u32) }).collect()
        };
        let ids = vec![row(0), row(pad)];
        let mask = vec![vec![1; len], (0..len).map(|i| u32::from(i >= pad)).collect()];
        Self { ids, mask }
    }

    fn input_ids(&self) -> Tensor {
        Tensor::new(self.ids.clone(), &Device::Cpu).unwrap()
    }

    /// Labels are the ids, -100 at padding.
    fn train_batch(&self) -> TrainBatch {
        let labels: Vec<Vec<i64>> = self
            .ids
            .iter()
            .zip(&self.mask)
            .map(|(ids, m)| ids.iter().zip(m).map(|(&t, &k)| if k == 1 { t as i64 } else { -100 }).collect())
            .collect();
        TrainBatch { input_ids: self.input_ids(), mask: self.mask.clone(), labels: Tensor::new(labels, &Device::Cpu).unwrap() }
    }

    /// The `IDS.json` that peft_logits.py reads.
    fn write_json(&self, path: &Path) {
        let v = json!({"input_ids": self.ids, "attention_mask": self.mask});
        std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
    }

    /// Max |a − b| over the positions that are real tokens (padding positions are undefined).
    fn max_diff(&self, a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().max_keepdim(2).unwrap().squeeze(2).unwrap();
        let diff = diff.to_vec2::<f32>().unwrap();
        let real = diff.iter().zip(&self.mask).flat_map(|(row, m)| row.iter().zip(m).filter(|(_, &k)| k == 1));
        real.map(|(d, _)| *d).fold(0f32, f32::max)
    }
}

/// A random model, and the same weights saved as a Hugging Face directory (`config.json` from
/// `to_hf_json`, `model.safetensors` with HF names; a tied model has no `lm_head.weight`, as
/// transformers saves it).
fn random_model(dir: &Path, tied: bool) -> Llama {
    let mut config = LlamaConfig::tiny(VOCAB);
    config.tie_word_embeddings = tied;
    let weights = random_weights(&config, 1.0 / (config.hidden_size as f32).sqrt(), 11).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config.to_hf_json()).unwrap()).unwrap();
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
    Llama::load(config, &Weights::from_tensors(weights, "random weights"), DType::F32, &Device::Cpu).unwrap()
}

fn snapshot(model: &Llama) -> HashMap<String, Tensor> {
    model.trainable_params().into_iter().map(|(k, v)| (k, v.as_tensor().copy().unwrap())).collect()
}

/// A few AdamW steps on one batch; then every adapter tensor must have left its initial value,
/// so that PEFT reading any of them wrongly (or not at all) changes the logits.
fn train(model: &Llama, batch: &TrainBatch) {
    let before = snapshot(model);
    let config = StepConfig {
        optim: AdamWConfig { lr: LR, ..AdamWConfig::default() },
        warmup_steps: 0,
        // Far beyond the steps taken, so the linear decay keeps the rate near its peak.
        total_steps: 100 * TRAIN_STEPS,
        max_grad_norm: None,
        gradient_checkpointing: false,
    };
    let mut trainer = Trainer::new(model, config, |_| 1.0).unwrap();
    for _ in 0..TRAIN_STEPS {
        trainer.step(model, std::slice::from_ref(batch)).unwrap();
    }
    for (name, after) in snapshot(model) {
        let moved = (&after - &before[&name]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let moved = moved.to_scalar::<f32>().unwrap();
        assert!(moved > 1e-3, "{name} barely moved in training (max change {moved})");
    }
}

/// The logits PEFT computes for the saved model and adapter (`merge`: after `merge_and_unload`).
fn peft_logits(model_dir: &Path, adapter_dir: &Path, ids_json: &Path, merge: bool) -> Tensor {
    let out = adapter_dir.with_file_name(if merge { "peft_merged.safetensors" } else { "peft.safetensors" });
    let mut cmd = Command::new(python());
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_logits.py")).args([model_dir, adapter_dir, ids_json, &out]);
    if merge {
        cmd.arg("--merge");
    }
    let result = cmd.output().unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()));
    assert!(
        result.status.success(),
        "peft_logits.py{} failed ({}):\n{}",
        if merge { " --merge" } else { "" },
        result.status,
        String::from_utf8_lossy(&result.stderr)
    );
    // PEFT's warnings (e.g. about keys it did not expect) are worth seeing with --nocapture.
    let stderr = String::from_utf8_lossy(&result.stderr);
    if !stderr.trim().is_empty() {
        eprintln!("peft_logits.py{} said:\n{stderr}", if merge { " --merge" } else { "" });
    }
    Weights::from_safetensors(&[out]).unwrap().get_any("logits", DType::F32, &Device::Cpu).unwrap()
}

/// Train `cfg` on a tiny model, save it, and check that PEFT computes the engine's logits.
fn roundtrip(cfg: AdapterConfig, tied: bool) {
    roundtrip_saved_with(cfg, tied, save_adapter);
}

/// As `roundtrip`, saving with `save` (PiSSA and OLoRA save a plain LoRA against the original base).
fn roundtrip_saved_with(cfg: AdapterConfig, tied: bool, save: fn(&Llama, &AdapterConfig, &Path, Option<&str>) -> candle_peft::Result<()>) {
    python(); // fail before any work when PEFT is not available
    let tmp = tempfile::tempdir().unwrap();
    let (model_dir, adapter_dir, ids_json) = (tmp.path().join("model"), tmp.path().join("adapter"), tmp.path().join("ids.json"));
    let mut model = random_model(&model_dir, tied);
    let eval = Batch::random(2, 10, 3);
    eval.write_json(&ids_json);
    let base = model.forward(&eval.input_ids(), Some(&eval.mask), None, false).unwrap();

    inject(&mut model, &cfg, 5).unwrap();
    train(&model, &Batch::random(1, 8, 2).train_batch());
    save(&model, &cfg, &adapter_dir, Some(model_dir.to_str().unwrap())).unwrap();

    let ours = model.forward(&eval.input_ids(), Some(&eval.mask), None, false).unwrap();
    let effect = eval.max_diff(&ours, &base);
    assert!(effect > MIN_EFFECT, "the trained adapter changes the logits by only {effect}");
    let err = eval.max_diff(&ours, &peft_logits(&model_dir, &adapter_dir, &ids_json, false));
    assert!(err <= TOLERANCE, "unmerged: PEFT's logits differ from the engine's by {err} (the adapter's effect is {effect})");

    for (_, linear) in model.named_linears_mut() {
        linear.merge().unwrap();
    }
    let merged = model.forward(&eval.input_ids(), Some(&eval.mask), None, false).unwrap();
    let merged_err = eval.max_diff(&merged, &peft_logits(&model_dir, &adapter_dir, &ids_json, true));
    assert!(
        merged_err <= TOLERANCE,
        "merged: PEFT's logits differ from the engine's by {merged_err} (the adapter's effect is {effect})"
    );
    let name = std::thread::current().name().unwrap_or("?").to_string();
    eprintln!("{name}: adapter effect {effect:.3e}; |engine - PEFT| unmerged {err:.3e}, merged {merged_err:.3e}");
}

#[test]
#[ignore = "needs PyTorch + PEFT: run scripts/peft_venv.sh, then CANDLE_PEFT_PYTHON=... cargo test --test peft_roundtrip -- --ignored"]
fn lora_all_projections() {
    roundtrip(lora(4, 8.0, &ALL, 0.1, false, false), true);
}

/// Untied embeddings, so that a model with its own `lm_head.weight` is covered too.
#[test]
#[ignore = "needs PyTorch + PEFT: run scripts/peft_venv.sh, then CANDLE_PEFT_PYTHON=... cargo test --test peft_roundtrip -- --ignored"]
fn rslora_q_v() {
    roundtrip(lora(8, 16.0, &["q_proj", "v_proj"], 0.0, true, false), false);
}

#[test]
#[ignore = "needs PyTorch + PEFT: run scripts/peft_venv.sh, then CANDLE_PEFT_PYTHON=... cargo test --test peft_roundtrip -- --ignored"]
fn dora_all_projections() {
    roundtrip(lora(4, 8.0, &ALL, 0.0, false, true), true);
}

#[test]
#[ignore = "needs PyTorch + PEFT: run scripts/peft_venv.sh, then CANDLE_PEFT_PYTHON=... cargo test --test peft_roundtrip -- --ignored"]
fn ia3_k_v_and_feedforward_down() {
    let cfg = AdapterConfig::new(Ia3Config {
        target_modules: names(&["k_proj", "v_proj", "down_proj"]),
        feedforward_modules: Some(names(&["down_proj"])),
    });
    roundtrip(cfg, true);
}

/// PiSSA and OLoRA train against a residual base; PEFT users get a plain LoRA against the
/// original base (`path_initial_model_for_weight_conversion`), which must give the same logits.
#[test]
#[ignore = "needs PyTorch + PEFT: run scripts/peft_venv.sh, then CANDLE_PEFT_PYTHON=... cargo test --test peft_roundtrip -- --ignored"]
fn pissa_and_olora_converted_to_lora() {
    for kind in [InitKind::Pissa, InitKind::Olora] {
        let c = lora(4, 8.0, &ALL, 0.0, false, false).downcast_ref::<LoraConfig>().unwrap().clone();
        roundtrip_saved_with(AdapterConfig::new(LoraInitConfig { lora: c, kind }), true, save_converted);
    }
}

#[test]
#[ignore = "needs PyTorch + PEFT: run scripts/peft_venv.sh, then CANDLE_PEFT_PYTHON=... cargo test --test peft_roundtrip -- --ignored"]
fn adalora_all_projections() {
    roundtrip(AdapterConfig::new(AdaLoraConfig::new(names(&ALL), 6, 4, 100)), true);
}

//! The training loop: a run interrupted after a checkpoint and resumed ends exactly where an
//! uninterrupted run ends (CPU training is deterministic), and the output directory keeps the
//! adapter, the checkpoint and the metrics side by side.

use std::path::Path;

use candle_core::{DType, Device};
use candle_peft::adapters::{adapter_tensors, inject, AdaLoraConfig, AdapterConfig, LoraConfig, SiftConfig, Targets};
use candle_peft::data::tokenize::{tokenize_example, TokenizeOptions, Tokenized};
use candle_peft::model::{Llama, LlamaConfig};
use candle_peft::training::run::{train, RunConfig};
use candle_peft::training::{AdamWConfig, StepConfig};

fn targets() -> Targets {
    Targets::List(vec!["q_proj".into(), "v_proj".into(), "down_proj".into()])
}

fn setup() -> (Llama, AdapterConfig, Vec<Tokenized>) {
    let cfg = AdapterConfig::new(LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        target_modules: targets(),
        use_rslora: false,
        use_dora: false,
    });
    setup_with(cfg)
}

/// The model of `setup`, with no adapter yet.
fn setup_bare() -> Llama {
    let (train_examples, _) = candle_peft::demo::task(0, 12);
    let tok = candle_peft::demo::tokenizer(&train_examples).unwrap();
    Llama::random(LlamaConfig::tiny(tok.get_vocab_size(true)), 3, DType::F32, &Device::Cpu).unwrap()
}

fn setup_with(cfg: AdapterConfig) -> (Llama, AdapterConfig, Vec<Tokenized>) {
    let (train_examples, _) = candle_peft::demo::task(0, 12);
    let tok = candle_peft::demo::tokenizer(&train_examples).unwrap();
    let mut model = Llama::random(LlamaConfig::tiny(tok.get_vocab_size(true)), 3, DType::F32, &Device::Cpu).unwrap();
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
        steps: StepConfig { optim: AdamWConfig { lr: 1e-2, ..Default::default() }, warmup_steps: 2, total_steps, max_grad_norm: Some(1.0), gradient_checkpointing: false },
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
    for f in ["adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "checkpoints/step-000000006/trainer_state.json", "best/adapter_config.json"] {
        assert!(split.join(f).is_file(), "{f} missing from the output directory");
    }
    let metrics = std::fs::read_to_string(split.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"loss\"")).count(), 6, "one line per step over both runs");
}

/// Train `cfg` for 6 steps in one go, and for 3 + 3 steps with a resume from the checkpoint in
/// between (each leg a fresh model, as a new process would have): the adapters must be equal bit
/// for bit. Returns the resumed run's output directory.
fn assert_resume_is_exact(cfg: &AdapterConfig, tmp: &Path) -> std::path::PathBuf {
    let (model, _, data) = setup_with(cfg.clone());
    let (train_set, val_set) = data.split_at(32);
    train(&model, cfg, train_set, val_set, &run_cfg(&tmp.join("whole"), 6, false), |_| 1.0).unwrap();
    let expected = adapter_tensors(&model).unwrap();
    let split = tmp.join("split");
    let (model, _, _) = setup_with(cfg.clone());
    train(&model, cfg, train_set, val_set, &run_cfg(&split, 3, false), |_| 1.0).unwrap();
    let (model, _, _) = setup_with(cfg.clone());
    train(&model, cfg, train_set, val_set, &run_cfg(&split, 6, true), |_| 1.0).unwrap();
    let got = adapter_tensors(&model).unwrap();
    assert_eq!(got.len(), expected.len());
    for (name, t) in got {
        let (a, b) = (t.flatten_all().unwrap(), expected[&name].flatten_all().unwrap());
        let equal = match a.dtype() {
            DType::U32 => a.to_vec1::<u32>().unwrap() == b.to_vec1::<u32>().unwrap(),
            _ => {
                let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
            }
        };
        assert!(equal, "{name} differs after resuming");
    }
    split
}

fn adalora(tinit: usize, tfinal: usize) -> AdapterConfig {
    // total_step is fixed (not taken from the leg's step count): both legs share the schedule.
    let mut c = AdaLoraConfig::new(targets(), 6, 2, 6);
    c.tinit = tinit;
    c.tfinal = tfinal;
    AdapterConfig::new(c)
}

#[test]
fn resumed_adalora_run_equals_uninterrupted_run() {
    // Budgeting steps 2..4 around the checkpoint after step 3: the sensitivity averages cross it.
    let tmp = tempfile::tempdir().unwrap();
    let split = assert_resume_is_exact(&adalora(1, 1), tmp.path());
    assert!(split.join("checkpoints/step-000000006/hook_state.safetensors").is_file());
    // The final allocation at step 3 (0-based 2), before the checkpoint: the rank pattern crosses it.
    let tmp = tempfile::tempdir().unwrap();
    assert_resume_is_exact(&adalora(0, 4), tmp.path());
}

#[test]
fn resumed_sift_run_equals_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = AdapterConfig::new(SiftConfig { target_modules: targets(), sparse_rate: 0.2 });
    assert_resume_is_exact(&cfg, tmp.path());
}

/// Every float of an adapter's tensors, as bits (equal runs give equal bits).
fn adapter_bits(model: &Llama) -> Bits {
    let mut out: Bits = adapter_tensors(model)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()))
        .collect();
    out.sort();
    out
}

fn step_lines(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"loss\""))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect()
}

/// An adapter's floats as bits, by tensor name.
type Bits = Vec<(String, Vec<u32>)>;

/// A 6-step run in one go (its adapter's bits), and the first 3 steps of the same run in `split`,
/// stopped there as a killed process would be after its checkpoint; then `damage` is applied to
/// `split` and a fresh model resumes it to step 6. Returns (the uninterrupted bits, the resumed
/// run's bits, `split`).
fn interrupted_then_resumed(tmp: &Path, damage: impl FnOnce(&Path)) -> (Bits, Bits, std::path::PathBuf) {
    let (model, cfg, data) = setup();
    let (train_set, val_set) = data.split_at(32);
    train(&model, &cfg, train_set, val_set, &run_cfg(&tmp.join("whole"), 6, false), |_| 1.0).unwrap();
    let expected = adapter_bits(&model);
    let split = tmp.join("split");
    let (model, _, _) = setup();
    train(&model, &cfg, train_set, val_set, &run_cfg(&split, 3, false), |_| 1.0).unwrap();
    damage(&split);
    let (model, _, _) = setup();
    train(&model, &cfg, train_set, val_set, &run_cfg(&split, 6, true), |_| 1.0).unwrap();
    (expected, adapter_bits(&model), split)
}

#[test]
fn resume_after_a_crash_finds_the_newest_whole_checkpoint_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    // A run that stopped at step 3, then died inside the save of step 6 and after logging steps 4
    // and 5: a temporary checkpoint folder half-written, the metrics of the lost steps appended,
    // and a line cut in the middle.
    let debris = tmp.path().join("split/checkpoints/.step-000000006.tmp-4242");
    let (expected, got, split) = interrupted_then_resumed(tmp.path(), |split| {
        std::fs::create_dir_all(&debris).unwrap();
        std::fs::write(debris.join("adapter_model.safetensors"), b"half").unwrap();
        let mut metrics = std::fs::read_to_string(split.join("metrics.jsonl")).unwrap();
        metrics.push_str("{\"step\":4,\"loss\":1.0}\n{\"step\":5,\"loss\":1.0}\n{\"step\":6,\"lo");
        std::fs::write(split.join("metrics.jsonl"), metrics).unwrap();
    });
    assert_eq!(got, expected, "the resumed run ends where the uninterrupted one does");
    assert!(!debris.exists(), "the half-written checkpoint is removed");
    assert_eq!(step_lines(&split), (1..=6).collect::<Vec<_>>(), "one metrics line a step, none replayed");
    let kept: Vec<String> = std::fs::read_dir(split.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert_eq!(kept.len(), candle_peft::training::checkpoint::KEEP, "{kept:?}");
}

#[test]
fn the_earlier_single_checkpoint_folder_and_its_crash_leftover_still_resume() {
    let tmp = tempfile::tempdir().unwrap();
    // The layout of earlier versions, as a crash between the two renames of their swap left it:
    // no `checkpoint/`, the previous one under `.checkpoint.old-PID`.
    let (expected, got, split) = interrupted_then_resumed(tmp.path(), |split| {
        std::fs::rename(split.join("checkpoints/step-000000003"), split.join(".checkpoint.old-77")).unwrap();
        std::fs::remove_dir_all(split.join("checkpoints")).unwrap();
    });
    assert_eq!(got, expected);
    assert!(!split.join(".checkpoint.old-77").exists(), "the leftover goes once a newer checkpoint is whole");
}

#[test]
fn a_new_run_does_not_train_over_an_earlier_runs_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, cfg, data) = setup();
    let (train_set, val_set) = data.split_at(32);
    train(&model, &cfg, train_set, val_set, &run_cfg(tmp.path(), 3, false), |_| 1.0).unwrap();
    let before = std::fs::read(tmp.path().join("checkpoints/step-000000003/adapter_model.safetensors")).unwrap();
    let (model, _, _) = setup();
    let e = train(&model, &cfg, train_set, val_set, &run_cfg(tmp.path(), 3, false), |_| 1.0).unwrap_err().to_string();
    assert!(e.contains("holds a checkpoint or an adapter of an earlier run"), "{e}");
    assert_eq!(std::fs::read(tmp.path().join("checkpoints/step-000000003/adapter_model.safetensors")).unwrap(), before);
}

#[test]
fn a_non_finite_learning_rate_stops_before_anything_is_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, cfg, data) = setup();
    let (train_set, val_set) = data.split_at(32);
    let mut run = run_cfg(tmp.path(), 6, false);
    run.steps.optim.lr = f64::NAN;
    let e = train(&model, &cfg, train_set, val_set, &run, |_| 1.0).unwrap_err().to_string();
    assert!(e.contains("learning rate NaN at step 1"), "{e}");
    assert!(!tmp.path().join("checkpoints").exists() && !tmp.path().join("best").exists());
}

#[test]
fn an_adapter_holding_nan_is_never_written() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, cfg, _) = setup();
    let mut tensors = adapter_tensors(&model).unwrap();
    let name = tensors.keys().next().unwrap().clone();
    let t = &tensors[&name];
    let poisoned = (t + f64::NAN).unwrap();
    tensors.insert(name.clone(), poisoned);
    let e = candle_peft::adapters::write_adapter_files(tmp.path(), &cfg, &tensors, None).unwrap_err().to_string();
    assert!(e.contains(&name) && e.contains("non-finite"), "{e}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0, "nothing written");
}

#[test]
fn an_adapter_file_holding_nan_is_refused_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, cfg, _) = setup();
    candle_peft::adapters::save_adapter(&model, &cfg, tmp.path(), None).unwrap();
    // Poison one tensor the way a diverged run of another tool would have saved it.
    let path = tmp.path().join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let name = tensors.keys().min().unwrap().clone();
    let poisoned = (&tensors[&name] * f64::NAN).unwrap();
    tensors.insert(name.clone(), poisoned);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let mut fresh = setup_bare();
    let source = candle_peft::hub::ModelSource::parse(tmp.path().to_str().unwrap()).unwrap();
    let e = candle_peft::adapters::load_adapter(&mut fresh, &source).unwrap_err().to_string();
    assert!(e.contains(&name) && e.contains("non-finite"), "{e}");
}

#[test]
fn special_token_ids_past_the_vocabulary_are_refused_naming_the_key() {
    let mut c = LlamaConfig::tiny(50).to_hf_json();
    c["eos_token_id"] = serde_json::json!(77);
    let e = LlamaConfig::from_value(&c, Path::new("config.json")).unwrap_err().to_string();
    assert!(e.contains("config.json") && e.contains("eos_token_id") && e.contains("77"), "{e}");
}

#[test]
fn a_run_killed_before_its_first_checkpoint_leaves_no_line_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, cfg, data) = setup();
    let (train_set, val_set) = data.split_at(32);
    // What a kill between logging step 1 and saving its checkpoint leaves: one line, no checkpoint.
    let orphan = "{\"step\":1,\"loss\":9.0}";
    std::fs::write(tmp.path().join("metrics.jsonl"), format!("{orphan}\n")).unwrap();
    train(&model, &cfg, train_set, val_set, &run_cfg(tmp.path(), 3, true), |_| 1.0).unwrap();
    assert_eq!(step_lines(tmp.path()), vec![1, 2, 3]);
    // The orphan line itself is gone (a substring test would also match the new lines' timings).
    let text = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
    assert!(!text.lines().any(|l| l == orphan), "{text}");
}

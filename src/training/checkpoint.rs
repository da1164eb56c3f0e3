//! Training checkpoints: the adapter (PEFT format), the optimizer moments, the step hooks' state
//! (AdaLoRA's rank allocator), the step and the data position, read back to resume on the very
//! next batch.
//!
//! Consistent at every instant: a checkpoint is written whole into a temporary folder, then
//! renamed to `OUTPUT/checkpoints/step-NNNNNNNNN`, a name no other checkpoint has, so the rename
//! is the one moment it appears and nothing older is touched before it. Only then are all but the
//! newest [`KEEP`] removed. Resume takes the newest `step-*` folder; temporaries a crash left are
//! removed when a run starts. The single `OUTPUT/checkpoint` folder of earlier versions (and the
//! `.checkpoint.old-*` a crash inside its swap left) is still read when no numbered one exists.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::step::Trainer;
use crate::adapters::{adapter_tensors, load_adapter_tensors, write_adapter_files, AdapterConfig};
use crate::data::batch::BatchPosition;
use crate::error::{read_json, Error, IoContext, Result};
use crate::weights::Weights;
use crate::model::Llama;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The step hooks' state (`Trainer::hook_state`); absent when no hook has any.
pub const HOOK_STATE_FILE: &str = "hook_state.safetensors";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub step: usize,
    pub total_steps: usize,
    pub data_position: BatchPosition,
    pub optimizer_t: usize,
    pub best_eval_loss: Option<f64>,
    pub seed: u64,
}

/// The folder of the numbered checkpoints under a run's output directory.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// How many checkpoints a run keeps (the newest).
pub const KEEP: usize = 2;

fn step_of(name: &str) -> Option<usize> {
    name.strip_prefix("step-").and_then(|n| n.parse().ok())
}

/// The numbered checkpoints of a run, oldest first.
fn numbered(output_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let dir = output_dir.join(CHECKPOINTS_DIR);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).at(&dir)? {
        let path = entry.at(&dir)?.path();
        let step = path.file_name().and_then(|n| n.to_str()).and_then(step_of);
        if let Some(step) = step.filter(|_| path.join(STATE_FILE).is_file()) {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// The newest whole checkpoint of the run in `output_dir`, if any: the highest `step-*` folder,
/// else the earlier versions' `checkpoint/`, else the previous checkpoint that a crash inside
/// their swap left as `.checkpoint.old-*`.
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    if let Some((_, path)) = numbered(output_dir)?.pop() {
        return Ok(Some(path));
    }
    let legacy = output_dir.join("checkpoint");
    if legacy.join(STATE_FILE).is_file() {
        return Ok(Some(legacy));
    }
    let mut old: Vec<PathBuf> = match std::fs::read_dir(output_dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".checkpoint.old-")))
            .filter(|p| p.join(STATE_FILE).is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    old.sort();
    Ok(old.pop())
}

/// Remove what a crash left half-written: temporaries of the numbered scheme, and those of the
/// earlier versions' swap (`.checkpoint.tmp-*`, and `.checkpoint.old-*` once a newer whole
/// checkpoint exists). Whole checkpoints are never removed here.
pub fn remove_stale(output_dir: &Path) -> Result<()> {
    let numbered_dir = output_dir.join(CHECKPOINTS_DIR);
    let mut stale = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&numbered_dir) {
        stale.extend(entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.') && n.contains(".tmp-"))
        }));
    }
    let newer_exists = !numbered(output_dir)?.is_empty() || output_dir.join("checkpoint").join(STATE_FILE).is_file();
    if let Ok(entries) = std::fs::read_dir(output_dir) {
        stale.extend(entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with(".checkpoint.tmp-") || (newer_exists && name.starts_with(".checkpoint.old-"))
        }));
    }
    for path in stale {
        tracing::info!("removing {}, left by an interrupted save", path.display());
        std::fs::remove_dir_all(&path).at(&path)?;
    }
    Ok(())
}

/// Save the checkpoint of `state.step` as `OUTPUT/checkpoints/step-N` (see the module doc), then
/// keep only the newest [`KEEP`]. Returns its folder.
pub fn save_numbered_checkpoint(
    output_dir: &Path,
    model: &Llama,
    adapter: &AdapterConfig,
    trainer: &Trainer,
    state: &TrainerState,
    base_model: Option<&str>,
) -> Result<PathBuf> {
    let dir = output_dir.join(CHECKPOINTS_DIR).join(format!("step-{:09}", state.step));
    save_checkpoint(&dir, model, adapter, trainer, state, base_model)?;
    let all = numbered(output_dir)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(KEEP)) {
        std::fs::remove_dir_all(old).at(old)?;
    }
    // A leftover of the earlier versions' swap is older than the checkpoint just made whole.
    remove_stale(output_dir)?;
    Ok(dir)
}

/// Write `dir` atomically: adapter files, optimizer state, hook state, trainer state.
pub fn save_checkpoint(
    dir: &Path,
    model: &Llama,
    adapter: &AdapterConfig,
    trainer: &Trainer,
    state: &TrainerState,
    base_model: Option<&str>,
) -> Result<()> {
    let tensors = adapter_tensors(model)?;
    let optimizer = trainer.optimizer.state_tensors()?;
    let hooks: HashMap<String, Tensor> =
        trainer.hook_state()?.into_iter().map(|(k, v)| Ok((k, v.contiguous()?))).collect::<Result<_>>()?;
    let json = serde_json::to_string_pretty(state).map_err(|e| Error::Training(e.to_string()))?;
    crate::fsutil::write_dir_atomic(dir, |tmp| {
        write_adapter_files(tmp, adapter, &tensors, base_model)?;
        let opt_path = tmp.join(OPTIMIZER_FILE);
        candle_core::safetensors::save(&optimizer, &opt_path).map_err(|e| Error::BadFile { path: opt_path, msg: e.to_string() })?;
        if !hooks.is_empty() {
            let path = tmp.join(HOOK_STATE_FILE);
            candle_core::safetensors::save(&hooks, &path).map_err(|e| Error::BadFile { path, msg: e.to_string() })?;
        }
        std::fs::write(tmp.join(STATE_FILE), json.as_bytes()).map_err(|source| Error::Io { path: tmp.join(STATE_FILE), source })
    })
}

/// Restore adapter tensors, optimizer state and hook state from `dir` into a model whose adapter
/// is already injected with the same config (and a trainer configured for it); returns the saved
/// trainer state.
pub fn load_checkpoint(dir: &Path, model: &Llama, trainer: &mut Trainer) -> Result<TrainerState> {
    let state: TrainerState = read_json(&dir.join(STATE_FILE))?;
    let adapter = Weights::from_safetensors(&[dir.join("adapter_model.safetensors")])?;
    load_adapter_tensors(model, &adapter)?;
    let opt = Weights::from_safetensors(&[dir.join(OPTIMIZER_FILE)])?;
    let tensors: HashMap<String, Tensor> = opt
        .names()
        .into_iter()
        .map(|n| Ok((n.clone(), opt.get_any(&n, DType::F32, &Device::Cpu)?)))
        .collect::<Result<_>>()?;
    trainer.optimizer.load_state(&tensors, state.optimizer_t)?;
    let hook_path = dir.join(HOOK_STATE_FILE);
    let hooks = if hook_path.is_file() {
        candle_core::safetensors::load(&hook_path, &Device::Cpu).map_err(|e| Error::BadFile { path: hook_path, msg: e.to_string() })?
    } else {
        HashMap::new()
    };
    trainer.load_hook_state(&hooks)?;
    trainer.step = state.step;
    Ok(state)
}

//! Training checkpoints: the adapter (PEFT format), the optimizer moments, the step hooks' state
//! (AdaLoRA's rank allocator), the step and the data position, written atomically into one directory so that a crash mid-write leaves the previous
//! checkpoint whole, and read back to resume on the very next batch.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::step::Trainer;
use crate::adapters::{adapter_tensors, load_adapter_tensors, write_adapter_files, AdapterConfig};
use crate::data::batch::BatchPosition;
use crate::error::{read_json, Error, Result};
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

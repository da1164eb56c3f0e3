//! The fine-tuning loop of the LLM-Adapters recipe (docs/METHODS.md §0.3): tokenize, hold out a
//! validation split, iterate seeded left-padded micro-batches, accumulate to the batch size,
//! step, evaluate the held-out loss every N steps, checkpoint every N steps (resumable), and
//! log every step to a progress bar and a JSONL metrics file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use serde::Serialize;

use super::checkpoint::{latest_checkpoint, load_checkpoint, remove_stale, save_numbered_checkpoint, TrainerState};
use super::step::{eval_loss, StepConfig, Trainer};
use crate::model::TrainBatch;
use crate::adapters::{save_adapter, AdapterConfig};
use crate::data::batch::{Batch, BatchIter};
use crate::data::tokenize::Tokenized;
use crate::error::{Error, IoContext, Result};
use crate::model::Llama;

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub output_dir: PathBuf,
    pub batch_size: usize,
    pub micro_batch_size: usize,
    pub steps: StepConfig,
    pub eval_steps: usize,
    pub save_steps: usize,
    pub seed: u64,
    pub pad_id: u32,
    pub resume: bool,
    /// Shown in adapter_config.json's `base_model_name_or_path`.
    pub base_model: Option<String>,
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub steps: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub last_eval_loss: Option<f64>,
    pub tokens: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
    /// The process's peak resident set (VmHWM, model loading included), where /proc has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_mib: Option<f64>,
    /// On CUDA: the peak of device memory in use during training over what was in use before it
    /// (the loaded model).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_peak_extra_mib: Option<f64>,
}

/// Optimizer steps needed for `epochs` passes over `n` examples at `batch_size`.
pub fn steps_for_epochs(n: usize, batch_size: usize, epochs: f64) -> usize {
    ((n.div_ceil(batch_size.max(1)) as f64) * epochs).ceil().max(1.0) as usize
}

pub fn to_train_batch(b: &Batch, device: &Device) -> Result<TrainBatch> {
    let t = b.to_tensors(device)?;
    let mask = b.attention_mask.chunks(b.seq_len).map(<[u32]>::to_vec).collect();
    Ok(TrainBatch { input_ids: t.input_ids, mask, labels: t.labels })
}

/// Train the adapters already injected into `model`. Checkpoints go to `output_dir/checkpoints/`,
/// the final adapter to `output_dir`, metrics to `output_dir/metrics.jsonl`.
pub fn train(
    model: &Llama,
    adapter: &AdapterConfig,
    train_set: &[Tokenized],
    val_set: &[Tokenized],
    cfg: &RunConfig,
    lr_scale: impl Fn(&str) -> f64,
) -> Result<RunSummary> {
    if cfg.micro_batch_size == 0 || !cfg.batch_size.is_multiple_of(cfg.micro_batch_size) {
        return Err(Error::Training(format!(
            "batch size {} must be a multiple of the micro-batch size {}",
            cfg.batch_size, cfg.micro_batch_size
        )));
    }
    let accum = cfg.batch_size / cfg.micro_batch_size;
    std::fs::create_dir_all(&cfg.output_dir).at(&cfg.output_dir)?;
    remove_stale(&cfg.output_dir)?;
    // An earlier run's checkpoints, or its finished adapter, are the user's: trained over only
    // when the run is asked to continue.
    let latest = latest_checkpoint(&cfg.output_dir)?;
    let finished = cfg.output_dir.join("adapter_model.safetensors");
    if let (false, Some(found)) = (cfg.resume, latest.as_ref().or(finished.exists().then_some(&finished))) {
        return Err(Error::Training(format!(
            "{} holds a checkpoint or an adapter of an earlier run ({}); resume it (`--resume`), or choose a new output directory",
            cfg.output_dir.display(),
            found.display()
        )));
    }
    let mut trainer = Trainer::new(model, cfg.steps, lr_scale)?;
    super::configure_trainer(&mut trainer, model, adapter)?;
    let mut state = TrainerState {
        step: 0,
        total_steps: cfg.steps.total_steps,
        data_position: Default::default(),
        optimizer_t: 0,
        best_eval_loss: None,
        seed: cfg.seed,
    };
    // A checkpoint holds the adapter and AdamW's two moments, in f32; the run keeps up to KEEP + 1
    // of them for a moment, beside the final adapter and `best/`.
    let adapter_bytes: u64 = model.trainable_params().iter().map(|(_, v)| v.elem_count() as u64 * 4).sum();
    let checkpoint_bytes = 3 * adapter_bytes;
    crate::fsutil::require_space(
        &cfg.output_dir,
        (super::checkpoint::KEEP as u64 + 1) * checkpoint_bytes + 2 * adapter_bytes,
        "this run's checkpoints and adapters",
    )?;
    let metrics_path = cfg.output_dir.join("metrics.jsonl");
    if let Some(dir) = latest.filter(|_| cfg.resume) {
        state = load_checkpoint(&dir, model, &mut trainer)?;
        tracing::info!("resumed from {} at step {}", dir.display(), state.step);
    }
    // Lines past the checkpoint (or, with none, every line of a run killed before its first one)
    // are replayed from here on.
    truncate_metrics(&metrics_path, state.step)?;
    let mut batches = BatchIter::new(train_set, cfg.micro_batch_size, cfg.pad_id, cfg.seed)?.with_position(state.data_position)?;
    let val_batches = val_set
        .chunks(cfg.micro_batch_size)
        .map(|rows| to_train_batch(&Batch::collate(&rows.iter().collect::<Vec<_>>(), cfg.pad_id, 8)?, model.device()))
        .collect::<Result<Vec<_>>>()?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .at(&metrics_path)?;
    let bar = progress_bar(cfg.steps.total_steps, state.step, cfg.progress);
    let start = Instant::now();
    let mut summary = RunSummary {
        steps: 0,
        first_loss: None,
        last_loss: None,
        last_eval_loss: None,
        tokens: 0,
        seconds: 0.0,
        tokens_per_second: 0.0,
        peak_rss_mib: None,
        gpu_peak_extra_mib: None,
    };
    let gpu = crate::memory::GpuMemory::start(model.device())?;
    while trainer.step < cfg.steps.total_steps {
        let micro = (0..accum)
            .map(|_| to_train_batch(&batches.next().expect("BatchIter is endless")?, model.device()))
            .collect::<Result<Vec<_>>>()?;
        let stats = trainer.step(model, &micro)?;
        summary.tokens += stats.tokens;
        summary.first_loss.get_or_insert(stats.loss);
        summary.last_loss = Some(stats.loss);
        let elapsed = start.elapsed().as_secs_f64();
        let tps = summary.tokens as f64 / elapsed.max(1e-9);
        log_line(&mut metrics, &serde_json::json!({
            "step": stats.step, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
            "tokens": stats.tokens, "tokens_per_s": tps, "elapsed_s": elapsed,
        }))?;
        bar.set_message(format!("loss {:.4} lr {:.2e} {:.0} tok/s", stats.loss, stats.lr, tps));
        bar.inc(1);
        let last = trainer.step == cfg.steps.total_steps;
        if !val_batches.is_empty() && cfg.eval_steps > 0 && (trainer.step % cfg.eval_steps == 0 || last) {
            let loss = eval_loss(model, &val_batches)?;
            if !loss.is_finite() {
                return Err(Error::Training(format!(
                    "held-out loss {loss} after step {}: the run diverged; the last checkpoint in {} is whole",
                    trainer.step,
                    cfg.output_dir.display()
                )));
            }
            summary.last_eval_loss = Some(loss);
            log_line(&mut metrics, &serde_json::json!({ "step": trainer.step, "eval_loss": loss }))?;
            bar.println(format!("step {}: eval loss {loss:.4}", trainer.step));
            if state.best_eval_loss.is_none_or(|b| loss < b) {
                state.best_eval_loss = Some(loss);
                save_adapter(model, adapter, &cfg.output_dir.join("best"), cfg.base_model.as_deref())?;
            }
        }
        if (cfg.save_steps > 0 && trainer.step % cfg.save_steps == 0) || last {
            state.step = trainer.step;
            state.data_position = batches.position();
            state.optimizer_t = trainer.optimizer.t;
            crate::fsutil::require_space(&cfg.output_dir, checkpoint_bytes, &format!("the checkpoint of step {}", state.step))?;
            save_numbered_checkpoint(&cfg.output_dir, model, adapter, &trainer, &state, cfg.base_model.as_deref())?;
        }
    }
    bar.finish_and_clear();
    save_adapter(model, adapter, &cfg.output_dir, cfg.base_model.as_deref())?;
    summary.steps = trainer.step;
    summary.seconds = start.elapsed().as_secs_f64();
    summary.tokens_per_second = summary.tokens as f64 / summary.seconds.max(1e-9);
    summary.peak_rss_mib = crate::memory::proc_status_mib("VmHWM").ok();
    summary.gpu_peak_extra_mib = gpu.map(crate::memory::GpuMemory::finish).transpose()?;
    Ok(summary)
}

/// Keep only the metrics of the steps up to `step` (those a resumed run does not replay), so
/// that the file reads as one uninterrupted run. A line that is not JSON with a `step` (a write
/// cut by a crash) is dropped too.
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
                .is_some_and(|s| s as usize <= step)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    crate::fsutil::write_file_atomic(path, kept.as_bytes())
}

fn log_line(file: &mut std::fs::File, value: &serde_json::Value) -> Result<()> {
    writeln!(file, "{value}").map_err(|source| Error::Io { path: PathBuf::from("metrics.jsonl"), source })
}

fn progress_bar(total: usize, done: usize, visible: bool) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_position(done as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
            .expect("valid progress template"),
    );
    bar
}

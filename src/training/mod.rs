//! Training: AdamW and its schedule, the optimizer step (with gradient checkpointing), the loop
//! with checkpoints.

pub mod checkpoint;
pub mod gradient_checkpointing;
pub mod optim;
pub mod run;
pub mod step;
pub mod vision;

pub use optim::{AdamW, AdamWConfig};
pub use gradient_checkpointing::LayerTape;
pub use crate::adapters::StepHook;
pub use crate::model::TrainBatch;
pub use step::{causal_lm_loss, causal_lm_loss_from_hidden, eval_loss, StepConfig, StepStats, Trainer};

use crate::adapters::AdapterConfig;
use crate::model::Llama;
use crate::Result;

/// What a method adds to the Trainer beyond AdamW on its parameters (AdaLoRA's regulariser and
/// rank allocator, SIFT's index selection, GaLore's projection). Call right after `Trainer::new`
/// (before restoring a checkpoint: GaLore's moments have the projected shape).
pub fn configure_trainer(trainer: &mut Trainer, model: &Llama, cfg: &AdapterConfig) -> Result<()> {
    let extras = cfg.training_extras(model, trainer.config.total_steps)?;
    trainer.hooks.extend(extras.hooks);
    if let Some(g) = extras.galore {
        trainer.optimizer.enable_galore(|name| name.ends_with(".weight"), g)?;
    }
    Ok(())
}

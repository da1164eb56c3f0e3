//! Training: AdamW and its schedule, the optimizer step (with gradient checkpointing), the loop
//! with checkpoints.

pub mod checkpoint;
pub mod gradient_checkpointing;
pub mod optim;
pub mod run;
pub mod step;

pub use optim::{AdamW, AdamWConfig};
pub use gradient_checkpointing::LayerTape;
pub use crate::adapters::StepHook;
pub use crate::model::TrainBatch;
pub use step::{causal_lm_loss, causal_lm_loss_from_hidden, eval_loss, StepConfig, StepStats, Trainer};

use crate::adapters::{AdaLoraHook, AdapterConfig, FullConfig, SiftHook};
use crate::model::Llama;
use crate::Result;

/// What a method adds to the Trainer beyond AdamW on its parameters: AdaLoRA's regulariser and
/// rank allocator, SIFT's index selection, GaLore's projection. Call right after `Trainer::new`
/// (before restoring a checkpoint: GaLore's moments have the projected shape).
pub fn configure_trainer(trainer: &mut Trainer, model: &Llama, cfg: &AdapterConfig) -> Result<()> {
    match cfg {
        AdapterConfig::AdaLora(c) => {
            // The trainer knows the number of steps: PEFT needs it as `total_step`.
            let mut c = c.clone();
            c.total_step.get_or_insert(trainer.config.total_steps);
            trainer.hooks.push(Box::new(AdaLoraHook::new(model, &c)?));
        }
        AdapterConfig::Sift(_) => trainer.hooks.push(Box::new(SiftHook::new(model))),
        AdapterConfig::Full(FullConfig { galore: Some(g), .. }) => {
            trainer.optimizer.enable_galore(|name| name.ends_with(".weight"), *g)?;
        }
        _ => {}
    }
    Ok(())
}


//! Training: AdamW and its schedule, the optimizer step (with gradient checkpointing), the loop
//! with checkpoints.

pub mod checkpoint;
pub mod galore;
pub mod gradient_checkpointing;
pub mod optim;
pub mod run;
pub mod step;

pub use optim::{AdamW, AdamWConfig};
pub use gradient_checkpointing::LayerTape;
pub use step::{causal_lm_loss, causal_lm_loss_from_hidden, eval_loss, StepConfig, StepHook, StepStats, TrainBatch, Trainer};

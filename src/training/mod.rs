//! Training: AdamW and its schedule, the optimizer step, the loop with checkpoints.

pub mod checkpoint;
pub mod galore;
pub mod optim;
pub mod run;
pub mod step;

pub use optim::{AdamW, AdamWConfig};
pub use step::{causal_lm_loss, eval_loss, StepConfig, StepHook, StepStats, TrainBatch, Trainer};

//! The flags of `finetune`: the method and its flags (`adapters::flags::AdapterArgs`, made from
//! the method table), the run, and their ranges.

use std::path::PathBuf;

use clap::Args;

use crate::validate;
use super::ModelArgs;
pub use crate::adapters::flags::AdapterArgs;
use crate::error::{Error, Result};

#[derive(Args, Debug, Clone)]
pub struct FinetuneArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub adapter: AdapterArgs,
    /// LLM-Adapters JSON: a list of {instruction, input, output, answer}.
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long, default_value = "out")]
    pub output_dir: PathBuf,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 4)]
    pub micro_batch_size: usize,
    #[arg(long, default_value_t = 3.0)]
    pub num_epochs: f64,
    /// Stop after this many optimizer steps (overrides the epochs).
    #[arg(long)]
    pub max_steps: Option<usize>,
    #[arg(long, default_value_t = 3e-4)]
    pub learning_rate: f64,
    /// EfficientFT's rule: the value projection's adapters learn at `lr_ratio_v` times the rate.
    #[arg(long, default_value_t = 1.0)]
    pub lr_ratio_v: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 100)]
    pub warmup_steps: usize,
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Gradient checkpointing: keep only each decoder layer's input and recompute the layer in
    /// backward (much less activation memory, one more forward per step).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub gradient_checkpointing: bool,
    #[arg(long, default_value_t = 256)]
    pub cutoff_len: usize,
    #[arg(long, default_value_t = 120)]
    pub val_set_size: usize,
    #[arg(long, default_value_t = 80)]
    pub eval_steps: usize,
    #[arg(long, default_value_t = 80)]
    pub save_steps: usize,
    /// Compute the loss on the prompt too (the recipe's default).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub train_on_inputs: bool,
    #[arg(long, default_value_t = 0)]
    pub pad_token_id: u32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Continue from the newest checkpoint in output_dir/checkpoints when there is one.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub resume: bool,
    /// Use only the first N examples of the data file.
    #[arg(long)]
    pub limit: Option<usize>,
}

impl FinetuneArgs {
    /// Every number within its range, before the model or the data is read.
    pub fn validate(&self) -> Result<()> {
        use validate::{int_in, positive, real_in};
        const MANY: usize = 1 << 30;
        self.adapter.to_config()?;
        int_in("batch-size", self.batch_size, 1, MANY)?;
        int_in("micro-batch-size", self.micro_batch_size, 1, self.batch_size)?;
        if !self.batch_size.is_multiple_of(self.micro_batch_size) {
            return Err(Error::msg(format!(
                "--batch-size {} must be a multiple of --micro-batch-size {}",
                self.batch_size, self.micro_batch_size
            )));
        }
        positive("num-epochs", self.num_epochs, 1e4)?;
        if let Some(steps) = self.max_steps {
            int_in("max-steps", steps, 1, MANY)?;
        }
        positive("learning-rate", self.learning_rate, 10.0)?;
        positive("lr-ratio-v", self.lr_ratio_v, 1e6)?;
        real_in("weight-decay", self.weight_decay, (0.0, true), (1e3, true))?;
        int_in("warmup-steps", self.warmup_steps, 0, MANY)?;
        positive("max-grad-norm", self.max_grad_norm, 1e12)?;
        int_in("cutoff-len", self.cutoff_len, 2, 1 << 20)
    }
}

//! The flags of `finetune`: the method and its options (read through the method table,
//! `adapters::registry`), the run, and their ranges.

use std::path::PathBuf;

use clap::Args;

use super::{validate, ModelArgs};
use crate::adapters::registry::{self, MethodOptions};
use crate::adapters::AdapterConfig;
use crate::error::{Error, Result};

/// The adapter to train, PEFT-style.
#[derive(Args, Debug, Clone)]
pub struct AdapterArgs {
    /// The method (`adapters::registry::METHODS`).
    #[arg(long, default_value = "lora", value_parser = method_names())]
    pub method: String,
    #[arg(long, default_value_t = 8)]
    pub r: usize,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f64,
    /// Module names (matched against the end of the module path).
    #[arg(long, value_delimiter = ',', default_value = "q_proj,k_proj,v_proj,up_proj,down_proj")]
    pub target_modules: Vec<String>,
    /// IA3: the targets whose input (not output) is scaled.
    #[arg(long, value_delimiter = ',', default_value = "down_proj")]
    pub feedforward_modules: Vec<String>,
    /// Control methods: rank of the control across the MLP block.
    #[arg(long, default_value_t = 64)]
    pub control_rank: usize,
    #[arg(long, default_value_t = 1.0)]
    pub control_alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    pub control_dropout: f64,
    /// Double Control: rank of the control across the attention block.
    #[arg(long, default_value_t = 64)]
    pub double_control_rank: usize,
    /// Nonlinear control: normalise its input with the layer's post-attention RMSNorm.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub stable_mode: bool,
    /// AdaLoRA: initial rank per layer (default 3·r, as EfficientFT) and final average rank (default r).
    #[arg(long)]
    pub adalora_init_r: Option<usize>,
    #[arg(long)]
    pub adalora_target_r: Option<usize>,
    /// SIFT: fraction of each targeted weight's entries that is trained.
    #[arg(long, default_value_t = 0.2)]
    pub sparse_rate: f64,
    /// SNELL: number of distance-kernel heads (must divide r).
    #[arg(long, default_value_t = 2)]
    pub snell_heads: usize,
    /// SNELL: quantile of |ΔW| under which entries are dropped, in [0, 1) (0: KLoRA).
    #[arg(long, default_value_t = 0.5)]
    pub sparsity: f64,
    /// GaLore: projection rank (default r), refresh gap and scale.
    #[arg(long)]
    pub galore_rank: Option<usize>,
    #[arg(long, default_value_t = 500)]
    pub galore_update_proj_gap: usize,
    #[arg(long, default_value_t = 4.0)]
    pub galore_scale: f64,
}

impl AdapterArgs {
    /// Every number within its range (the ranks against the model's widths are checked where
    /// the adapter is built, before anything is allocated).
    pub fn validate(&self) -> Result<()> {
        use validate::{dropout, int_in, positive, real_in};
        const RANK: usize = 1 << 16;
        int_in("r", self.r, 1, RANK)?;
        positive("lora-alpha", self.lora_alpha, 1e6)?;
        dropout("lora-dropout", self.lora_dropout)?;
        int_in("control-rank", self.control_rank, 1, RANK)?;
        real_in("control-alpha", self.control_alpha, (-1e6, true), (1e6, true))?;
        dropout("control-dropout", self.control_dropout)?;
        int_in("double-control-rank", self.double_control_rank, 1, RANK)?;
        if let Some(r) = self.adalora_init_r {
            int_in("adalora-init-r", r, 1, RANK)?;
        }
        if let Some(r) = self.adalora_target_r {
            int_in("adalora-target-r", r, 1, RANK)?;
        }
        real_in("sparse-rate", self.sparse_rate, (0.0, false), (1.0, true))?;
        int_in("snell-heads", self.snell_heads, 1, self.r.max(1))?;
        real_in("sparsity", self.sparsity, (0.0, true), (1.0, false))?;
        if let Some(r) = self.galore_rank {
            int_in("galore-rank", r, 1, RANK)?;
        }
        int_in("galore-update-proj-gap", self.galore_update_proj_gap, 1, usize::MAX)?;
        positive("galore-scale", self.galore_scale, 1e6)
    }

    /// The options the method table reads (`adapters::registry`).
    pub fn options(&self) -> MethodOptions {
        MethodOptions {
            r: self.r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: self.target_modules.clone(),
            feedforward_modules: self.feedforward_modules.clone(),
            control_rank: self.control_rank,
            control_alpha: self.control_alpha,
            control_dropout: self.control_dropout,
            double_control_rank: self.double_control_rank,
            stable_mode: self.stable_mode,
            adalora_init_r: self.adalora_init_r,
            adalora_target_r: self.adalora_target_r,
            sparse_rate: self.sparse_rate,
            snell_heads: self.snell_heads,
            sparsity: self.sparsity,
            galore_rank: self.galore_rank,
            galore_update_proj_gap: self.galore_update_proj_gap,
            galore_scale: self.galore_scale,
        }
    }

    pub fn to_config(&self) -> Result<AdapterConfig> {
        self.validate()?;
        (registry::method(&self.method)?.config)(&self.options())
    }
}

/// `--method`'s values and their help, from the method table.
fn method_names() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(registry::METHODS.iter().map(|m| clap::builder::PossibleValue::new(m.name).help(m.summary)))
}

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
        self.adapter.validate()?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct OnlyAdapter {
        #[command(flatten)]
        adapter: AdapterArgs,
    }

    /// The method table's defaults are the flags' defaults: one cannot drift from the other.
    #[test]
    fn the_flags_defaults_are_the_method_tables() {
        let parsed = OnlyAdapter::parse_from(["candle-peft"]);
        assert_eq!(parsed.adapter.options(), MethodOptions::default());
    }
}

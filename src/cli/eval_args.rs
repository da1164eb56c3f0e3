//! The flags of `eval`, `generate`, `merge` and `convert`.

use std::path::PathBuf;

use clap::Args;

use super::{validate, ModelArgs};
use crate::error::Result;

#[derive(Args, Debug, Clone)]
pub struct GenerationArgs {
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// 1 is greedy; the protocol uses 4.
    #[arg(long, default_value_t = 1)]
    pub num_beams: usize,
}

impl GenerationArgs {
    pub fn validate(&self) -> Result<()> {
        validate::int_in("num-beams", self.num_beams, 1, 64)?;
        validate::int_in("max-new-tokens", self.max_new_tokens, 0, 1 << 20)
    }
}

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An adapter directory or hub repo id.
    #[arg(long)]
    pub adapter: Option<String>,
    /// The folder holding <task>/test.json.
    #[arg(long, default_value = "dataset")]
    pub dataset_dir: PathBuf,
    /// Tasks to evaluate (default: all 8).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    #[command(flatten)]
    pub generation: GenerationArgs,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Evaluate only the first N questions of each task.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Write the accuracy table as JSON here (with `.predictions.json` and `.png` beside it).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Replace the files of `--output` when they exist (refused otherwise).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub overwrite: bool,
}

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub adapter: Option<String>,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat format (ChatML for SmolLM2-Instruct).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub chat: bool,
    #[command(flatten)]
    pub generation: GenerationArgs,
}

#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub adapter: String,
    #[arg(long)]
    pub output: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct ConvertArgs {
    #[arg(long)]
    pub gguf: PathBuf,
    #[arg(long)]
    pub output: PathBuf,
}

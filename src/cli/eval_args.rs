//! The flags of `eval`, `generate`, `chat`, `merge` and `convert`.

use std::path::PathBuf;

use clap::Args;

use crate::validate;
use super::ModelArgs;
use crate::error::Result;
use crate::eval::generate::sampling::SamplingConfig;

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
    #[command(flatten)]
    pub adapter_dtype: super::AdapterDtypeArgs,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template (ChatML when the model has none).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub chat: bool,
    /// With --chat: a system message before the prompt.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub generation: GenerationArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Sampling (with --num-beams 1) and where an answer ends.
#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// 0 is greedy decoding; above 0 samples (transformers' processors, in its order).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample among the k most likely tokens (0 = off; 1 = greedy).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample among the most likely tokens that make up this probability (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop tokens less likely than this times the most likely one (0 = off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Divide (or multiply, when negative) the logits of tokens already in the text by this (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// The same seed, model and prompt give the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// End the answer before this text (repeat the flag for several).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    pub fn config(&self) -> Result<SamplingConfig> {
        let c = SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        };
        c.validate()?;
        if c.temperature == 0.0 && (c.top_k > 1 || c.top_p < 1.0 || c.min_p > 0.0) {
            eprintln!("note: --temperature 0 is greedy decoding; --top-k, --top-p and --min-p apply when it is above 0");
        }
        Ok(c)
    }

    /// Whether anything beyond greedy decoding was asked for (beam search has none of it).
    pub fn is_set(&self) -> bool {
        self.temperature != 0.0 || self.top_k != 0 || self.top_p != 1.0 || self.min_p != 0.0 || self.repetition_penalty != 1.0
    }
}

#[derive(Args, Debug, Clone)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub adapter: Option<String>,
    #[command(flatten)]
    pub adapter_dtype: super::AdapterDtypeArgs,
    /// A system message at the start of the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// At most this many tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
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

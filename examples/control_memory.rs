//! What one training step keeps, per method, on a SmolLM2-135M-shaped model with random weights
//! (f32, CPU): trainable parameters, step time, and the process's peak RSS (VmHWM).
//!
//! One method per process, so that the peaks do not mix:
//!
//! ```text
//! cargo run --release --example control_memory -- lora|control|double_control [batch] [seq]
//! ```
//!
//! lora: LoRA r32 (α 64) on q,k,v,up,down; control: Parallel Control r64; double_control:
//! Double Control r64/r64. Dropout 0 everywhere, so no method keeps a dropout mask.
//!
//! Its figures, with device and date, are in docs/BENCHMARKS.md.
//!
//! candle keeps every input of every tracked op, so all three keep the frozen blocks' activations
//! (attention scores and softmax stages, MLP hidden states: most of the ~9 GiB). The difference is
//! what each method adds: per adapted linear, LoRA keeps the base output, the rank-r product, the
//! unscaled and scaled branch (3 tensors of the output width: 3 x 3072 floats per token per layer
//! for q,k,v,up,down), and with LoRA on q,k,v the first layer's attention is tracked too; a
//! control keeps 3 tensors of width 576 per block.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use candle_peft::adapters::{inject, AdapterConfig, ControlConfig, LoraConfig, Targets};
use candle_peft::model::{Llama, LlamaConfig};
use candle_peft::training::{AdamWConfig, StepConfig, TrainBatch, Trainer};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn method(name: &str) -> anyhow::Result<AdapterConfig> {
    let control = |double_control| ControlConfig { double_control, ..ControlConfig::default() };
    Ok(match name {
        "lora" => AdapterConfig::new(LoraConfig {
            r: 32,
            lora_alpha: 64.0,
            lora_dropout: 0.0,
            target_modules: Targets::List(["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"].map(String::from).to_vec()),
            use_rslora: false,
            use_dora: false,
        }),
        "control" => AdapterConfig::new(control(false)),
        "double_control" => AdapterConfig::new(control(true)),
        other => bail!("unknown method `{other}` (lora, control, double_control)"),
    })
}

/// A field of /proc/self/status in MiB (VmRSS, VmHWM).
fn proc_status_mib(field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with(field)).with_context(|| format!("no {field} in /proc/self/status"))?;
    let kib: f64 = line.split_whitespace().nth(1).context("malformed line")?.parse()?;
    Ok(kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    candle_peft::alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map_or("control", String::as_str);
    let b: usize = args.get(2).map_or(Ok(4), |s| s.parse())?;
    let t: usize = args.get(3).map_or(Ok(256), |s| s.parse())?;
    let mut model = Llama::random(LlamaConfig::smollm2_135m(), 0, DType::F32, &Device::Cpu)?;
    inject(&mut model, &method(name)?, 0)?;
    let trainable: usize = model.trainable_params().iter().map(|(_, v)| v.elem_count()).sum();

    let mut rng = StdRng::seed_from_u64(1);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(3..49152)).collect();
    let input_ids = Tensor::from_vec(ids, (b, t), &Device::Cpu)?;
    let labels = input_ids.to_dtype(DType::I64)?;
    let batch = TrainBatch { input_ids, mask: vec![vec![1; t]; b], labels };
    let step = StepConfig { optim: AdamWConfig::default(), warmup_steps: 0, total_steps: 2, max_grad_norm: Some(1.0), gradient_checkpointing: false };
    let mut trainer = Trainer::new(&model, step, |_| 1.0)?;

    let before = proc_status_mib("VmRSS:")?;
    let mut times = Vec::new();
    for _ in 0..2 {
        let start = Instant::now();
        trainer.step(&model, std::slice::from_ref(&batch))?;
        times.push(start.elapsed().as_secs_f64());
    }
    let peak = proc_status_mib("VmHWM:")?;
    println!(
        "{name}: batch {b}x{t}, trainable {trainable}, step {:.2}s / {:.2}s, RSS before {before:.0} MiB, \
         peak {peak:.0} MiB, step peak over before {:.0} MiB",
        times[0],
        times[1],
        peak - before
    );
    Ok(())
}

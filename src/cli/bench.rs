//! `bench methods`: a few training steps of every method on the same model and batch, one fresh
//! process per method (so that each peak is its own), reporting trainable parameters, optimizer
//! state, peak memory over the loaded model and step time, as a table and JSON.

use std::time::Instant;

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::{BenchMethodsArgs, BenchStepArgs};
use crate::adapters::inject;
use crate::adapters::registry::{self, Method, METHODS};
use crate::training::configure_trainer;
use crate::error::{Error, Result};
use crate::memory::{proc_status_mib, reset_peak_rss, GpuMemory};
use crate::model::{Llama, LlamaConfig};
use crate::training::{AdamWConfig, StepConfig, TrainBatch, Trainer};


#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodReport {
    pub method: String,
    pub trainable_params: usize,
    pub optimizer_state_bytes: usize,
    /// Peak resident memory over the resident memory once the model was loaded.
    pub peak_extra_mib: f64,
    pub peak_rss_mib: f64,
    /// On CUDA: the peak of device memory in use over its level once the model was loaded
    /// (sampled every millisecond: candle keeps no allocator statistics).
    #[serde(default)]
    pub gpu_peak_extra_mib: Option<f64>,
    /// On CUDA: device memory in use once the model and the adapter were loaded (the peak of the
    /// step is this plus `gpu_peak_extra_mib`).
    #[serde(default)]
    pub gpu_loaded_mib: Option<f64>,
    /// Mean over the steps after the first (the first one also pays for first-touch allocations).
    pub step_seconds: f64,
    pub tokens_per_second: f64,
    pub first_loss: f64,
    pub last_loss: f64,
    /// The kernels the step ran: "unfused" (`--unfused`) or the fused attention's, "flash" or
    /// "gemm" (`--attention-kernel`).
    #[serde(default)]
    pub kernels: String,
    /// `bench/cpu_anchor.py`'s figures, when `--anchor-python` ran it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<serde_json::Value>,
}

pub(crate) fn shape(name: &str) -> Result<LlamaConfig> {
    match name {
        "smollm2" => Ok(LlamaConfig::smollm2_135m()),
        "llama2-7b" => Ok(LlamaConfig::llama2_7b()),
        "tiny" => Ok(LlamaConfig::tiny(512)),
        other => Err(Error::msg(format!("unknown shape `{other}` (smollm2, llama2-7b, tiny)"))),
    }
}

fn random_batch(vocab: usize, b: usize, t: usize, seed: u64, device: &Device) -> Result<TrainBatch> {
    let mut rng = StdRng::seed_from_u64(seed);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(3..vocab as u32)).collect();
    let labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    Ok(TrainBatch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        mask: vec![vec![1; t]; b],
        labels: Tensor::from_vec(labels, (b, t), device)?,
    })
}

/// One method in this process: prints its report as one JSON line.
pub fn step(args: &BenchStepArgs) -> Result<()> {
    args.run.validate()?;
    if args.run.shape == "vit-s14" {
        return vit_step(args);
    }
    let device = super::parse_device(&args.run.device)?;
    let quantize = args.run.quantize.as_deref().map(str::parse).transpose()?;
    let mut config = shape(&args.run.shape)?;
    if let Some(layers) = args.run.layers {
        config.num_hidden_layers = layers;
    }
    let (activations, base) = crate::loading::training_dtypes(super::parse_dtype(&args.run.dtype)?, &device);
    let mut model = Llama::random_with(config, 0, activations, &device, quantize)?;
    model.set_frozen_linear_dtype(base)?;
    let batch = random_batch(model.config.vocab_size, args.run.batch, args.run.seq, 1, &device)?;
    let mut adapter = args.adapter.to_config()?;
    inject(&mut model, &adapter, 0)?;
    // The baseline is taken before EVA's init: the allocator keeps what the init freed (purging
    // is off), so the training steps reuse it and only a baseline from before shows their
    // footprint. Then the peak (VmHWM) is reset to the current RSS, so that the load's
    // transients do not count (Linux ≥ 4.0; where refused, the peak is since start).
    let baseline = proc_status_mib("VmRSS")?;
    if adapter.init_batches() > 0 {
        adapter.initialize_from_data(&mut model, std::slice::from_ref(&batch), 0)?;
    }
    reset_peak_rss();
    let gpu = GpuMemory::start(&device)?;
    let steps = StepConfig { optim: AdamWConfig { lr: 1e-4, ..Default::default() }, warmup_steps: 0, total_steps: args.run.steps, max_grad_norm: Some(1.0), gradient_checkpointing: args.run.gradient_checkpointing };
    let mut trainer = Trainer::new(&model, steps, |_| 1.0)?;
    configure_trainer(&mut trainer, &model, &adapter)?;
    let (step_seconds, losses) = timed_steps(args.run.steps, || Ok(trainer.step(&model, std::slice::from_ref(&batch))?.loss))?;
    let optimizer_state_bytes = trainer.optimizer.state_tensors()?.values().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum();
    let peak = proc_status_mib("VmHWM")?;
    let gpu_loaded_mib = gpu.as_ref().map(GpuMemory::baseline_mib);
    let gpu_peak_extra_mib = gpu.map(GpuMemory::finish).transpose()?;
    let mut report = MethodReport {
        method: args.adapter.method.clone(),
        trainable_params: model.trainable_params().iter().map(|(_, v)| v.elem_count()).sum(),
        optimizer_state_bytes,
        peak_extra_mib: peak - baseline,
        peak_rss_mib: peak,
        gpu_peak_extra_mib,
        gpu_loaded_mib,
        step_seconds,
        tokens_per_second: (args.run.batch * args.run.seq) as f64 / step_seconds,
        first_loss: losses[0],
        last_loss: *losses.last().unwrap_or(&f64::NAN),
        kernels: kernels_in_use(),
        anchor: None,
    };
    if let (Some(python), Some(dir)) = (&args.anchor_python, &args.anchor_model) {
        let anchor = super::bench_decode::run_anchor(python, "cpu_anchor.py", &[&dir.display().to_string()])?;
        eprintln!("{}", anchor_line(&report, &anchor, anchor_recipe(args)?));
        report.anchor = Some(anchor);
    }
    println!("{}", serde_json::to_string(&report).map_err(|e| Error::msg(e.to_string()))?);
    Ok(())
}

/// `steps` optimizer steps, each returning its loss: the mean seconds of a step after the first
/// (the first also pays for first-touch allocations), and the losses.
fn timed_steps(steps: usize, mut step: impl FnMut() -> Result<f64>) -> Result<(f64, Vec<f64>)> {
    let (mut times, mut losses) = (Vec::new(), Vec::new());
    for _ in 0..steps {
        let start = Instant::now();
        losses.push(step()?);
        times.push(start.elapsed().as_secs_f64());
    }
    let later = if times.len() > 1 { &times[1..] } else { &times[..] };
    Ok((later.iter().sum::<f64>() / later.len().max(1) as f64, losses))
}

/// One method on DINOv2 ViT-S/14's shape with random weights (`--shape vit-s14`): `--batch`
/// random images of `--seq` x `--seq` pixels, 10 classes, the method's adapters and a linear head
/// trained by `training::vision`; the report's tokens are each image's patches and its CLS.
fn vit_step(args: &BenchStepArgs) -> Result<()> {
    use crate::model::vit::{Vit, VitConfig};
    use crate::training::vision::{Trainer as VisionTrainer, VisionConfig};
    let run = &args.run;
    if run.device != "cpu" || run.dtype != "f32" || run.quantize.is_some() || run.gradient_checkpointing || args.anchor_python.is_some() {
        return Err(Error::msg("--shape vit-s14 runs on the CPU in f32 only, without --quantize, --gradient-checkpointing or an anchor"));
    }
    let mut config = VitConfig::dinov2_small();
    if let Some(layers) = run.layers {
        config.depth = layers;
    }
    let (side, p) = (run.seq, config.patch_size);
    if !side.is_multiple_of(p) {
        return Err(Error::msg(format!("--seq {side}: the images' side must be a multiple of the patch size {p}")));
    }
    let device = Device::Cpu;
    let mut vit = Vit::random(config, 0, &device)?;
    let x = Tensor::randn(0f32, 1.0, (run.batch, 3, side, side), &device)?;
    let y = Tensor::from_vec((0..run.batch).map(|i| (i % 10) as u32).collect::<Vec<_>>(), run.batch, &device)?;
    let adapter = args.adapter.to_config()?;
    let cfg = VisionConfig { lr: 1e-4, ..Default::default() };
    let mut trainer = VisionTrainer::new(&mut vit, &adapter, 10, &cfg, &mut StdRng::seed_from_u64(0))?;
    let baseline = proc_status_mib("VmRSS")?;
    reset_peak_rss();
    let (step_seconds, losses) = timed_steps(run.steps, || trainer.step(&vit, &x, &y, cfg.lr))?;
    let peak = proc_status_mib("VmHWM")?;
    let report = MethodReport {
        method: args.adapter.method.clone(),
        trainable_params: trainer.trainable_params(),
        optimizer_state_bytes: trainer.optimizer.state_tensors()?.values().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum(),
        peak_extra_mib: peak - baseline,
        peak_rss_mib: peak,
        gpu_peak_extra_mib: None,
        gpu_loaded_mib: None,
        step_seconds,
        tokens_per_second: (run.batch * (1 + (side / p) * (side / p))) as f64 / step_seconds,
        first_loss: losses[0],
        last_loss: *losses.last().unwrap_or(&f64::NAN),
        kernels: kernels_in_use(),
        anchor: None,
    };
    println!("{}", serde_json::to_string(&report).map_err(|e| Error::msg(e.to_string()))?);
    Ok(())
}

/// Whether this run's step is the anchor's recipe (LoRA r 32, alpha 64 on q,k,v,up,down, SmolLM2's
/// shape, batch 4 x 256, on the CPU, f32 or bf16 (the mixed precision the anchor's autocast
/// row runs)): only then is the ratio like for like.
fn anchor_recipe(args: &BenchStepArgs) -> Result<bool> {
    let cfg = args.adapter.to_config()?;
    let targets = crate::adapters::Targets::List(["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"].map(String::from).to_vec());
    let lora = cfg.downcast_ref::<crate::adapters::LoraConfig>().is_some_and(|c| c.r == 32 && c.lora_alpha == 64.0 && !c.use_rslora && !c.use_dora && c.target_modules == targets);
    let run = &args.run;
    Ok(lora && run.shape == "smollm2" && run.layers.is_none() && run.batch == 4 && run.seq == 256 && matches!(run.dtype.as_str(), "f32" | "bf16") && run.device == "cpu" && run.quantize.is_none())
}

/// This run's tokens/s beside the anchor's, f32 and bf16 autocast, with the ratios.
fn anchor_line(report: &MethodReport, anchor: &serde_json::Value, same_recipe: bool) -> String {
    let theirs = |key: &str| anchor.get(key).and_then(serde_json::Value::as_f64);
    let ratio = |t: Option<f64>| t.map_or("-".to_string(), |t| format!("{t:.1} tokens/s ({:.2}x)", report.tokens_per_second / t));
    format!(
        "this engine {:.1} tokens/s; PyTorch + PEFT f32 {}, bf16 autocast {}{}",
        report.tokens_per_second,
        ratio(theirs("lora_train_tok_s_bs4x256")),
        ratio(theirs("lora_train_bf16_autocast_tok_s_bs4x256")),
        if same_recipe { "" } else { " (the anchor's recipe differs from this run's: not like for like)" }
    )
}

/// The report's `kernels`.
fn kernels_in_use() -> String {
    if crate::ops::unfused() {
        "unfused".into()
    } else {
        crate::ops::attention_kernel().name().into()
    }
}

/// The global kernel flags of this process, for a child: a flag given to `bench methods` holds
/// for every method it runs.
fn kernel_flags() -> Vec<String> {
    let mut flags = vec!["--attention-kernel".to_string(), crate::ops::attention_kernel().name().into()];
    if crate::ops::unfused() {
        flags.push("--unfused".into());
    }
    flags
}

/// Every method, each in a child process running `bench step`.
pub fn methods(args: &BenchMethodsArgs) -> Result<Vec<MethodReport>> {
    args.run.validate()?;
    if let Some(path) = &args.output {
        crate::fsutil::refuse_to_replace(std::slice::from_ref(path), "--output", args.overwrite)?;
    }
    let methods: Vec<&'static Method> = if args.methods.is_empty() {
        // Every method the shape's model trains.
        let fits = |m: &&'static Method| match args.adapter.config_for(m) {
            Ok(cfg) if args.run.shape == "vit-s14" => crate::training::vision::check_method(&cfg).is_ok(),
            Ok(cfg) => cfg.trains_llama(),
            Err(_) => true,
        };
        METHODS.iter().filter(fits).collect()
    } else {
        args.methods.iter().map(|name| registry::method(name)).collect::<Result<_>>()?
    };
    // Each method's flags in range, and none given that no method run reads.
    args.adapter.check_read_by(&methods)?;
    for method in &methods {
        args.adapter.config_for(method)?;
    }
    let exe = std::env::current_exe().map_err(|e| Error::msg(format!("cannot find this executable: {e}")))?;
    let mut reports = Vec::new();
    for method in methods {
        let name = method.name;
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(kernel_flags()).args(["bench", "step", "--method", name, "--shape", &args.run.shape, "--device", &args.run.device, "--dtype", &args.run.dtype])
            .args(args.run.quantize.iter().flat_map(|q| ["--quantize", q.as_str()]))
            .args(args.run.layers.iter().flat_map(|n| ["--layers".to_string(), n.to_string()]))
            .args(["--batch", &args.run.batch.to_string(), "--seq", &args.run.seq.to_string(), "--steps", &args.run.steps.to_string()])
            .arg(format!("--gradient-checkpointing={}", args.run.gradient_checkpointing))
            .args(args.adapter.given_flags(method));
        let out = cmd.output().map_err(|e| Error::msg(format!("cannot run {}: {e}", exe.display())))?;
        if !out.status.success() {
            return Err(Error::msg(format!("bench step --method {name} failed:\n{}", String::from_utf8_lossy(&out.stderr))));
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let report: MethodReport = serde_json::from_str(line.trim().lines().last().unwrap_or(""))
            .map_err(|e| Error::msg(format!("bench step --method {name}: unreadable report ({e}): {line}")))?;
        eprintln!("{name}: {:.2} s/step, peak +{:.0} MiB", report.step_seconds, report.peak_extra_mib);
        reports.push(report);
    }
    println!("{}", table(&reports, args));
    if let Some(path) = &args.output {
        super::bench_args::write_json(path, &reports)?;
    }
    Ok(reports)
}

fn table(reports: &[MethodReport], args: &BenchMethodsArgs) -> String {
    let mut s = format!(
        "shape {}{}, batch {} x {}, {}, {}{}{}, mean step after the first of {}\n{:<18} {:>12} {:>12} {:>14} {:>14} {:>10} {:>10}\n",
        args.run.shape,
        args.run.layers.map(|n| format!(" ({n} layers)")).unwrap_or_default(),
        args.run.batch,
        args.run.seq,
        args.run.dtype,
        args.run.device,
        args.run.quantize.as_deref().map(|q| format!(", {q} base")).unwrap_or_default(),
        if args.run.gradient_checkpointing { ", gradient checkpointing" } else { "" },
        args.run.steps,
        "method",
        "trainable",
        "optim MiB",
        if args.run.device == "cpu" { "peak +MiB" } else { "GPU peak +MiB" },
        if args.run.device == "cpu" { "peak RSS MiB" } else { "GPU peak MiB" },
        "s/step",
        "tok/s"
    );
    for r in reports {
        s += &format!(
            "{:<18} {:>12} {:>12.1} {:>14.0} {:>14.0} {:>10.3} {:>10.0}\n",
            r.method,
            r.trainable_params,
            r.optimizer_state_bytes as f64 / 1048576.0,
            r.gpu_peak_extra_mib.unwrap_or(r.peak_extra_mib),
            r.gpu_peak_extra_mib.zip(r.gpu_loaded_mib).map_or(r.peak_rss_mib, |(extra, loaded)| extra + loaded),
            r.step_seconds,
            r.tokens_per_second
        );
    }
    s
}

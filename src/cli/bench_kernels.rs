//! `bench kernels`: the fused ops against the unfused candle graph they replace, forward plus
//! backward through candle's autograd (as training runs them), side by side in one process.
//!
//! For the LoRA linear each shape reports the frozen linear (`x Wᵀ` forward and `dx` backward,
//! W constant: the `FrozenMatmulT` op training uses, since candle's matmul would also compute
//! ∂L/∂W), the unfused LoRA (`x Wᵀ + s·(x Aᵀ) Bᵀ` in candle ops, as `--unfused` trains, ∂L/∂W
//! included) and the fused op, with their ratios to the frozen linear and the achieved
//! TFLOP/s. The control branch (`base + α·z Bᵀ`) and DoRA's row norms are compared fused against
//! unfused; NF4 dequantize, the batch-1 GEMV and the few-row matmul report GB/s (ratio: over
//! dequantize-then-matmul with the same x). The training attention on both of its kernels
//! (flash, `kernels/attention.cu`: the [t, s] scores never in memory; gemm,
//! `kernels/attention_gemm.cu`: cuBLAS products, the scores a per-chunk transient) is compared
//! with the candle graph it replaces (cuBLAS matmuls, the scores and probabilities kept for
//! backward) at LLaMA-2-7B's heads. Every timed iteration ends with a device synchronisation;
//! the figure is the median over iterations. The backward is seeded with ones
//! (candle's `backward`), in every variant alike.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use serde::Serialize;

use super::BenchKernelsArgs;
use crate::error::{Error, Result};
use crate::ops;

#[derive(Debug, Clone, Serialize)]
pub struct KernelTiming {
    pub op: String,
    pub shape: String,
    pub variant: String,
    pub ms: f64,
    /// Time over the frozen linear's (LoRA rows) or over the unfused variant's (other ops).
    pub ratio: f64,
    pub tflops: Option<f64>,
    /// NF4 rows: GB/s, counted as `qlora_anchor.py` counts them (dequantize: packed bytes read
    /// plus the bf16 matrix written; GEMV: packed bytes read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbps: Option<f64>,
    /// SNELL rows: the peak memory of one forward + backward over what was in use before it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_extra_mib: Option<f64>,
}

/// Median milliseconds of `f` over `iters` runs after `warmup` runs, each synchronised.
fn time(device: &Device, warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    device.synchronize()?;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = Instant::now();
        f()?;
        device.synchronize()?;
        ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    Ok(ms[ms.len() / 2])
}

fn randn(shape: &[usize], std: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, std as f32, shape, device)?.to_dtype(dtype)?)
}

/// `--dims` as (in, out) pairs.
fn dims(args: &BenchKernelsArgs) -> Result<Vec<(usize, usize)>> {
    args.dims
        .iter()
        .map(|d| {
            let parse = |v: &str| v.parse::<usize>().ok().filter(|&v| v > 0);
            match d.split_once('x').map(|(a, b)| (parse(a), parse(b))) {
                Some((Some(a), Some(b))) => Ok((a, b)),
                _ => Err(Error::msg(format!("--dims: `{d}` is not IN x OUT (e.g. 4096x11008)"))),
            }
        })
        .collect()
}

fn lora_shapes(args: &BenchKernelsArgs) -> Result<Vec<(usize, usize, usize, usize)>> {
    let mut v = Vec::new();
    for (d_in, d_out) in dims(args)? {
        for &r in &args.ranks {
            for &t in &args.tokens {
                v.push((d_in, d_out, r, t));
            }
        }
    }
    Ok(v)
}

/// The frozen linear as training runs it: `x Wᵀ`, and in backward `dx` only. (candle's matmul
/// would also compute ∂L/∂W, one more GEMM of the same size, for a W that is not trained.)
fn frozen_linear(x: &Tensor, w: &crate::quant::BaseWeight) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(crate::ops::fused::FrozenMatmulT { weight: w.clone() })?)
}

fn lora_rows(args: &BenchKernelsArgs, device: &Device, dtype: DType, out: &mut Vec<KernelTiming>) -> Result<()> {
    let (warmup, iters) = (args.warmup, args.iters);
    for (d_in, d_out, r, t) in lora_shapes(args)? {
        let shape = format!("{d_in}x{d_out} r{r} T{t}");
        let x = Var::from_tensor(&randn(&[t, d_in], 1.0, dtype, device)?)?;
        let w = randn(&[d_out, d_in], 0.02, dtype, device)?;
        let a = Var::from_tensor(&randn(&[r, d_in], 0.02, DType::F32, device)?)?;
        let b = Var::from_tensor(&randn(&[d_out, r], 0.02, DType::F32, device)?)?;
        let s = 2.0;
        let base: crate::quant::BaseWeight = w.clone().into();
        let frozen_step = || -> Result<()> {
            frozen_linear(x.as_tensor(), &base)?.backward()?;
            Ok(())
        };
        let frozen = time(device, warmup, iters, frozen_step)?;
        let frozen_mem = crate::memory::peak_extra_mib(device, frozen_step)?;
        let lora = |fused: bool| -> Result<()> {
            let (ac, bc) = (a.as_tensor().to_dtype(dtype)?, b.as_tensor().to_dtype(dtype)?);
            let y = if fused {
                ops::lora_linear(x.as_tensor(), &base, &ac, &bc, s, None)?
            } else {
                let branch = (x.as_tensor().matmul(&ac.t()?)?.matmul(&bc.t()?)? * s)?;
                (x.as_tensor().matmul(&w.t()?)? + branch)?
            };
            y.backward()?;
            Ok(())
        };
        let unfused = time(device, warmup, iters, || lora(false))?;
        let unfused_mem = crate::memory::peak_extra_mib(device, || lora(false))?;
        let fused = time(device, warmup, iters, || lora(true))?;
        let fused_mem = crate::memory::peak_extra_mib(device, || lora(true))?;
        let base_flops = 4.0 * (t * d_in * d_out) as f64;
        let lora_flops = base_flops + 6.0 * (t * r * (d_in + d_out)) as f64;
        for (variant, ms, flops, mib) in [
            ("frozen linear", frozen, base_flops, frozen_mem),
            ("unfused LoRA", unfused, lora_flops, unfused_mem),
            ("fused LoRA", fused, lora_flops, fused_mem),
        ] {
            out.push(KernelTiming {
                op: "lora_linear".into(),
                shape: shape.clone(),
                variant: variant.into(),
                ms,
                ratio: ms / frozen,
                tflops: Some(flops / (ms * 1e-3) / 1e12),
                gbps: None,
                peak_extra_mib: Some(mib),
            });
        }
    }
    Ok(())
}

fn control_rows(args: &BenchKernelsArgs, device: &Device, dtype: DType, out: &mut Vec<KernelTiming>) -> Result<()> {
    let d = dims(args)?.first().map_or(4096, |&(d_in, _)| d_in);
    for &t in &args.tokens {
        let (r, alpha) = (64, 1.0);
        let shape = format!("d{d} r{r} T{t}");
        let base = Var::from_tensor(&randn(&[t, d], 1.0, dtype, device)?)?;
        let z = Var::from_tensor(&randn(&[t, r], 1.0, dtype, device)?)?;
        let b = Var::from_tensor(&randn(&[d, r], 0.02, dtype, device)?)?;
        let run = |fused: bool| -> Result<()> {
            let y = if fused {
                ops::control_branch(base.as_tensor(), z.as_tensor(), b.as_tensor(), alpha)?
            } else {
                (base.as_tensor() + (z.as_tensor().matmul(&b.as_tensor().t()?)? * alpha)?)?
            };
            y.backward()?;
            Ok(())
        };
        let unfused = time(device, args.warmup, args.iters, || run(false))?;
        let fused = time(device, args.warmup, args.iters, || run(true))?;
        for (variant, ms) in [("unfused", unfused), ("fused", fused)] {
            out.push(KernelTiming { op: "control_branch".into(), shape: shape.clone(), variant: variant.into(), ms, ratio: ms / unfused, tflops: None, gbps: None, peak_extra_mib: None });
        }
    }
    Ok(())
}

fn dora_rows(args: &BenchKernelsArgs, device: &Device, dtype: DType, out: &mut Vec<KernelTiming>) -> Result<()> {
    for (cols, rows) in dims(args)? {
        let r = 64;
        let shape = format!("{rows}x{cols} r{r}");
        let w = randn(&[rows, cols], 0.02, dtype, device)?;
        let b = randn(&[rows, r], 0.02, DType::F32, device)?;
        let a = randn(&[r, cols], 0.02, DType::F32, device)?;
        let unfused_step = || -> Result<()> {
            let v = (w.to_dtype(DType::F32)? + (b.matmul(&a)? * 2.0)?)?;
            v.sqr()?.sum(1)?.sqrt()?;
            Ok(())
        };
        let fused_step = || -> Result<()> {
            ops::row_norms(&w, &b, &a, 2.0)?;
            Ok(())
        };
        let unfused = time(device, args.warmup, args.iters, unfused_step)?;
        let fused = time(device, args.warmup, args.iters, fused_step)?;
        let (unfused_mem, fused_mem) = (crate::memory::peak_extra_mib(device, unfused_step)?, crate::memory::peak_extra_mib(device, fused_step)?);
        for (variant, ms, mib) in [("unfused", unfused, unfused_mem), ("fused", fused, fused_mem)] {
            out.push(KernelTiming { op: "dora_row_norms".into(), shape: shape.clone(), variant: variant.into(), ms, ratio: ms / unfused, tflops: None, gbps: None, peak_extra_mib: Some(mib) });
        }
    }
    Ok(())
}

/// Rows of x at which `bench nf4` times the few-row kernel against dequantize-then-matmul.
const NF4_FEW_ROWS: [usize; 5] = [4, 16, 64, 256, 1024];

/// NF4 dequantize, GEMV and the few-row matmul: GB/s of packed weights, and each product against
/// dequantize-then-matmul with the same x (where the crossover of the two lies is what
/// `crate::quant::nf4_kernels::FEW_ROWS_MAX` should follow).
fn nf4_rows(args: &BenchKernelsArgs, device: &Device, dtype: DType, out: &mut Vec<KernelTiming>) -> Result<()> {
    for (cols, rows) in dims(args)? {
        let shape = format!("{rows}x{cols}");
        let w = crate::quant::Nf4Tensor::quantize(&randn(&[rows, cols], 0.02, dtype, &Device::Cpu)?, 64, true)?;
        let w = crate::quant::Nf4Tensor { device: device.clone(), ..w };
        let packed = w.packed.len() as f64;
        let n = w.elem_count() as f64;
        let row = |shape: String, variant: &str, ms: f64, dense: f64, bytes: f64| KernelTiming {
            op: "nf4".into(),
            shape,
            variant: variant.into(),
            ms,
            ratio: ms / dense,
            tflops: None,
            gbps: Some(bytes / (ms * 1e-3) / 1e9),
            peak_extra_mib: None,
        };
        let dequant = time(device, args.warmup, args.iters, || {
            w.dequantize(dtype)?;
            Ok(())
        })?;
        for t in std::iter::once(1).chain(NF4_FEW_ROWS) {
            let x = randn(&[t, cols], 1.0, dtype, device)?;
            let fused = time(device, args.warmup, args.iters, || {
                if t == 1 {
                    crate::quant::nf4_kernels::gemv(&w, &x)?;
                } else {
                    crate::quant::nf4_kernels::matmul_few(&w, &x)?;
                }
                Ok(())
            })?;
            let dense = time(device, args.warmup, args.iters, || {
                x.matmul(&w.dequantize(dtype)?.t()?)?;
                Ok(())
            })?;
            if t == 1 {
                out.push(row(shape.clone(), "dequantize", dequant, dense, packed + n * dtype.size_in_bytes() as f64));
            }
            let shape = format!("{shape} t{t}");
            out.push(row(shape.clone(), if t == 1 { "gemv" } else { "matmul_few" }, fused, dense, packed));
            out.push(row(shape, "dequant+matmul", dense, dense, packed));
        }
    }
    Ok(())
}

/// The causal self-attention of training, forward + backward: `--tokens` (the first) split into
/// sequences of each of `--seqs`, `--attention-heads` heads of `--head-dim` over `--kv-heads`
/// key/value heads. TFLOP/s counts the
/// whole [t, t] score matrix (forward 4·b·h·t²·d, backward 10·b·h·t²·d: neither variant skips
/// the causally masked half).
fn attention_rows(args: &BenchKernelsArgs, device: &Device, dtype: DType, out: &mut Vec<KernelTiming>) -> Result<()> {
    let tokens = args.tokens.first().copied().unwrap_or(4096);
    let (h, d) = (args.attention_heads, args.head_dim);
    let g = args.kv_heads.unwrap_or(h);
    if g == 0 || h % g != 0 {
        return Err(Error::msg(format!("--kv-heads {g} must divide --attention-heads {h}")));
    }
    for &t in &args.seqs {
        if t == 0 || tokens % t != 0 {
            return Err(Error::msg(format!("--seqs: {t} does not divide --tokens {tokens}")));
        }
        let b = tokens / t;
        let shape = if g == h { format!("b{b} h{h} t{t} d{d}") } else { format!("b{b} h{h} g{g} t{t} d{d}") };
        let qkv: Vec<Var> = [h, g, g].iter().map(|&heads| Ok(Var::from_tensor(&randn(&[b, heads, t, d], 1.0, dtype, device)?)?)).collect::<Result<_>>()?;
        let bias = crate::ops::nn::attention_bias(&vec![vec![1u32; t]; b], t, dtype, device)?;
        let scale = 1.0 / (d as f64).sqrt();
        // None: the candle graph; Some: the fused op on those kernels.
        let step = |kernels: Option<ops::AttentionKernel>| -> Result<()> {
            let (q, k, v) = (qkv[0].as_tensor(), qkv[1].as_tensor(), qkv[2].as_tensor());
            let o = match kernels {
                Some(kernels) => q.apply_op3(k, v, crate::ops::fused::Attention::causal(bias.clone(), scale).on(kernels))?,
                None => crate::ops::nn::attention_reference(q, k, v, &bias)?,
            };
            o.backward()?;
            Ok(())
        };
        // On the CPU the op has one implementation, whichever kernels it is given.
        let variants = match device.is_cuda() {
            true => vec![("unfused", None), ("fused (flash)", Some(ops::AttentionKernel::Flash)), ("fused (gemm)", Some(ops::AttentionKernel::Gemm))],
            false => vec![("unfused", None), ("fused", Some(ops::AttentionKernel::Flash))],
        };
        let mut timed = Vec::new();
        for (variant, kernels) in variants {
            let ms = time(device, args.warmup, args.iters, || step(kernels))?;
            timed.push((variant, ms, crate::memory::peak_extra_mib(device, || step(kernels))?));
        }
        let unfused = timed[0].1;
        let flops = 14.0 * (b * h * t * t * d) as f64;
        for (variant, ms, mib) in timed {
            out.push(KernelTiming {
                op: "attention".into(),
                shape: shape.clone(),
                variant: variant.into(),
                ms,
                ratio: ms / unfused,
                tflops: Some(flops / (ms * 1e-3) / 1e12),
                gbps: None,
                peak_extra_mib: Some(mib),
            });
        }
    }
    Ok(())
}

/// SNELL (seed 002) on the linear shapes: the frozen linear, the adapter's plain candle ops (ΔW,
/// its quantile and the product, autograd keeping the intermediate [d_in, d_out] tensors), and the
/// fused op (ΔW recomputed, never kept); each forward + backward with the same frozen linear, with
/// the peak memory of one iteration over what was in use before it.
fn snell_rows(args: &BenchKernelsArgs, device: &Device, dtype: DType, out: &mut Vec<KernelTiming>) -> Result<()> {
    use crate::adapters::{SnellConfig, SnellLinear, Targets};
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    for (d_in, d_out) in dims(args)? {
        let w = randn(&[d_out, d_in], 0.02, dtype, device)?;
        let base = crate::model::FrozenLinear::new(w.clone());
        let frozen_w: crate::quant::BaseWeight = w.clone().into();
        for &t in &args.tokens {
            let x = Var::from_tensor(&randn(&[t, d_in], 1.0, dtype, device)?)?;
            let frozen_step = || -> Result<()> {
                frozen_linear(x.as_tensor(), &frozen_w)?.backward()?;
                Ok(())
            };
            let frozen = time(device, args.warmup, args.iters, frozen_step)?;
            let frozen_mem = crate::memory::peak_extra_mib(device, frozen_step)?;
            let mut push = |shape: &str, variant: &str, ms: f64, mib: f64| {
                out.push(KernelTiming {
                    op: "snell".into(),
                    shape: shape.into(),
                    variant: variant.into(),
                    ms,
                    ratio: ms / frozen,
                    tflops: None,
                    gbps: None,
                    peak_extra_mib: Some(mib),
                })
            };
            push(&format!("{d_in}x{d_out} T{t}"), "frozen linear", frozen, frozen_mem);
            for &s in &args.sparsities {
                let cfg = SnellConfig { r: args.snell_rank, heads: 2, sparsity: s, target_modules: Targets::Pattern("all-linear".into()) };
                cfg.validate("bench snell")?;
                let layer = SnellLinear::new(&base, &cfg, &mut rng)?;
                let (input, output) = (layer.input.as_tensor(), layer.output.as_tensor());
                let step = |fused: bool| -> Result<()> {
                    let branch = if fused {
                        ops::snell_branch(x.as_tensor(), input, output, ops::snell::Sparsify::from_sparsity(s))?
                    } else {
                        layer.branch(x.as_tensor())?
                    };
                    (frozen_linear(x.as_tensor(), &frozen_w)? + branch)?.backward()?;
                    Ok(())
                };
                let shape = format!("{d_in}x{d_out} r{} s{s} T{t}", args.snell_rank);
                let fused_mem = crate::memory::peak_extra_mib(device, || step(true))?;
                let fused = time(device, args.warmup, args.iters, || step(true))?;
                let plain_mem = crate::memory::peak_extra_mib(device, || step(false))?;
                let plain = time(device, args.warmup, args.iters, || step(false))?;
                push(&shape, "plain candle ops", plain, plain_mem);
                push(&shape, "fused", fused, fused_mem);
            }
        }
    }
    Ok(())
}

pub fn table(rows: &[KernelTiming]) -> String {
    let mut s = format!("{:<16} {:<30} {:<16} {:>9} {:>7} {:>8} {:>8} {:>10}\n", "op", "shape", "variant", "ms", "ratio", "TFLOP/s", "GB/s", "peak MiB");
    let or_dash = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |v| format!("{v:.digits$}"));
    for r in rows {
        s += &format!(
            "{:<16} {:<30} {:<16} {:>9.3} {:>7.3} {:>8} {:>8} {:>10}\n",
            r.op,
            r.shape,
            r.variant,
            r.ms,
            r.ratio,
            or_dash(r.tflops, 1),
            or_dash(r.gbps, 0),
            or_dash(r.peak_extra_mib, 1)
        );
    }
    s
}

pub fn kernels(args: &BenchKernelsArgs) -> Result<Vec<KernelTiming>> {
    args.validate()?;
    let device = super::parse_device(&args.device)?;
    let dtype = super::parse_dtype(&args.dtype)?;
    if !device.is_cuda() && !args.allow_cpu {
        return Err(Error::msg(
            "bench kernels measures the CUDA kernels: pass --device cuda (a build with the `cuda` feature), or --allow-cpu with small --tokens to try the CPU references",
        ));
    }
    let mut rows = Vec::new();
    let ops: Vec<&str> = if args.ops.is_empty() { vec!["lora", "control", "dora", "attention", "nf4", "snell"] } else { args.ops.iter().map(String::as_str).collect() };
    for op in ops {
        match op {
            "lora" => lora_rows(args, &device, dtype, &mut rows)?,
            "control" => control_rows(args, &device, dtype, &mut rows)?,
            "dora" => dora_rows(args, &device, dtype, &mut rows)?,
            "attention" => attention_rows(args, &device, dtype, &mut rows)?,
            "nf4" => nf4_rows(args, &device, dtype, &mut rows)?,
            "snell" => snell_rows(args, &device, dtype, &mut rows)?,
            other => return Err(Error::msg(format!("unknown op `{other}` (lora, control, dora, attention, nf4, snell)"))),
        }
    }
    print!("{}", table(&rows));
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&serde_json::json!({
            "device": args.device,
            "dtype": args.dtype,
            "rows": rows,
        }))
        .map_err(|e| Error::msg(e.to_string()))?;
        crate::fsutil::write_file_atomic(path, json.as_bytes())?;
        println!("wrote {}", path.display());
        let png = path.with_extension("png");
        crate::plot::bar_chart(&png, &chart(&rows, &args.dtype, &args.device))?;
        println!("wrote {}", png.display());
    }
    Ok(rows)
}

/// Each op and shape a group, each variant a bar: time over the frozen linear (LoRA) or over the
/// unfused graph (the other ops), so 1.0 is the bar to beat.
fn chart(rows: &[KernelTiming], dtype: &str, device: &str) -> crate::plot::BarChart {
    let mut categories: Vec<String> = Vec::new();
    let mut variants: Vec<String> = Vec::new();
    for r in rows {
        let cat = format!("{} {}", r.op, r.shape);
        if !categories.contains(&cat) {
            categories.push(cat);
        }
        if !variants.contains(&r.variant) {
            variants.push(r.variant.clone());
        }
    }
    let series = variants
        .iter()
        .map(|v| {
            let values = categories
                .iter()
                .map(|c| rows.iter().find(|r| &r.variant == v && &format!("{} {}", r.op, r.shape) == c).map_or(f64::NAN, |r| r.ratio))
                .collect();
            (v.clone(), values)
        })
        .collect();
    crate::plot::BarChart {
        title: format!("fused kernels, forward + backward, {dtype} on {device} (time ratio, lower is better)"),
        y_label: "time / frozen linear (LoRA), / unfused (others)".into(),
        categories,
        series,
        value_labels: true,
        size: (1600, 640),
        ..Default::default()
    }
}

//! `bench kernels`: the fused ops against the unfused candle graph they replace, forward plus
//! backward through candle's autograd (as training runs them), side by side in one process. Each
//! op's rows live beside the op (its `bench` function), on the harness of `crate::kernel_bench`;
//! this is the list the command runs, its table and its chart.
//!
//! For the LoRA linear each shape reports the frozen linear (`x Wᵀ` forward and `dx` backward,
//! W constant: the `FrozenMatmulT` op training uses, since candle's matmul would also compute
//! ∂L/∂W), the unfused LoRA (`x Wᵀ + s·(x Aᵀ) Bᵀ` in candle ops, as `--unfused` trains, ∂L/∂W
//! included) and the fused op, with their ratios to the frozen linear and the achieved
//! TFLOP/s; on the CPU in f32 also the frozen linear with W in bf16 (the mixed precision of
//! `--dtype bf16` training, `ops::gemm_bf16`). The control branch (`base + α·z Bᵀ`) and DoRA's row norms are compared fused against
//! unfused; NF4 dequantize, the batch-1 GEMV and the few-row matmul report GB/s (ratio: over
//! dequantize-then-matmul with the same x). The training attention on both of its kernels
//! (flash, `kernels/attention.cu`: the [t, s] scores never in memory; gemm,
//! `kernels/attention_gemm.cu`: cuBLAS products, the scores a per-chunk transient) is compared
//! with the candle graph it replaces (cuBLAS matmuls, the scores and probabilities kept for
//! backward) at LLaMA-2-7B's heads.

use candle_core::{DType, Device};

use super::BenchKernelsArgs;
use crate::error::{Error, Result};
pub use crate::kernel_bench::KernelTiming;
use crate::kernel_bench::BenchShapes;

type Rows = fn(&BenchShapes, &Device, DType, &mut Vec<KernelTiming>) -> Result<()>;

/// The ops `--ops` names, in the order they run by default.
const OPS: &[(&str, Rows)] = &[
    ("lora", crate::ops::lora_linear::bench),
    ("control", crate::ops::control_branch::bench),
    ("dora", crate::ops::row_norms::bench),
    ("attention", crate::ops::fused::attention::bench),
    ("nf4", crate::quant::nf4_kernels::bench),
    ("snell", crate::ops::snell::bench),
];

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

fn shapes(args: &BenchKernelsArgs) -> Result<BenchShapes> {
    Ok(BenchShapes {
        dims: dims(args)?,
        ranks: args.ranks.clone(),
        tokens: args.tokens.clone(),
        seqs: args.seqs.clone(),
        attention_heads: args.attention_heads,
        kv_heads: args.kv_heads,
        head_dim: args.head_dim,
        snell_rank: args.snell_rank,
        sparsities: args.sparsities.clone(),
        warmup: args.warmup,
        iters: args.iters,
    })
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
    let shapes = shapes(args)?;
    let mut rows = Vec::new();
    let names: Vec<&str> = if args.ops.is_empty() { OPS.iter().map(|(name, _)| *name).collect() } else { args.ops.iter().map(String::as_str).collect() };
    for name in names {
        let Some((_, bench)) = OPS.iter().find(|(n, _)| *n == name) else {
            let known: Vec<&str> = OPS.iter().map(|(n, _)| *n).collect();
            return Err(Error::msg(format!("unknown op `{name}` ({})", known.join(", "))));
        };
        bench(&shapes, &device, dtype, &mut rows)?;
    }
    print!("{}", table(&rows));
    if let Some(path) = &args.json {
        super::bench_args::write_json(path, &serde_json::json!({ "device": args.device, "dtype": args.dtype, "rows": rows }))?;
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

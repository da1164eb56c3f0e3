//! The harness of `candle-peft bench kernels`: a fused op against the unfused candle graph it
//! replaces, forward plus backward through candle's autograd (as training runs them), side by
//! side in one process. Each op keeps its own rows beside its code (a `bench` function in its
//! module); the CLI runs them (`cli::bench_kernels`). Every timed iteration ends with a device
//! synchronisation; the figure is the median over iterations. The backward is seeded with ones
//! (candle's `backward`), in every variant alike.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::Result;

/// The shapes and repetitions the rows are timed at (the flags of `bench kernels`).
#[derive(Debug, Clone)]
pub struct BenchShapes {
    /// Linear layers as (in, out).
    pub dims: Vec<(usize, usize)>,
    pub ranks: Vec<usize>,
    pub tokens: Vec<usize>,
    /// Attention: sequence lengths that split the first of `tokens` into a batch.
    pub seqs: Vec<usize>,
    pub attention_heads: usize,
    pub kv_heads: Option<usize>,
    pub head_dim: usize,
    pub snell_rank: usize,
    pub sparsities: Vec<f64>,
    pub warmup: usize,
    pub iters: usize,
}

impl BenchShapes {
    /// Every (in, out, r, T) of the linear shapes, ranks and token counts.
    pub fn lora_shapes(&self) -> Vec<(usize, usize, usize, usize)> {
        let mut v = Vec::new();
        for &(d_in, d_out) in &self.dims {
            for &r in &self.ranks {
                for &t in &self.tokens {
                    v.push((d_in, d_out, r, t));
                }
            }
        }
        v
    }

    /// Median milliseconds of `f` on `device` over `iters` runs after `warmup` runs, each
    /// synchronised.
    pub fn time(&self, device: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..self.warmup {
            f()?;
        }
        device.synchronize()?;
        let mut ms = Vec::with_capacity(self.iters);
        for _ in 0..self.iters {
            let start = Instant::now();
            f()?;
            device.synchronize()?;
            ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        Ok(ms[ms.len() / 2])
    }
}

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

impl KernelTiming {
    /// A row of `ms` against `baseline_ms` (the ratio), with no optional figure.
    pub fn new(op: &str, shape: &str, variant: &str, ms: f64, baseline_ms: f64) -> Self {
        Self { op: op.into(), shape: shape.into(), variant: variant.into(), ms, ratio: ms / baseline_ms, tflops: None, gbps: None, peak_extra_mib: None }
    }

    /// With TFLOP/s for `flops` floating-point operations in `ms`.
    pub fn flops(self, flops: f64) -> Self {
        Self { tflops: Some(flops / (self.ms * 1e-3) / 1e12), ..self }
    }

    /// With the peak memory over what was in use before.
    pub fn peak_mib(self, mib: f64) -> Self {
        Self { peak_extra_mib: Some(mib), ..self }
    }
}


pub fn randn(shape: &[usize], std: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, std as f32, shape, device)?.to_dtype(dtype)?)
}


//! `candle-peft selftest`: every fused op on the GPU against its CPU reference, on random shapes
//! with odd sizes (no multiple of any tile), in f32, f16 and bf16, forward and backward:
//! the adapter ops of `src/ops` (the DoRA linear included: candle ops on the device, but its own
//! forward and backward), the model's attention (flash-style, `kernels/attention.cu`, and on
//! cuBLAS, `kernels/attention_gemm.cu`) and the decoder layer's RMSNorm (`kernels/rms_norm.cu`),
//! SwiGLU (`kernels/swiglu.cu`) and the attention heads split with RoPE (`kernels/rope.cu`, alone
//! and inside the q, k, v projections) as training runs them, the adapters' dropout masks
//! (`kernels/dropout.cu`) and AdamW's update (`kernels/adamw.cu`).
//!
//! The inputs are drawn once, rounded to the dtype under test, then given to both sides: the
//! device computes in that dtype, the reference in f64 on the same values. The error reported is
//! normwise: `max |got − ref| / max |ref|` over each output (the abs column is `max |got − ref|`).
//! Bounds: 1e-5 in f32, 1e-2 in f16 and bf16.

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::ops::lowrank_add::Factor;
use crate::ops::dropout::DropoutMask;
use crate::ops::{control_branch, dora_linear, lora_linear, lowrank_add, row_norms};
use crate::Result;

/// One checked output of one kernel.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub kernel: String,
    pub dtype: String,
    pub shape: String,
    pub output: String,
    pub max_abs: f64,
    pub rel: f64,
    pub bound: f64,
    pub pass: bool,
}

fn bound(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-5
    } else {
        1e-2
    }
}

struct Case<'a> {
    device: &'a Device,
    dtype: DType,
    rng: StdRng,
    checks: Vec<Check>,
}

impl Case<'_> {
    /// Random values rounded to the dtype under test, as an f64 CPU tensor.
    fn draw(&mut self, shape: &[usize], std: f64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (self.rng.random::<f32>() * 2.0 - 1.0) * std as f32).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(self.dtype)?.to_dtype(DType::F64)?)
    }

    fn mask(&mut self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| if self.rng.random::<f64>() < 0.9 { 1.0 / 0.9 } else { 0.0 }).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(self.dtype)?.to_dtype(DType::F64)?)
    }

    fn on_device(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.to_dtype(self.dtype)?.to_device(self.device)?)
    }

    fn record(&mut self, kernel: &str, shape: &str, output: &str, got: &Tensor, reference: &Tensor) -> Result<()> {
        let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        let max_abs = (&got - reference)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        let scale = reference.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?.max(f64::MIN_POSITIVE);
        let (rel, bound) = (max_abs / scale, bound(self.dtype));
        self.push([kernel, shape, output], max_abs, rel, bound, rel.is_finite() && rel <= bound);
        Ok(())
    }

    /// Two device tensors that must hold the same values (bound 0; a signed zero counts as zero).
    /// One forward and backward pass against its reference: `names` are the output's, then each
    /// input gradient's (as many as the pass has).
    fn record_pass(&mut self, kernel: &str, shape: &str, names: &[&str], (y, g): (&Tensor, &[Tensor]), (y_ref, g_ref): (&Tensor, &[Tensor])) -> Result<()> {
        let Some((output, gradients)) = names.split_first() else { return Err(crate::Error::msg("selftest: a pass names no output")) };
        self.record(kernel, shape, output, y, y_ref)?;
        for (name, (got, reference)) in gradients.iter().zip(g.iter().zip(g_ref)) {
            self.record(kernel, shape, name, got, reference)?;
        }
        Ok(())
    }

    fn record_equal(&mut self, kernel: &str, shape: &str, output: &str, got: &Tensor, want: &Tensor) -> Result<()> {
        let f64s = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
        let want = f64s(want)?;
        let max_abs = (f64s(got)? - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?.max(f64::MIN_POSITIVE);
        self.push([kernel, shape, output], max_abs, max_abs / scale, 0.0, max_abs == 0.0);
        Ok(())
    }

    /// A value that must equal its reference bit for bit (bound 0).
    fn record_exact(&mut self, kernel: &str, shape: &str, output: &str, got: f64, want: f64) {
        let max_abs = (got - want).abs();
        self.push([kernel, shape, output], max_abs, max_abs / want.abs().max(f64::MIN_POSITIVE), 0.0, got.to_bits() == want.to_bits());
    }

    fn push(&mut self, [kernel, shape, output]: [&str; 3], max_abs: f64, rel: f64, bound: f64, pass: bool) {
        let dtype = format!("{:?}", self.dtype).to_lowercase();
        self.checks.push(Check { kernel: kernel.into(), dtype, shape: shape.into(), output: output.into(), max_abs, rel, bound, pass });
    }

    /// An odd size in [lo, hi].
    fn odd(&mut self, lo: usize, hi: usize) -> usize {
        self.rng.random_range(lo..=hi) | 1
    }
}

/// Forward and the gradients of every input, for `f` on tensors on `device` in `dtype`, with the
/// output weighted by `weights` before summing (so that each output element gets its own gradient).
fn forward_backward(
    device: &Device,
    dtype: DType,
    inputs: &[&Tensor],
    weights: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    forward_backward_typed(device, &vec![dtype; inputs.len()], inputs, weights, f)
}

/// As [`forward_backward`], each input in its own dtype.
fn forward_backward_typed(
    device: &Device,
    dtypes: &[DType],
    inputs: &[&Tensor],
    weights: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars: Vec<Var> =
        inputs.iter().zip(dtypes).map(|(t, &d)| Var::from_tensor(&t.to_dtype(d)?.to_device(device)?)).collect::<candle_core::Result<_>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&tensors)?;
    let acc = crate::ops::nn::accumulate_dtype(y.dtype());
    let loss = (y.to_dtype(acc)? * weights.to_dtype(acc)?.to_device(device)?)?.sum_all()?;
    let grads = loss.backward()?;
    let g = tensors
        .iter()
        .map(|t| grads.get(t).cloned().ok_or_else(|| crate::Error::msg("selftest: an input got no gradient")))
        .collect::<Result<_>>()?;
    Ok((y, g))
}

/// The LoRA linear, or with `dora` the DoRA linear (its row scale k as a fourth input).
fn linear_cases(c: &mut Case, dora: bool, with_dropout: bool) -> Result<()> {
    let (t, d_in, d_out, r) = (c.odd(65, 300), c.odd(65, 700), c.odd(65, 700), c.odd(1, 70));
    let s = 1.7;
    let kernel = format!("{}_linear{}", if dora { "dora" } else { "lora" }, if with_dropout { "+dropout" } else { "" });
    let shape = format!("T{t} in{d_in} out{d_out} r{r}");
    let (x, w) = (c.draw(&[t, d_in], 1.0)?, c.draw(&[d_out, d_in], 0.1)?);
    let (a, b) = (c.draw(&[r, d_in], 0.1)?, c.draw(&[d_out, r], 0.1)?);
    // DoRA's m / ‖W + s·B A‖ stays near 1 in training.
    let k = (c.draw(&[d_out], 0.3)? + 1.0)?;
    let weights = c.draw(&[t, d_out], 1.0)?;
    let mask = with_dropout.then(|| DropoutMask { seed: c.rng.random(), keep: 0.9 });
    let inputs: Vec<&Tensor> = if dora { vec![&x, &a, &b, &k] } else { vec![&x, &a, &b] };
    let run = |device: &Device, dtype: DType| -> Result<(Tensor, Vec<Tensor>)> {
        let w = w.to_dtype(dtype)?.to_device(device)?.into();
        forward_backward(device, dtype, &inputs, &weights, &|v| match dora {
            true => dora_linear(&v[0], &w, &v[1], &v[2], &v[3], s, mask),
            false => lora_linear(&v[0], &w, &v[1], &v[2], s, mask),
        })
    };
    let (y, g) = run(c.device, c.dtype)?;
    let (y_ref, g_ref) = run(&Device::Cpu, DType::F64)?;
    c.record_pass(&kernel, &shape, &["y", "dx", "dA", "dB", "dk"], (&y, &g), (&y_ref, &g_ref))?;
    Ok(())
}

fn control_case(c: &mut Case) -> Result<()> {
    let (t, d, r) = (c.odd(65, 400), c.odd(65, 700), c.odd(1, 70));
    let shape = format!("T{t} d{d} r{r}");
    let (base, z, b) = (c.draw(&[t, d], 1.0)?, c.draw(&[t, r], 1.0)?, c.draw(&[d, r], 0.1)?);
    let weights = c.draw(&[t, d], 1.0)?;
    let f = |v: &[Tensor]| control_branch(&v[0], &v[1], &v[2], 0.8);
    let (y, g) = forward_backward(c.device, c.dtype, &[&base, &z, &b], &weights, &f)?;
    let (y_ref, g_ref) = forward_backward(&Device::Cpu, DType::F64, &[&base, &z, &b], &weights, &f)?;
    c.record_pass("control_branch", &shape, &["out", "dbase", "dz", "dB"], (&y, &g), (&y_ref, &g_ref))?;
    Ok(())
}

fn lowrank_cases(c: &mut Case) -> Result<()> {
    for (factor, masked) in [(Factor::Rows, false), (Factor::Rows, true), (Factor::Transposed, true)] {
        let (rows, cols, r) = (c.odd(65, 400), c.odd(65, 700), c.odd(1, 70));
        let kernel = format!("lowrank_add {}{}", if factor == Factor::Rows { "zBᵀ" } else { "zA" }, if masked { " masked" } else { "" });
        let shape = format!("{rows}x{cols} r{r}");
        let out = c.draw(&[rows, cols], 1.0)?;
        let z = c.draw(&[rows, r], 1.0)?;
        let m = if factor == Factor::Rows { c.draw(&[cols, r], 0.1)? } else { c.draw(&[r, cols], 0.1)? };
        let mask = if masked { Some(c.mask(&[rows, cols])?) } else { None };
        let got = c.on_device(&out)?;
        let dev_mask = mask.as_ref().map(|m| c.on_device(m)).transpose()?;
        lowrank_add(&got, &c.on_device(&z)?, &c.on_device(&m)?, factor, dev_mask.as_ref(), 0.9)?;
        let reference = out.copy()?;
        lowrank_add(&reference, &z, &m, factor, mask.as_ref(), 0.9)?;
        c.record(&kernel, &shape, "out", &got, &reference)?;
    }
    Ok(())
}

fn row_norms_case(c: &mut Case) -> Result<()> {
    let (rows, cols, r) = (c.odd(65, 500), c.odd(65, 900), c.odd(1, 70));
    let (w, b, a) = (c.draw(&[rows, cols], 1.0)?, c.draw(&[rows, r], 0.2)?, c.draw(&[r, cols], 0.2)?);
    let got = row_norms(&c.on_device(&w)?, &b.to_dtype(DType::F32)?.to_device(c.device)?, &a.to_dtype(DType::F32)?.to_device(c.device)?, 0.5)?;
    let reference = row_norms(&w, &b, &a, 0.5)?.to_dtype(DType::F64)?;
    c.record("dora row_norms", &format!("{rows}x{cols} r{r}"), "n", &got, &reference)
}

fn nf4_cases(c: &mut Case) -> Result<()> {
    let (rows, cols) = (c.odd(65, 300), c.odd(33, 400) * 2 + 16 * c.rng.random_range(0..2usize));
    let w = c.draw(&[rows, cols], 0.05)?.to_dtype(c.dtype)?;
    for double_quant in [false, true] {
        let mut q = crate::quant::Nf4Tensor::quantize(&w, 64, double_quant)?;
        let reference = q.dequantize_reference(c.dtype)?.to_dtype(DType::F64)?;
        q.device = c.device.clone();
        let shape = format!("{rows}x{cols}{}", if double_quant { " dq" } else { "" });
        let got = q.dequantize(c.dtype)?;
        c.record("nf4 dequantize", &shape, "W", &got, &reference)?;
        let x = c.draw(&[1, cols], 1.0)?;
        let y = crate::quant::nf4_kernels::gemv(&q, &c.on_device(&x)?)?;
        let y_ref = x.matmul(&reference.t()?)?;
        c.record("nf4 gemv", &shape, "y", &y, &y_ref)?;
        // Rows of x over two block rows of the kernel, the last one partial.
        let t = c.rng.random_range(crate::quant::nf4_kernels::FEW_ROWS + 1..3 * crate::quant::nf4_kernels::FEW_ROWS);
        let x = c.draw(&[t, cols], 1.0)?;
        let y = crate::quant::nf4_kernels::matmul_few(&q, &c.on_device(&x)?)?;
        c.record("nf4 matmul_few", &format!("{shape} t{t}"), "y", &y, &x.matmul(&reference.t()?)?)?;
    }
    Ok(())
}

/// SNELL: the merge against the f64 ΔW (f32 only: the factors are always f32), the radix-select
/// threshold bit for bit against the exact quantile of the device's own ΔW, and the branch's
/// forward and gradients for KLoRA, s = 0.5 (dense apply) and s = 0.99 (sparse apply). The branch is given a τ halfway between
/// two neighbouring |ΔW| values, so that f32 and f64 rounding cannot move an entry across it.
fn snell_cases(c: &mut Case) -> Result<()> {
    use crate::ops::snell::{kernel_delta, snell_branch, threshold, Sparsify};
    let (t, d_in, d_out, k) = (c.odd(65, 300), c.odd(65, 500), c.odd(65, 500), c.rng.random_range(1..=32usize));
    let shape = format!("T{t} in{d_in} out{d_out} k{k}");
    let f32_values = |t: &Tensor| t.to_dtype(DType::F32)?.to_dtype(DType::F64);
    let input = f32_values(&c.draw(&[2, d_in, k], 0.2)?)?;
    let output = f32_values(&c.draw(&[2, d_out, k], 0.2)?)?;
    let (dev_in, dev_out) = (input.to_dtype(DType::F32)?.to_device(c.device)?, output.to_dtype(DType::F32)?.to_device(c.device)?);
    let delta = kernel_delta(&dev_in, &dev_out)?;
    let mut abs: Vec<f32> = delta.abs()?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?;
    if c.dtype == DType::F32 {
        c.record("snell merge", &shape, "ΔW", &delta, &kernel_delta(&input, &output)?)?;
        for s in [0.5, 0.99] {
            let got = threshold(&dev_in, &dev_out, s)?.unwrap_or(f64::NAN);
            let want = crate::ops::snell_merge::quantile_f32(&abs, s)? as f64;
            c.record_exact(&format!("snell threshold s{s}"), &shape, "τ", got, want);
        }
    }
    abs.sort_by(f32::total_cmp);
    let x = c.draw(&[t, d_in], 1.0)?;
    let weights = c.draw(&[t, d_out], 1.0)?;
    for s in [0.0, 0.5, 0.99] {
        let sparsify = if s > 0.0 {
            // τ in the widest gap between neighbouring |ΔW| within 1% of the entries around the
            // s-quantile: the device's f32 ΔW and the f64 reference differ by rounding, and an
            // entry within rounding of τ would survive on one side only (next neighbours can be a
            // few ulps apart, or tied).
            let centre = ((abs.len() - 1) as f64 * s) as usize;
            let window = (abs.len() / 100).max(1);
            let (lo, hi) = (centre.saturating_sub(window), (centre + window).min(abs.len() - 2));
            let i = (lo..=hi).max_by(|&a, &b| (abs[a + 1] - abs[a]).total_cmp(&(abs[b + 1] - abs[b]))).expect("a non-empty window");
            Sparsify::Threshold((abs[i] as f64 + abs[i + 1] as f64) / 2.0)
        } else {
            Sparsify::Dense
        };
        let f = |v: &[Tensor]| snell_branch(&v[0], &v[1], &v[2], sparsify);
        let inputs = [&x, &input, &output];
        let (y, g) = forward_backward_typed(c.device, &[c.dtype, DType::F32, DType::F32], &inputs, &weights, &f)?;
        let (y_ref, g_ref) = forward_backward(&Device::Cpu, DType::F64, &inputs, &weights, &f)?;
        // At s = 0.99 (1% survivors) both sides take the sparse apply (`snell_sparse`).
        let kernel = format!("snell_branch s{s}{}", if s > 0.9 { " sparse" } else { "" });
        c.record_pass(&kernel, &shape, &["y", "dx", "dIn", "dOut"], (&y, &g), (&y_ref, &g_ref))?;
    }
    Ok(())
}

/// The flash-style attention of training (`kernels/attention.cu`) against the CPU op in f64, on
/// the model's shape (grouped-query, scale 1/√d, d not a multiple of 32) and on the nonlinear
/// controller's (one head, d = r + 1 = 65, scale 1); causal, one row left-padded. The causal
/// walk, which skips the masked chunks, must give the full walk's values exactly.
fn attention_cases(c: &mut Case) -> Result<()> {
    use crate::ops::fused::Attention;
    use crate::ops::nn::{attention_bias, attention_scaled};
    let (b, t, d_model) = (2, c.odd(33, 150), c.odd(33, 127));
    let pad = c.rng.random_range(1..t / 2);
    let mask = vec![(0..t).map(|i| u32::from(i >= pad)).collect::<Vec<_>>(), vec![1; t]];
    let model = ("attention gqa", 4, 2, d_model, 1.0 / (d_model as f64).sqrt(), 1.0);
    let controller = ("attention control", 1, 1, 65, 1.0, 0.15);
    for (kernel, h, g, d, scale, std) in [model, controller] {
        let shape = format!("b{b} h{h} g{g} t{t} d{d} pad{pad}");
        let (q, k, v) = (c.draw(&[b, h, t, d], std)?, c.draw(&[b, g, t, d], std)?, c.draw(&[b, g, t, d], 1.0)?);
        let weights = c.draw(&[b, t, h * d], 1.0)?;
        let run = |device: &Device, dtype: DType| -> Result<(Tensor, Vec<Tensor>)> {
            let bias = attention_bias(&mask, t, dtype, device)?;
            forward_backward(device, dtype, &[&q, &k, &v], &weights, &|x| attention_scaled(&x[0], &x[1], &x[2], &bias, scale, true))
        };
        let (o, g) = run(c.device, c.dtype)?;
        let (o_ref, g_ref) = run(&Device::Cpu, DType::F64)?;
        c.record_pass(kernel, &shape, &["o", "dq", "dk", "dv"], (&o, &g), (&o_ref, &g_ref))?;
        let bias = attention_bias(&mask, t, c.dtype, c.device)?;
        let full_walk = |x: &[Tensor]| -> Result<Tensor> {
            Ok(x[0].contiguous()?.apply_op3(&x[1].contiguous()?, &x[2].contiguous()?, Attention::new(bias.clone(), scale))?)
        };
        let (o_full, g_full) = forward_backward(c.device, c.dtype, &[&q, &k, &v], &weights, &full_walk)?;
        let kernel = format!("{kernel} causal skip");
        c.record_equal(&kernel, &shape, "o", &o, &o_full)?;
        for (name, (got, full)) in ["dq", "dk", "dv"].iter().zip(g.iter().zip(&g_full)) {
            c.record_equal(&kernel, &shape, name, got, full)?;
        }
    }
    Ok(())
}

/// The tensor-core attention of training (`kernels/attention_gemm.cu`, cuBLAS) against the CPU
/// op in f64: grouped-query with d odd, one query head per key head with d over the flash
/// kernels' 128 (which only this path runs); causal, one row left-padded. Each shape runs twice,
/// with the scores of all heads in one chunk and with one key/value group a chunk.
fn attention_gemm_cases(c: &mut Case) -> Result<()> {
    use crate::ops::AttentionKernel;
    use crate::ops::fused::Attention;
    use crate::ops::nn::attention_bias;
    let (b, t) = (2, c.odd(17, 90));
    let pad = c.rng.random_range(1..t / 2);
    let mask = vec![(0..t).map(|i| u32::from(i >= pad)).collect::<Vec<_>>(), vec![1; t]];
    for (kernel, h, g, d) in [("attention_gemm gqa", 6, 2, c.odd(9, 127)), ("attention_gemm d>128", 2, 2, c.odd(129, 200))] {
        let shape = format!("b{b} h{h} g{g} t{t} d{d} pad{pad}");
        let (q, k, v) = (c.draw(&[b, h, t, d], 1.0)?, c.draw(&[b, g, t, d], 1.0)?, c.draw(&[b, g, t, d], 1.0)?);
        let weights = c.draw(&[b, t, h * d], 1.0)?;
        let scale = 1.0 / (d as f64).sqrt();
        let run = |device: &Device, dtype: DType| -> Result<(Tensor, Vec<Tensor>)> {
            let bias = attention_bias(&mask, t, dtype, device)?;
            let op = |x: &[Tensor]| -> Result<Tensor> {
                let op = Attention::causal(bias.clone(), scale).on(AttentionKernel::Gemm);
                Ok(x[0].contiguous()?.apply_op3(&x[1].contiguous()?, &x[2].contiguous()?, op)?)
            };
            forward_backward(device, dtype, &[&q, &k, &v], &weights, &op)
        };
        let (o_ref, g_ref) = run(&Device::Cpu, DType::F64)?;
        let (o, g) = run(c.device, c.dtype)?;
        c.record_pass(kernel, &shape, &["o", "dq", "dk", "dv"], (&o, &g), (&o_ref, &g_ref))?;
        #[cfg(feature = "cuda")]
        let (o, g) = crate::ops::cuda::attention_gemm::with_score_budget(1, || run(c.device, c.dtype))?;
        c.record_pass(&format!("{kernel} chunked"), &shape, &["o", "dq", "dk", "dv"], (&o, &g), (&o_ref, &g_ref))?;
    }
    Ok(())
}

/// The attention heads of a projection (`kernels/rope.cu`): the split with RoPE (q, k) and
/// without (v), as its own op and inside the frozen, LoRA and DoRA projections.
fn heads_cases(c: &mut Case) -> Result<()> {
    use crate::quant::BaseWeight;
    use crate::ops::nn::{frozen_matmul_t_heads, AttentionHeads};
    let (b, t, n, d) = (2, c.odd(5, 70), 3, 2 * c.odd(3, 33));
    let shape = format!("b{b} t{t} h{n} d{d}");
    let x = c.draw(&[b, t, n * d], 1.0)?;
    let angles = c.draw(&[b, 1, t, d / 2], 3.0)?;
    let weights = c.draw(&[b, n, t, d], 1.0)?;
    let tables = |device: &Device, dtype: DType| -> Result<(Tensor, Tensor)> {
        Ok((angles.cos()?.to_dtype(dtype)?.to_device(device)?, angles.sin()?.to_dtype(dtype)?.to_device(device)?))
    };
    for rotate in [true, false] {
        let kernel = if rotate { "rope_heads" } else { "heads_split" };
        let run = |device: &Device, dtype: DType| {
            let (cos, sin) = tables(device, dtype)?;
            let heads = if rotate { AttentionHeads::rotated(n, &cos, &sin) } else { AttentionHeads::plain(n) };
            forward_backward(device, dtype, &[&x], &weights, &|v| heads.split(&v[0], true))
        };
        let ((y, g), (y_ref, g_ref)) = (run(c.device, c.dtype)?, run(&Device::Cpu, DType::F64)?);
        c.record_pass(kernel, &shape, &["y", "dx"], (&y, &g), (&y_ref, &g_ref))?;
    }
    let (d_in, r, s) = (c.odd(33, 300), c.odd(1, 40), 1.7);
    let x = c.draw(&[b, t, d_in], 1.0)?;
    let (w, a, bm) = (c.draw(&[n * d, d_in], 0.1)?, c.draw(&[r, d_in], 0.1)?, c.draw(&[n * d, r], 0.1)?);
    let k = (c.draw(&[n * d], 0.3)? + 1.0)?;
    let mask = Some(DropoutMask { seed: c.rng.random(), keep: 0.9 });
    let shape = format!("{shape} in{d_in} r{r}");
    for projection in ["frozen", "lora", "dora"] {
        let kernel = format!("{projection}_heads");
        let inputs: Vec<&Tensor> = match projection {
            "frozen" => vec![&x],
            "lora" => vec![&x, &a, &bm],
            _ => vec![&x, &a, &bm, &k],
        };
        let run = |device: &Device, dtype: DType| {
            let (cos, sin) = tables(device, dtype)?;
            let heads = AttentionHeads::rotated(n, &cos, &sin);
            let w: BaseWeight = w.to_dtype(dtype)?.to_device(device)?.into();
            forward_backward(device, dtype, &inputs, &weights, &|v| match projection {
                "frozen" => frozen_matmul_t_heads(&v[0], &w, heads, true),
                "lora" => crate::ops::lora_linear_heads(&v[0], &w, (&v[1], &v[2]), s, mask, heads),
                _ => crate::ops::dora_linear_heads(&v[0], &w, (&v[1], &v[2], &v[3]), s, mask, heads),
            })
        };
        let ((y, g), (y_ref, g_ref)) = (run(c.device, c.dtype)?, run(&Device::Cpu, DType::F64)?);
        c.record_pass(&kernel, &shape, &["y", "dx", "dA", "dB", "dk"], (&y, &g), (&y_ref, &g_ref))?;
    }
    Ok(())
}

/// AdamW's fused update (`kernels/adamw.cu`, f32 parameters) against the update in candle ops
/// on the CPU in f64: two steps with weight decay; the parameter's change and both moments.
fn adamw_case(c: &mut Case) -> Result<()> {
    use crate::training::{AdamW, AdamWConfig};
    if c.dtype != DType::F32 {
        return Ok(());
    }
    let n = c.odd(1_000, 70_000);
    // Parameters of an adapter's size (LoRA's A at LLaMA widths is about 1e-2), so that the f32
    // storage's rounding of p (an ulp of p) stays far below the change compared.
    let (p, g1, g2) = (c.draw(&[n], 1e-2)?, c.draw(&[n], 1e-2)?, c.draw(&[n], 1e-2)?);
    let config = AdamWConfig { weight_decay: 0.1, ..Default::default() };
    let run = |device: &Device, dtype: DType| -> Result<Vec<Tensor>> {
        let var = candle_core::Var::from_tensor(&p.to_dtype(dtype)?.to_device(device)?)?;
        let mut opt = AdamW::new(vec![("p".into(), var.clone(), 1.0)], config)?;
        for g in [&g1, &g2] {
            opt.step(&std::collections::HashMap::from([("p".to_string(), g.to_dtype(dtype)?.to_device(device)?)]), 1e-3)?;
        }
        let state = opt.state_tensors()?;
        let change = (var.as_tensor().to_dtype(DType::F64)?.to_device(&Device::Cpu)? - &p)?;
        Ok(vec![change, state["m.p"].clone(), state["v.p"].clone()])
    };
    let (got, want) = (run(c.device, DType::F32)?, run(&Device::Cpu, DType::F64)?);
    for (output, (got, want)) in ["dp", "m", "v"].into_iter().zip(got.iter().zip(&want)) {
        c.record("adamw", &n.to_string(), output, got, want)?;
    }
    Ok(())
}

/// The decoder layer's elementwise and row ops as training runs them on the device (RMSNorm:
/// `kernels/rms_norm.cu`, dw by candle ops; SwiGLU: `kernels/swiglu.cu`)
/// against the fused CPU ops in f64, on odd widths.
fn layer_op_cases(c: &mut Case) -> Result<()> {
    use crate::ops::nn::{frozen_matmul_t_add, rms_norm, swiglu, swiglu_frozen_matmul_t_add};
    let (rows, width) = (c.odd(33, 300), c.odd(65, 1100));
    let shape = format!("{rows}x{width}");
    let (x, w, weights) = (c.draw(&[rows, width], 1.0)?, c.draw(&[width], 1.0)?, c.draw(&[rows, width], 1.0)?);
    let run = |device: &Device, dtype: DType| forward_backward(device, dtype, &[&x, &w], &weights, &|t| rms_norm(&t[0], &t[1], 1e-5, true));
    let ((y, g), (y_ref, g_ref)) = (run(c.device, c.dtype)?, run(&Device::Cpu, DType::F64)?);
    c.record_pass("rms_norm", &shape, &["y", "dx", "dw"], (&y, &g), (&y_ref, &g_ref))?;
    let (gate, up) = (c.draw(&[rows, width], 2.0)?, c.draw(&[rows, width], 1.0)?);
    let run = |device: &Device, dtype: DType| forward_backward(device, dtype, &[&gate, &up], &weights, &|t| swiglu(&t[0], &t[1], true));
    let ((y, g), (y_ref, g_ref)) = (run(c.device, c.dtype)?, run(&Device::Cpu, DType::F64)?);
    c.record_pass("swiglu", &shape, &["y", "dg", "du"], (&y, &g), (&y_ref, &g_ref))?;
    // The frozen projection into the residual (o_proj, down_proj): copy, then a GEMM with β = 1.
    let d_in = c.odd(33, 500);
    let (a, proj) = (c.draw(&[rows, d_in], 1.0)?, c.draw(&[width, d_in], 0.1)?);
    let residual = c.draw(&[rows, width], 1.0)?;
    let run = |device: &Device, dtype: DType| -> Result<(Tensor, Vec<Tensor>)> {
        let w = proj.to_dtype(dtype)?.to_device(device)?.into();
        forward_backward(device, dtype, &[&a, &residual], &weights, &|t| frozen_matmul_t_add(&t[0], &w, &t[1]))
    };
    let ((y, g), (y_ref, g_ref)) = (run(c.device, c.dtype)?, run(&Device::Cpu, DType::F64)?);
    let shape_add = format!("{rows}x{d_in} -> {width}");
    c.record_pass("frozen_matmul_add", &shape_add, &["y", "dx", "dres"], (&y, &g), (&y_ref, &g_ref))?;
    // SwiGLU, the frozen down projection and the residual as one op (the activation a transient).
    let (gate, up) = (c.draw(&[rows, d_in], 2.0)?, c.draw(&[rows, d_in], 1.0)?);
    let run = |device: &Device, dtype: DType| -> Result<(Tensor, Vec<Tensor>)> {
        let w = proj.to_dtype(dtype)?.to_device(device)?.into();
        forward_backward(device, dtype, &[&gate, &up, &residual], &weights, &|t| swiglu_frozen_matmul_t_add(&t[0], &t[1], &w, &t[2], true))
    };
    let ((y, g), (y_ref, g_ref)) = (run(c.device, c.dtype)?, run(&Device::Cpu, DType::F64)?);
    c.record_pass("swiglu_matmul_add", &shape_add, &["y", "dg", "du", "dres"], (&y, &g), (&y_ref, &g_ref))?;
    // LoRA on the SwiGLU activation (down_proj with an adapter), the activation recomputed.
    let r = c.odd(1, 40);
    let (a, b) = (c.draw(&[r, d_in], 0.1)?, c.draw(&[width, r], 0.1)?);
    let mask = Some(DropoutMask { seed: c.rng.random(), keep: 0.9 });
    let run = |device: &Device, dtype: DType| -> Result<(Tensor, Vec<Tensor>)> {
        let w = proj.to_dtype(dtype)?.to_device(device)?.into();
        forward_backward(device, dtype, &[&gate, &up, &a, &b], &weights, &|t| crate::ops::swiglu_lora_linear(&t[0], &t[1], &w, (&t[2], &t[3]), 1.7, mask))
    };
    let ((y, g), (y_ref, g_ref)) = (run(c.device, c.dtype)?, run(&Device::Cpu, DType::F64)?);
    let shape_lora = format!("{shape_add} r{r}");
    c.record_pass("swiglu_lora", &shape_lora, &["y", "dg", "du", "dA", "dB"], (&y, &g), (&y_ref, &g_ref))?;
    // The adapters' dropout mask (`kernels/dropout.cu` on CUDA) is the CPU's, bit for bit: one
    // element off is an error of 1.
    let dropout = crate::ops::dropout::Dropout::new(0.3, &mut c.rng);
    let mask = dropout.mask(true).ok_or_else(|| crate::Error::msg("no dropout mask"))?;
    let like = |device: &Device, dtype: DType| Tensor::zeros((rows, width), dtype, device);
    let got = mask.tensor(&like(c.device, c.dtype)?)?;
    let reference = mask.tensor(&like(&Device::Cpu, DType::F64)?)?;
    c.record("dropout mask", &format!("{rows}x{width} p0.3"), "mask", &got, &reference)?;
    // x ⊙ mask without the mask (the fused adapter ops' forward and backward): the product in
    // the dtype, as candle's `x * mask` computes it.
    let x = c.draw(&[rows, width], 1.0)?;
    let got = mask.dropped(&c.on_device(&x)?)?;
    let reference = (&x * mask.tensor(&x)?)?;
    c.record("dropout apply", &format!("{rows}x{width} p0.3"), "x*mask", &got, &reference)
}

/// Runs every check on `device` (a CUDA device), `rounds` random shapes per kernel and dtype.
pub fn run(device: &Device, seed: u64, rounds: usize) -> Result<Vec<Check>> {
    if !device.is_cuda() {
        return Err(crate::Error::msg("selftest compares the CUDA kernels with their CPU references: it needs a CUDA device"));
    }
    let mut checks = Vec::new();
    for (i, dtype) in [DType::F32, DType::F16, DType::BF16].into_iter().enumerate() {
        let mut case = Case { device, dtype, rng: StdRng::seed_from_u64(seed + i as u64), checks: Vec::new() };
        for _ in 0..rounds {
            lowrank_cases(&mut case)?;
            for (dora, with_dropout) in [(false, false), (false, true), (true, false), (true, true)] {
                linear_cases(&mut case, dora, with_dropout)?;
            }
            control_case(&mut case)?;
            row_norms_case(&mut case)?;
            nf4_cases(&mut case)?;
            snell_cases(&mut case)?;
            attention_cases(&mut case)?;
            attention_gemm_cases(&mut case)?;
            layer_op_cases(&mut case)?;
            heads_cases(&mut case)?;
            adamw_case(&mut case)?;
        }
        checks.extend(case.checks);
    }
    Ok(checks)
}

/// The pass/fail table.
pub fn table(checks: &[Check]) -> String {
    let mut s = format!("{:<28} {:<5} {:<26} {:<6} {:>11} {:>11} {:>7}  result\n", "kernel", "dtype", "shape", "output", "max abs", "rel", "bound");
    for c in checks {
        s += &format!(
            "{:<28} {:<5} {:<26} {:<6} {:>11.3e} {:>11.3e} {:>7.0e}  {}\n",
            c.kernel,
            c.dtype,
            c.shape,
            c.output,
            c.max_abs,
            c.rel,
            c.bound,
            if c.pass { "pass" } else { "FAIL" }
        );
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    s += &format!("{} checks, {} failed\n", checks.len(), failed);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The harness itself on the CPU (both sides the CPU reference, in f32 against f64): every
    /// check runs and passes, so a failure on the GPU is the kernel's.
    fn passes_on_the_cpu(cases: fn(&mut Case) -> Result<()>, count: usize) {
        let mut case = Case { device: &Device::Cpu, dtype: DType::F32, rng: StdRng::seed_from_u64(3), checks: Vec::new() };
        cases(&mut case).unwrap();
        assert_eq!(case.checks.len(), count);
        let failed: Vec<_> = case.checks.iter().filter(|c| !c.pass).collect();
        assert!(failed.is_empty(), "{}", table(&case.checks));
    }

    #[test]
    fn the_snell_checks_pass_on_the_cpu_reference() {
        passes_on_the_cpu(snell_cases, 1 + 2 + 3 * 4);
    }

    #[test]
    fn the_dora_checks_pass_on_the_cpu_reference() {
        passes_on_the_cpu(|c| linear_cases(c, true, true), 5);
    }

    #[test]
    fn the_nf4_checks_pass_on_the_cpu_reference() {
        passes_on_the_cpu(nf4_cases, 2 * 3);
    }

    #[test]
    fn the_layer_op_checks_pass_on_the_cpu_reference() {
        passes_on_the_cpu(layer_op_cases, 3 + 3 + 3 + 4 + 5 + 1 + 1);
    }

    #[test]
    fn the_heads_checks_pass_on_the_cpu_reference() {
        // Rotated and plain split (y, dx); the frozen, LoRA and DoRA projections into heads.
        passes_on_the_cpu(heads_cases, 2 + 2 + 2 + 4 + 5);
    }

    #[test]
    fn the_attention_checks_pass_on_the_cpu_reference() {
        // Each shape against the f64 reference and the causal walk against the full one.
        passes_on_the_cpu(attention_cases, 2 * 4 * 2);
    }

    #[test]
    fn the_attention_gemm_checks_pass_on_the_cpu_reference() {
        // Two shapes, each in one chunk and chunked (on the CPU both are the reference op).
        passes_on_the_cpu(attention_gemm_cases, 2 * 2 * 4);
    }
}

//! The fused LoRA linear (Hu et al., ICLR 2022), forward and backward as one op:
//!
//! ```text
//! forward    xa = drop(x) Aᵀ                       [T, r]   kept for backward
//!            y  = x Wᵀ + s · xa Bᵀ                 [T, out] (the add accumulates into y)
//! backward   g  = dy B                             [T, r]
//!            dx = dy W + s · mask ⊙ (g A)          [T, in]  (accumulated into dx)
//!            dA = s · gᵀ drop(x)                   [r, in]
//!            dB = s · dyᵀ xa                       [out, r]
//! ```
//!
//! What it keeps for backward: the op's inputs x, A, B (candle holds them), `xa`, and with
//! dropout only the mask's seed: `drop(x)` and the mask are drawn again in backward, one at a
//! time, and let go (PEFT keeps both, a [T, in] tensor each); W as the layer holds it (an NF4
//! base stays packed and is dequantized in forward and again in backward, as bitsandbytes'
//! 4-bit matmul does). The
//! unfused candle graph keeps, besides, the [T, out] branch output twice (before and after
//! scaling) and the sum's inputs. On CUDA the GEMMs run in cuBLAS
//! (f32 accumulation, `s` passed as an f32 scalar) and the branch is added into y and dx in place
//! (`lowrank_add`), so no [T, out] or [T, in] temporary exists besides y and dx.
//!
//! Layout: x [T, in], W [out, in], A [r, in], B [out, r], mask [T, in] (drawn); row-major,
//! contiguous, one dtype (A and B are cast to x's dtype by the caller, as autocast would).
//!
//! Two variants take the layer's neighbours into the op, so that the graph does not keep a
//! tensor only the next op reads: [`lora_linear_heads`] (q, k, v: the output split into attention
//! heads) and [`swiglu_lora_linear`] (down_proj: x = silu(g) ⊙ u, recomputed in backward).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::lowrank_add::{lowrank_add, Factor};
use super::{cpu_tensor, join_factors, split_factors, tensor_cpu_storage, Precomputed};
use crate::ops::dropout::DropoutMask;
use crate::quant::BaseWeight;
use crate::ops::fused::{OutputFreeBackward, SwiGlu};
use crate::ops::nn::{accumulate_dtype, AttentionHeads};
use crate::Result;
use candle_core::{DType, Device, Var};
use rand::Rng;
use crate::kernel_bench::{randn, BenchShapes, KernelTiming};
use crate::selftest::{forward_backward, Case};

/// `x Wᵀ + s · (drop(x) Aᵀ) Bᵀ` for x [..., in], as one op with its own backward. `a` and `b`
/// must already be in x's dtype; `mask` is the dropout mask (divided by 1 − p) over x.
pub fn lora_linear(x: &Tensor, w: &BaseWeight, a: &Tensor, b: &Tensor, scale: f64, mask: Option<DropoutMask>) -> Result<Tensor> {
    let (x2, op) = lora_linear_op(x, w, a, b, scale, mask)?;
    let y = x2.apply_op3(&a.contiguous()?, &b.contiguous()?, op)?;
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("checked by lora_linear_op") = y.dim(1)?;
    Ok(y.reshape(out_dims)?)
}

/// [`lora_linear`] of x [b, t, in] with its output split into attention `heads` inside the op
/// ([`crate::ops::fused::ProjectedHeads`]): the [b, t, out] sum is not kept for backward.
pub fn lora_linear_heads(
    x: &Tensor,
    w: &BaseWeight,
    (a, b): (&Tensor, &Tensor),
    scale: f64,
    mask: Option<DropoutMask>,
    heads: AttentionHeads,
) -> Result<Tensor> {
    let (x2, op) = lora_linear_op(x, w, a, b, scale, mask)?;
    Ok(x2.apply_op3(&a.contiguous()?, &b.contiguous()?, heads.project(x, op)?)?)
}

/// x as [T, in] and the op, after checking that the shapes fit.
fn lora_linear_op(x: &Tensor, w: &BaseWeight, a: &Tensor, b: &Tensor, scale: f64, mask: Option<DropoutMask>) -> Result<(Tensor, LoraLinearOp)> {
    let d_in = *x.dims().last().ok_or_else(|| crate::Error::msg("lora_linear: x is a scalar"))?;
    let &[d_out, w_in] = w.dims() else {
        return Err(crate::Error::msg(format!("lora_linear: W {:?} is not a matrix", w.dims())));
    };
    let (r, a_in) = a.dims2()?;
    if w_in != d_in || a_in != d_in || b.dims() != [d_out, r] {
        return Err(crate::Error::msg(format!(
            "lora_linear: x {:?}, W {:?}, A {:?}, B {:?} do not fit together",
            x.dims(),
            w.dims(),
            a.dims(),
            b.dims()
        )));
    }
    let x2 = x.contiguous()?.reshape(((), d_in))?;
    let dropped = mask.map(|m| m.dropped(&x2)).transpose()?;
    let w = match w {
        BaseWeight::Dense(t) => BaseWeight::Dense(t.contiguous()?.detach()),
        nf4 => nf4.clone(),
    };
    Ok((x2, LoraLinearOp { w, scale, mask, dropped: Mutex::new(dropped), xa: Mutex::new(None) }))
}

struct LoraLinearOp {
    w: BaseWeight,
    scale: f64,
    mask: Option<DropoutMask>,
    /// drop(x) for the forward, which lets it go (the backward draws it again); None without
    /// dropout, where x itself is the adapter's input.
    dropped: Mutex<Option<Tensor>>,
    /// `drop(x) Aᵀ`, written by the forward for the backward.
    xa: Mutex<Option<Tensor>>,
}

impl LoraLinearOp {
    fn dense_w(&self) -> candle_core::Result<std::borrow::Cow<'_, Tensor>> {
        self.w.dense().map_err(candle_core::Error::wrap)
    }

    fn save_xa(&self, xa: Tensor) {
        *self.xa.lock().expect("xa lock") = Some(xa);
    }

    fn take_dropped(&self) -> Option<Tensor> {
        self.dropped.lock().expect("dropped lock").take()
    }
}

/// The backward reads x, A, B and `xa`, never y.
impl OutputFreeBackward for LoraLinearOp {}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let dtype = x.dtype();
        let acc = accumulate_dtype(dtype);
        let xt = cpu_tensor(x, lx, self.name())?.to_dtype(acc)?;
        let xd = match self.take_dropped() {
            Some(d) => d.to_dtype(acc)?,
            None => xt.clone(),
        };
        let a = cpu_tensor(a, la, self.name())?.to_dtype(acc)?;
        let b = cpu_tensor(b, lb, self.name())?.to_dtype(acc)?;
        let xa = xd.matmul(&a.t()?)?;
        let y = (super::frozen_x_wt(&xt, &*self.dense_w()?)? + (xa.matmul(&b.t()?)? * self.scale)?)?;
        self.save_xa(xa.to_dtype(dtype)?);
        let shape = y.shape().clone();
        Ok((tensor_cpu_storage(&y.to_dtype(dtype)?)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        a: &candle_core::CudaStorage,
        la: &Layout,
        b: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let dropped = self.take_dropped();
        let (y, xa) = super::cuda::lora_forward(&*self.dense_w()?, dropped.as_ref(), self.scale, (x, lx), (a, la), (b, lb))?;
        self.save_xa(xa);
        Ok(y)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let xa = self.xa.lock().expect("xa lock").clone();
        let Some(xa) = xa else { candle_core::bail!("fused-lora-linear: backward before forward") };
        // Detached: gradients that carry a graph would keep this step's tensors alive in the
        // optimizer state.
        let (x, a, b, dy) = (x.detach(), a.detach(), b.detach(), dy.detach());
        let wrap = |e: crate::Error| candle_core::Error::Msg(e.to_string());
        let g = dy.matmul(&b)?;
        // drop(x) and then the mask, each drawn from the seed and let go before the next.
        let da = match self.mask {
            Some(m) => g.t()?.matmul(&m.dropped(&x).map_err(wrap)?)?,
            None => g.t()?.matmul(&x)?,
        };
        let da = (da * self.scale)?;
        let dx = super::frozen_dy_w(&dy, &*self.dense_w()?)?;
        let mask = self.mask.map(|m| m.tensor(&x)).transpose().map_err(wrap)?;
        lowrank_add(&dx, &g, &a, Factor::Transposed, mask.as_ref(), self.scale).map_err(wrap)?;
        drop(mask);
        let db = (dy.t()?.matmul(&xa)? * self.scale)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// [`lora_linear`] of `x = silu(g) ⊙ u` (the MLP's down_proj), SwiGLU inside the op: the graph
/// holds g and u, which SwiGLU's backward reads anyway, and not the activation [T, in], which the
/// forward lets go and the backward recomputes (one elementwise pass) for dA and for SwiGLU's
/// own backward. `a` and `b` must already be in g's dtype.
pub fn swiglu_lora_linear(g: &Tensor, u: &Tensor, w: &BaseWeight, (a, b): (&Tensor, &Tensor), scale: f64, mask: Option<DropoutMask>) -> Result<Tensor> {
    swiglu_lora(g, u, w, (a, b), scale, mask, true)
}

/// [`swiglu_lora_linear`] in a graph that is only backpropagated through, never read
/// ([`super::BackwardOnly`]): the same gradients, but the forward computes only what the
/// backward reads, `xa = drop(x) Aᵀ` [T, r], and neither the base GEMM (nor an NF4 base's
/// dequantization) nor the branch's up-projection; the output is zeros.
pub fn swiglu_lora_linear_backward_only(
    g: &Tensor,
    u: &Tensor,
    w: &BaseWeight,
    (a, b): (&Tensor, &Tensor),
    scale: f64,
    mask: Option<DropoutMask>,
) -> Result<Tensor> {
    swiglu_lora(g, u, w, (a, b), scale, mask, false)
}

fn swiglu_lora(g: &Tensor, u: &Tensor, w: &BaseWeight, (a, b): (&Tensor, &Tensor), scale: f64, mask: Option<DropoutMask>, values: bool) -> Result<Tensor> {
    if g.shape() != u.shape() {
        return Err(crate::Error::msg(format!("swiglu_lora_linear: gate {:?} and up {:?} differ", g.dims(), u.dims())));
    }
    let d_in = *g.dims().last().ok_or_else(|| crate::Error::msg("swiglu_lora_linear: g is a scalar"))?;
    let (g2, u2) = (g.contiguous()?.reshape(((), d_in))?, u.contiguous()?.reshape(((), d_in))?);
    let activation = g2.detach().apply_op2_no_bwd(&u2.detach(), &SwiGlu)?;
    let (x2, lora) = lora_linear_op(&activation, w, a, b, scale, mask)?;
    let ab = join_factors(a, b)?;
    let rank = a.dim(0)?;
    let y = if values {
        // The op keeps xa from this forward for its backward; y is handed to the graph's node below.
        let y = x2.apply_op3_no_bwd(&a.detach().contiguous()?, &b.detach().contiguous()?, &lora)?;
        drop((x2, activation));
        let op = SwiGluLoraOp { lora, rank, output: Precomputed::new(Some(y)) };
        g2.apply_op3(&u2, &ab, op)?
    } else {
        let xa = match lora.take_dropped() {
            Some(dropped) => dropped.matmul(&a.detach().t()?)?,
            None => x2.matmul(&a.detach().t()?)?,
        };
        lora.save_xa(xa);
        drop((x2, activation));
        let shape = [g2.dim(0)?, b.dim(0)?];
        let op = SwiGluLoraOp { lora, rank, output: Precomputed::new(None) };
        g2.apply_op3(&u2, &ab, super::BackwardOnly::new(op, &shape, g)?)?
    };
    let mut out_dims = g.dims().to_vec();
    *out_dims.last_mut().expect("checked above") = y.dim(1)?;
    Ok(y.reshape(out_dims)?)
}

/// The node of [`swiglu_lora_linear`]: inputs g, u [T, in] and A, B flattened into one argument
/// (a custom op takes three; candle's cat routes dA and dB back).
struct SwiGluLoraOp {
    lora: LoraLinearOp,
    rank: usize,
    /// The output, computed before the op is applied.
    output: Precomputed,
}

/// The backward reads g, u, A, B and the saved `xa`, never y.
impl OutputFreeBackward for SwiGluLoraOp {}

impl CustomOp3 for SwiGluLoraOp {
    fn name(&self) -> &'static str {
        "swiglu-lora-linear"
    }

    precomputed_forward3!(output);

    fn bwd(&self, g: &Tensor, u: &Tensor, ab: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (d_in, r) = (g.dim(1)?, self.rank);
        let d_out = dy.dim(1)?;
        let ab = ab.detach();
        let (a, b) = split_factors(&ab, r, d_in, d_out)?;
        let activation = g.detach().apply_op2_no_bwd(&u.detach(), &SwiGlu)?;
        let (dx, da, db) = self.lora.bwd(&activation, &a, &b, y, dy)?;
        drop(activation);
        let (Some(dx), Some(da), Some(db)) = (dx, da, db) else { candle_core::bail!("{}: the LoRA backward gave no gradient", self.name()) };
        // SwiGLU's backward reads g, u and the gradient only (y stands in for its unread output).
        let (dg, du) = SwiGlu.bwd(g, u, y, &dx)?;
        let dab = join_factors(&da, &db)?;
        Ok((dg, du, Some(dab)))
    }
}

// The op on a device against its CPU reference (`candle-peft selftest`) and against the
// unfused graph it replaces (`candle-peft bench kernels`).

/// The LoRA linear, or with `dora` the DoRA linear (its row scale k as a fourth input).
pub(crate) fn linear_case(c: &mut Case, dora: bool, with_dropout: bool) -> Result<()> {
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
            true => super::dora_linear(&v[0], &w, &v[1], &v[2], &v[3], s, mask),
            false => lora_linear(&v[0], &w, &v[1], &v[2], s, mask),
        })
    };
    let (y, g) = run(c.device, c.dtype)?;
    let (y_ref, g_ref) = run(&Device::Cpu, DType::F64)?;
    c.record_pass(&kernel, &shape, &["y", "dx", "dA", "dB", "dk"], (&y, &g), (&y_ref, &g_ref))?;
    Ok(())
}

/// The LoRA linear, without and with dropout, and LoRA on the SwiGLU activation.
pub fn selftest(c: &mut Case) -> Result<()> {
    linear_case(c, false, false)?;
    linear_case(c, false, true)?;
    swiglu_lora_case(c)
}

/// LoRA on the SwiGLU activation (down_proj with an adapter), the activation recomputed.
fn swiglu_lora_case(c: &mut Case) -> Result<()> {
    let (rows, width, d_in, r) = (c.odd(33, 300), c.odd(65, 1100), c.odd(33, 500), c.odd(1, 40));
    let (gate, up) = (c.draw(&[rows, d_in], 2.0)?, c.draw(&[rows, d_in], 1.0)?);
    let (proj, a, b) = (c.draw(&[width, d_in], 0.1)?, c.draw(&[r, d_in], 0.1)?, c.draw(&[width, r], 0.1)?);
    let weights = c.draw(&[rows, width], 1.0)?;
    let mask = Some(DropoutMask { seed: c.rng.random(), keep: 0.9 });
    let run = |device: &Device, dtype: DType| -> Result<(Tensor, Vec<Tensor>)> {
        let w = proj.to_dtype(dtype)?.to_device(device)?.into();
        forward_backward(device, dtype, &[&gate, &up, &a, &b], &weights, &|t| swiglu_lora_linear(&t[0], &t[1], &w, (&t[2], &t[3]), 1.7, mask))
    };
    let ((y, g), (y_ref, g_ref)) = (run(c.device, c.dtype)?, run(&Device::Cpu, DType::F64)?);
    c.record_pass("swiglu_lora", &format!("{rows}x{d_in} -> {width} r{r}"), &["y", "dg", "du", "dA", "dB"], (&y, &g), (&y_ref, &g_ref))
}

pub fn bench(shapes: &BenchShapes, device: &Device, dtype: DType, out: &mut Vec<KernelTiming>) -> Result<()> {
    for (d_in, d_out, r, t) in shapes.lora_shapes() {
        let shape = format!("{d_in}x{d_out} r{r} T{t}");
        let x = Var::from_tensor(&randn(&[t, d_in], 1.0, dtype, device)?)?;
        let w = randn(&[d_out, d_in], 0.02, dtype, device)?;
        let a = Var::from_tensor(&randn(&[r, d_in], 0.02, DType::F32, device)?)?;
        let b = Var::from_tensor(&randn(&[d_out, r], 0.02, DType::F32, device)?)?;
        let s = 2.0;
        let base: crate::quant::BaseWeight = w.clone().into();
        let frozen_step = || -> Result<()> {
            crate::ops::nn::frozen_matmul_t_op(x.as_tensor(), &base)?.backward()?;
            Ok(())
        };
        let frozen = shapes.time(device, frozen_step)?;
        let frozen_mem = crate::memory::peak_extra_mib(device, frozen_step)?;
        let lora = |fused: bool| -> Result<()> {
            let (ac, bc) = (a.as_tensor().to_dtype(dtype)?, b.as_tensor().to_dtype(dtype)?);
            let y = if fused {
                lora_linear(x.as_tensor(), &base, &ac, &bc, s, None)?
            } else {
                let branch = (x.as_tensor().matmul(&ac.t()?)?.matmul(&bc.t()?)? * s)?;
                (x.as_tensor().matmul(&w.t()?)? + branch)?
            };
            y.backward()?;
            Ok(())
        };
        let unfused = shapes.time(device, || lora(false))?;
        let unfused_mem = crate::memory::peak_extra_mib(device, || lora(false))?;
        let fused = shapes.time(device, || lora(true))?;
        let fused_mem = crate::memory::peak_extra_mib(device, || lora(true))?;
        let base_flops = 4.0 * (t * d_in * d_out) as f64;
        let lora_flops = base_flops + 6.0 * (t * r * (d_in + d_out)) as f64;
        for (variant, ms, flops, mib) in [
            ("frozen linear", frozen, base_flops, frozen_mem),
            ("unfused LoRA", unfused, lora_flops, unfused_mem),
            ("fused LoRA", fused, lora_flops, fused_mem),
        ] {
            out.push(KernelTiming::new("lora_linear", &shape, variant, ms, frozen).flops(flops).peak_mib(mib));
        }
        // The CPU's mixed precision (`--dtype bf16` training): the same frozen linear with W in
        // bf16 under f32 x, its products on bf16 operands (`ops::gemm_bf16` where the CPU has it).
        if device.is_cpu() && dtype == DType::F32 {
            let base_bf16: crate::quant::BaseWeight = w.to_dtype(DType::BF16)?.into();
            let mixed_step = || -> Result<()> {
                crate::ops::nn::frozen_matmul_t_op(x.as_tensor(), &base_bf16)?.backward()?;
                Ok(())
            };
            let mixed = shapes.time(device, mixed_step)?;
            let mixed_mem = crate::memory::peak_extra_mib(device, mixed_step)?;
            out.push(KernelTiming::new("lora_linear", &shape, "frozen, bf16 W", mixed, frozen).flops(base_flops).peak_mib(mixed_mem));
        }
    }
    Ok(())
}

#[cfg(test)]
mod selftest_tests {
    use super::*;

    /// The checks run and pass with the CPU on both sides, so a failure on a GPU is the kernel's.
    #[test]
    fn the_selftest_checks_pass_on_the_cpu_reference() {
        crate::selftest::passes_on_the_cpu(selftest, 4 + 4 + 5);
    }
}

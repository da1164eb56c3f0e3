//! AdamW's update of one f32 parameter in place, in three passes (`kernels/adamw.cu` on CUDA):
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`, then
//! `p ← p·(1 − lr·wd) − lr · (m/bc₁) / (√(v/bc₂) + ε)` with `bcᵢ = 1 − βᵢᵗ`
//! (torch.optim.AdamW; the optimizer is `training::optim::AdamW`).
//!
//! The CPU code here is the reference, and it is also what CPU training runs: each expression
//! rounds where candle's ops of the unfused update round (`x·a + b` for a scalar affine, then the
//! binary op), so on the CPU the two agree bit for bit (`tests/adamw_fused.rs`). As candle ops an
//! update is fourteen launches and six temporaries per parameter; a LoRA on LLaMA-7B has 320
//! small parameters, so on a GPU the optimizer was launch-bound.

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor};
use candle_core::{DType, Device};
use crate::selftest::Case;
use crate::Result;

/// One step's scalars, in f32 as the update computes (each from its f64 value, as candle's
/// scalar ops convert theirs).
#[derive(Debug, Clone, Copy)]
pub struct AdamWScalars {
    pub beta1: f32,
    pub one_minus_beta1: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    /// `1 − lr·wd`; None without weight decay (the parameter is then not multiplied at all).
    pub decay: Option<f32>,
    pub inv_bc1: f32,
    pub inv_bc2: f32,
    pub eps: f32,
    pub lr: f32,
}

impl AdamWScalars {
    /// The scalars of step `t` (from 1) at learning rate `lr`.
    pub fn new((beta1, beta2): (f64, f64), eps: f64, weight_decay: Option<f64>, lr: f64, t: usize) -> Self {
        let (bc1, bc2) = (1.0 - beta1.powi(t as i32), 1.0 - beta2.powi(t as i32));
        Self {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            decay: weight_decay.map(|wd| (1.0 - lr * wd) as f32),
            inv_bc1: (1.0 / bc1) as f32,
            inv_bc2: (1.0 / bc2) as f32,
            eps: eps as f32,
            lr: lr as f32,
        }
    }
}

/// Whether [`adamw_update`] takes these tensors: f32, contiguous, on one device.
pub fn adamw_applies(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> bool {
    let all = [p, g, m, v];
    all.iter().all(|t| t.dtype() == candle_core::DType::F32 && t.is_contiguous() && t.dims() == p.dims() && t.device().same_device(p.device()))
        && (p.device().is_cpu() || p.device().is_cuda())
        && !super::unfused()
}

/// The update, in place on p, m and v (see [`adamw_applies`]).
pub fn adamw_update(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: AdamWScalars) -> candle_core::Result<()> {
    m.inplace_op2(g, &Moment { decay: s.beta1, gain: s.one_minus_beta1, square: false })?;
    v.inplace_op2(g, &Moment { decay: s.beta2, gain: s.one_minus_beta2, square: true })?;
    p.inplace_op3(m, v, &Apply(s))
}

/// `moment ← decay·moment + gain·x`, x = g or g².
struct Moment {
    decay: f32,
    gain: f32,
    square: bool,
}

/// `p ← p·decay − lr · (m·inv_bc1) / (√(v·inv_bc2) + ε)`.
struct Apply(AdamWScalars);

fn f32s<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        _ => candle_core::bail!("adamw: {what} must be contiguous f32"),
    }
}

fn f32s_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("adamw: {what} must be contiguous f32"),
    }
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, g: &CpuStorage, gl: &Layout) -> candle_core::Result<()> {
        let (moment, g) = (f32s_mut(dst, dst_l, "the moment")?, f32s(g, gl, "the gradient")?);
        for (m, &g) in moment.iter_mut().zip(g) {
            let x = if self.square { g * g } else { g };
            *m = (*m * self.decay + 0.0) + (x * self.gain + 0.0);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, dst: &mut candle_core::CudaStorage, dst_l: &Layout, g: &candle_core::CudaStorage, gl: &Layout) -> candle_core::Result<()> {
        super::cuda::adamw::moment((dst, dst_l), (g, gl), self.decay, self.gain, self.square)
    }
}

impl InplaceOp3 for Apply {
    fn name(&self) -> &'static str {
        "adamw-apply"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, m: &CpuStorage, ml: &Layout, v: &CpuStorage, vl: &Layout) -> candle_core::Result<()> {
        let s = self.0;
        let p = f32s_mut(dst, dst_l, "the parameter")?;
        let (m, v) = (f32s(m, ml, "m")?, f32s(v, vl, "v")?);
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            let denom = (v * s.inv_bc2 + 0.0).sqrt() * 1.0 + s.eps;
            let update = (m * s.inv_bc1 + 0.0) / denom;
            let decayed = match s.decay {
                Some(decay) => *p * decay + 0.0,
                None => *p,
            };
            *p = decayed - (update * s.lr + 0.0);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    #[allow(clippy::too_many_arguments)]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        dst_l: &Layout,
        m: &candle_core::CudaStorage,
        ml: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<()> {
        super::cuda::adamw::apply((dst, dst_l), (m, ml), (v, vl), self.0)
    }
}

// The op on a device against its CPU reference (`candle-peft selftest`).

/// The update on the device (f32, `kernels/adamw.cu` on CUDA) against the same two steps in f64
/// candle ops on the CPU, with weight decay: the parameter's change and both moments.
pub fn selftest(c: &mut Case) -> Result<()> {
    if c.dtype != DType::F32 {
        return Ok(());
    }
    let n = c.odd(1_000, 70_000);
    // Parameters of an adapter's size (LoRA's A at LLaMA widths is about 1e-2), so that the f32
    // storage's rounding of p (an ulp of p) stays far below the change compared.
    let (p, g1, g2) = (c.draw(&[n], 1e-2)?, c.draw(&[n], 1e-2)?, c.draw(&[n], 1e-2)?);
    let (betas, eps, wd, lr) = ((0.9, 0.999), 1e-8, 0.1, 1e-3);
    let on = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(c.device)?) };
    let (dp, dm, dv) = (on(&p)?, on(&p.zeros_like()?)?, on(&p.zeros_like()?)?);
    let (mut rp, mut rm, mut rv) = (p.clone(), p.zeros_like()?, p.zeros_like()?);
    for (t, g) in [(1, &g1), (2, &g2)] {
        adamw_update(&dp, &on(g)?, &dm, &dv, AdamWScalars::new(betas, eps, Some(wd), lr, t))?;
        let (bc1, bc2) = (1.0 - betas.0.powi(t as i32), 1.0 - betas.1.powi(t as i32));
        rm = ((rm * betas.0)? + (g * (1.0 - betas.0))?)?;
        rv = ((rv * betas.1)? + (g.sqr()? * (1.0 - betas.1))?)?;
        let step = ((&rm / bc1)? / ((&rv / bc2)?.sqrt()? + eps)?)?;
        rp = ((rp * (1.0 - lr * wd))? - (step * lr)?)?;
    }
    let change = |q: &Tensor| -> Result<Tensor> { Ok((q.to_device(&Device::Cpu)?.to_dtype(DType::F64)? - &p)?) };
    let shape = n.to_string();
    c.record("adamw", &shape, "dp", &change(&dp)?, &(&rp - &p)?)?;
    c.record("adamw", &shape, "m", &dm, &rm)?;
    c.record("adamw", &shape, "v", &dv, &rv)
}

#[cfg(test)]
mod selftest_tests {
    use super::*;

    /// The checks run and pass with the CPU on both sides (there the update is the CPU code
    /// here), so a failure on a GPU is the kernel's.
    #[test]
    fn the_selftest_checks_pass_on_the_cpu_reference() {
        crate::selftest::passes_on_the_cpu(selftest, 3);
    }
}

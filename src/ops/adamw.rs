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

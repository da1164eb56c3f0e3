//! SwiGLU's gate, keeping only its two inputs.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use num_traits::Float;

use super::*;

/// SwiGLU's gate `y = silu(g) ⊙ u = g·σ(g) ⊙ u`. Saves g and u only. On CUDA both passes are
/// the kernels of `kernels/swiglu.cu` (this op's CPU code is their reference).
/// Backward: `du = dy ⊙ silu(g)`, `dg = dy ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g)))`.
pub struct SwiGlu;

fn swiglu_values<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
    g.iter().zip(u).map(|(&g, &u)| g / (T::one() + (-g).exp()) * u).collect()
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("{}: gate {:?} and up {:?} differ", self.name(), l1.shape(), l2.shape());
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => {
                CpuStorage::F32(swiglu_values(contiguous(g, l1, self.name())?, contiguous(u, l2, self.name())?))
            }
            (CpuStorage::F64(g), CpuStorage::F64(u)) => {
                CpuStorage::F64(swiglu_values(contiguous(g, l1, self.name())?, contiguous(u, l2, self.name())?))
            }
            _ => candle_core::bail!("{}: gate and up must both be f32 or f64", self.name()),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::swiglu::forward((s1, l1), (s2, l2))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if g.device().is_cuda() {
            let (dg, du) = crate::ops::cuda::swiglu::backward(g, u, dy)?;
            return Ok((Some(dg), Some(du)));
        }
        let (g, u) = (&g.detach(), &u.detach());  // no graph behind dg, du (see RmsNorm's bwd)
        let sig = (g.neg()?.exp()? + 1.0)?.recip()?;
        let silu = (g * &sig)?;
        let du = (dy * &silu)?;
        // σ(g)(1 + g(1 − σ(g))) = σ(g) + silu(g)(1 − σ(g))
        let dsilu = (&sig + (silu * (1.0 - &sig)?)?)?;
        let dg = ((dy * u)? * dsilu)?;
        Ok((Some(dg), Some(du)))
    }
}

//! SwiGLU's gate, keeping only its two inputs.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use num_traits::Float;

use super::*;
use candle_core::{DType, Device};
use crate::selftest::{forward_backward, Case};

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
                use rayon::prelude::*;
                let (g, u) = (contiguous(g, l1, self.name())?, contiguous(u, l2, self.name())?);
                let mut out = vec![0f32; g.len()];
                const TASK: usize = 16384;
                out.par_chunks_mut(TASK).zip(g.par_chunks(TASK).zip(u.par_chunks(TASK))).for_each(|(o, (g, u))| crate::ops::exp::silu_mul(g, u, o));
                CpuStorage::F32(out)
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
        let sig = (crate::ops::exp::exp_tensor(&g.neg()?)? + 1.0)?.recip()?;
        let silu = (g * &sig)?;
        let du = (dy * &silu)?;
        // σ(g)(1 + g(1 − σ(g))) = σ(g) + silu(g)(1 − σ(g))
        let dsilu = (&sig + (silu * (1.0 - &sig)?)?)?;
        let dg = ((dy * u)? * dsilu)?;
        Ok((Some(dg), Some(du)))
    }
}

// The op on a device against its CPU reference (`candle-peft selftest`).

/// SwiGLU as training runs it on the device (`kernels/swiglu.cu`) against the fused CPU op in
/// f64, on odd widths.
pub fn selftest(c: &mut Case) -> crate::Result<()> {
    let (rows, width) = (c.odd(33, 300), c.odd(65, 1100));
    let (gate, up, weights) = (c.draw(&[rows, width], 2.0)?, c.draw(&[rows, width], 1.0)?, c.draw(&[rows, width], 1.0)?);
    let run = |device: &Device, dtype: DType| forward_backward(device, dtype, &[&gate, &up], &weights, &|t| crate::ops::nn::swiglu(&t[0], &t[1], true));
    let ((y, g), (y_ref, g_ref)) = (run(c.device, c.dtype)?, run(&Device::Cpu, DType::F64)?);
    c.record_pass("swiglu", &format!("{rows}x{width}"), &["y", "dg", "du"], (&y, &g), (&y_ref, &g_ref))
}

#[cfg(test)]
mod selftest_tests {
    use super::*;

    /// The checks run and pass with the CPU on both sides, so a failure on a GPU is the kernel's.
    #[test]
    fn the_selftest_checks_pass_on_the_cpu_reference() {
        crate::selftest::passes_on_the_cpu(selftest, 3);
    }
}

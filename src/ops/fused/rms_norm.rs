//! RMSNorm with the per-row scale kept for backward.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Tensor, WithDType};
use num_traits::Float;

use super::*;
use candle_core::DType;
use crate::selftest::{forward_backward, Case};

/// RMSNorm over the last dimension: `y = x · r ⊙ w`, `r = 1/√(mean(x²) + ε)` per row.
/// Saves x (the graph's input) and, in the op, the per-row `r` [rows, 1].
/// Backward, with `n = x·r`: `dw = Σ_rows dy ⊙ n`, `dx = r · (dn − n · mean(dn ⊙ n))`, `dn = dy ⊙ w`.
pub struct RmsNorm {
    eps: f64,
    rstd: OnceLock<Tensor>,
}

impl RmsNorm {
    pub fn new(eps: f64) -> Self {
        Self { eps, rstd: OnceLock::new() }
    }

    fn keep_rstd(&self, rstd: Tensor) -> candle_core::Result<()> {
        // A second forward through the same op value would overwrite nothing: keep the first.
        if self.rstd.set(rstd).is_err() {
            candle_core::bail!("{}: an op value is applied once", self.name());
        }
        Ok(())
    }
}

fn rms_norm_rows<T: Float + WithDType>(x: &[T], w: &[T], eps: f64) -> (Vec<T>, Vec<T>) {
    let cols = w.len();
    let mut out = Vec::with_capacity(x.len());
    let mut rstd = Vec::with_capacity(x.len() / cols.max(1));
    let n = T::from(cols).expect("row length");
    for row in x.chunks(cols) {
        let ms = row.iter().fold(T::zero(), |s, &v| s + v * v) / n;
        let r = (ms + T::from(eps).expect("eps")).sqrt().recip();
        rstd.push(r);
        out.extend(row.iter().zip(w).map(|(&v, &g)| v * r * g));
    }
    (out, rstd)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let cols = l1.shape().dims().last().copied().unwrap_or(1);
        if l2.shape().elem_count() != cols {
            candle_core::bail!("{}: weight of {} for rows of {cols}", self.name(), l2.shape().elem_count());
        }
        let rows = l1.shape().elem_count() / cols.max(1);
        let (out, rstd) = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                let (o, r) = rms_norm_rows(contiguous(x, l1, self.name())?, contiguous(w, l2, self.name())?, self.eps);
                (CpuStorage::F32(o), Tensor::from_vec(r, (rows, 1), &Device::Cpu)?)
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                let (o, r) = rms_norm_rows(contiguous(x, l1, self.name())?, contiguous(w, l2, self.name())?, self.eps);
                (CpuStorage::F64(o), Tensor::from_vec(r, (rows, 1), &Device::Cpu)?)
            }
            _ => candle_core::bail!("{}: x and weight must both be f32 or f64", self.name()),
        };
        self.keep_rstd(rstd)?;
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
        let (y, shape, rstd) = crate::ops::cuda::rms_norm::forward((s1, l1), (s2, l2), self.eps)?;
        self.keep_rstd(rstd)?;
        Ok((y, shape))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(rstd) = self.rstd.get() else { candle_core::bail!("{}: backward before forward", self.name()) };
        let cols = w.elem_count();
        let rows = x.elem_count() / cols.max(1);
        // In f32 for bf16 / f16 (the row means of a 4096-wide row), as the forward normalises.
        let acc = crate::ops::nn::accumulate_dtype(x.dtype());
        // One [rows, cols] temporary per statement, each dropped as soon as it is used: on a
        // LLaMA-7B batch every one of them is 64 MiB in f32.
        let rstd = rstd.to_dtype(acc)?;
        let weight_trained = w.track_op();
        // x and w are the graph's tensors: computed from them as they are, dx and dw would carry
        // a graph holding every temporary below for as long as they wait in the gradient store.
        let (x, w) = (&x.detach(), &w.detach());
        let normed = || x.reshape((rows, cols))?.to_dtype(acc)?.broadcast_mul(&rstd);
        let dy2 = || dy.reshape((rows, cols))?.to_dtype(acc);
        let weight_gradient = |n: &Tensor, dy2: &Tensor| (dy2 * n)?.sum(0)?.reshape(w.shape())?.to_dtype(w.dtype());
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let dx = crate::ops::cuda::rms_norm::backward(x, w, &rstd, dy)?;
            // Every adapter method freezes the norms; only full fine-tuning needs dw.
            let dw = if weight_trained { Some(weight_gradient(&normed()?, &dy2()?)?) } else { None };
            return Ok((Some(dx), dw));
        }
        let (n, dy2) = (normed()?, dy2()?);
        let dw = weight_trained.then(|| weight_gradient(&n, &dy2)).transpose()?;
        let dn = dy2.broadcast_mul(&w.reshape((1, cols))?.to_dtype(acc)?)?;
        drop(dy2);
        let dot = (&dn * &n)?.mean_keepdim(1)?;
        let projected = n.broadcast_mul(&dot)?;
        drop(n);
        let dx = (dn - projected)?;
        let dx = dx.broadcast_mul(&rstd)?.reshape(x.shape())?.to_dtype(x.dtype())?;
        Ok((Some(dx), dw))
    }
}

// The op on a device against its CPU reference (`candle-peft selftest`).

/// RMSNorm as training runs it on the device (`kernels/rms_norm.cu`, dw by candle ops) against
/// the fused CPU op in f64, on odd widths.
pub fn selftest(c: &mut Case) -> crate::Result<()> {
    let (rows, width) = (c.odd(33, 300), c.odd(65, 1100));
    let (x, w, weights) = (c.draw(&[rows, width], 1.0)?, c.draw(&[width], 1.0)?, c.draw(&[rows, width], 1.0)?);
    let run = |device: &Device, dtype: DType| forward_backward(device, dtype, &[&x, &w], &weights, &|t| crate::ops::nn::rms_norm(&t[0], &t[1], 1e-5, true));
    let ((y, g), (y_ref, g_ref)) = (run(c.device, c.dtype)?, run(&Device::Cpu, DType::F64)?);
    c.record_pass("rms_norm", &format!("{rows}x{width}"), &["y", "dx", "dw"], (&y, &g), (&y_ref, &g_ref))
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

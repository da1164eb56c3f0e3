//! The control branch of Parallel / Double Control (seed 001, ICML 2025) fused with the residual
//! add that follows it:
//!
//! ```text
//! forward    out  = base + α · z Bᵀ          base = h + F(h) [T, d], z = drop(A h) [T, r], B [d, r]
//! backward   dbase = dout,  dz = α · dout B,  dB = α · doutᵀ z
//! ```
//!
//! Unfused, candle computes `z Bᵀ` [T, d], scales it into a second [T, d] tensor and adds it,
//! keeping both for a backward that needs neither. Here the branch is accumulated tile by tile
//! into the output (`kernels/lowrank_add.cu` with a separate source), so the only [T, d] tensor
//! written is `out`, and the backward needs only z and B.
//!
//! Layout: base and out [T, d], z [T, r], B [d, r]; row-major, contiguous, one dtype.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::{cpu_tensor, tensor_cpu_storage};
use crate::ops::nn::accumulate_dtype;
use crate::Result;
use candle_core::{DType, Device, Var};
use crate::kernel_bench::{randn, BenchShapes, KernelTiming};
use crate::selftest::{forward_backward, Case};

/// `base + α · z Bᵀ` for base [..., d] and z [..., r], B [d, r] (all one dtype).
pub fn control_branch(base: &Tensor, z: &Tensor, b: &Tensor, alpha: f64) -> Result<Tensor> {
    let dims = base.dims().to_vec();
    let d = *dims.last().ok_or_else(|| crate::Error::msg("control_branch: base is a scalar"))?;
    let r = b.dim(1)?;
    if b.dims() != [d, r] || z.dims().last() != Some(&r) || z.elem_count() / r != base.elem_count() / d {
        return Err(crate::Error::msg(format!(
            "control_branch: base {:?}, z {:?} and B {:?} do not fit together",
            base.dims(),
            z.dims(),
            b.dims()
        )));
    }
    let base2 = base.contiguous()?.reshape(((), d))?;
    let z2 = z.contiguous()?.reshape(((), r))?;
    let out = base2.apply_op3(&z2, &b.contiguous()?, ControlBranchOp { alpha })?;
    Ok(out.reshape(dims)?)
}

struct ControlBranchOp {
    alpha: f64,
}

impl CustomOp3 for ControlBranchOp {
    fn name(&self) -> &'static str {
        "fused-control-branch"
    }

    fn cpu_fwd(
        &self,
        base: &CpuStorage,
        l_base: &Layout,
        z: &CpuStorage,
        lz: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let acc = accumulate_dtype(base.dtype());
        let z = cpu_tensor(z, lz, self.name())?.to_dtype(acc)?;
        let b = cpu_tensor(b, lb, self.name())?.to_dtype(acc)?;
        let branch = z.matmul(&b.t()?)?.flatten_all()?;
        let Some((start, end)) = l_base.contiguous_offsets() else { candle_core::bail!("{}: base must be contiguous", self.name()) };
        let alpha = self.alpha;
        let out = match base {
            CpuStorage::F32(v) => {
                let br = branch.to_vec1::<f32>()?;
                CpuStorage::F32(v[start..end].iter().zip(&br).map(|(x, p)| x + alpha as f32 * p).collect())
            }
            CpuStorage::F64(v) => {
                let br = branch.to_vec1::<f64>()?;
                CpuStorage::F64(v[start..end].iter().zip(&br).map(|(x, p)| x + alpha * p).collect())
            }
            other => {
                let base = cpu_tensor(other, l_base, self.name())?;
                let sum = (base.to_dtype(acc)? + (branch.reshape(l_base.shape())? * alpha)?)?;
                tensor_cpu_storage(&sum.to_dtype(base.dtype())?)?
            }
        };
        Ok((out, l_base.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        base: &candle_core::CudaStorage,
        l_base: &Layout,
        z: &candle_core::CudaStorage,
        lz: &Layout,
        b: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::control_branch(self.alpha, (base, l_base), (z, lz), (b, lb))
    }

    fn bwd(
        &self,
        _base: &Tensor,
        z: &Tensor,
        b: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: gradients that carry a graph would keep this step's tensors alive in the
        // optimizer state.
        let (z, b, dout) = (z.detach(), b.detach(), dout.detach());
        let dz = (dout.matmul(&b)? * self.alpha)?;
        let db = (dout.t()?.matmul(&z)? * self.alpha)?;
        Ok((Some(dout.clone()), Some(dz), Some(db)))
    }
}

// The op on a device against its CPU reference (`candle-peft selftest`) and against the
// unfused graph it replaces (`candle-peft bench kernels`).

pub fn selftest(c: &mut Case) -> Result<()> {
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

pub fn bench(shapes: &BenchShapes, device: &Device, dtype: DType, out: &mut Vec<KernelTiming>) -> Result<()> {
    let d = shapes.dims.first().map_or(4096, |&(d_in, _)| d_in);
    for &t in &shapes.tokens {
        let (r, alpha) = (64, 1.0);
        let shape = format!("d{d} r{r} T{t}");
        let base = Var::from_tensor(&randn(&[t, d], 1.0, dtype, device)?)?;
        let z = Var::from_tensor(&randn(&[t, r], 1.0, dtype, device)?)?;
        let b = Var::from_tensor(&randn(&[d, r], 0.02, dtype, device)?)?;
        let run = |fused: bool| -> Result<()> {
            let y = if fused {
                control_branch(base.as_tensor(), z.as_tensor(), b.as_tensor(), alpha)?
            } else {
                (base.as_tensor() + (z.as_tensor().matmul(&b.as_tensor().t()?)? * alpha)?)?
            };
            y.backward()?;
            Ok(())
        };
        let unfused = shapes.time(device, || run(false))?;
        let fused = shapes.time(device, || run(true))?;
        for (variant, ms) in [("unfused", unfused), ("fused", fused)] {
            out.push(KernelTiming::new("control_branch", &shape, variant, ms, unfused));
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
        crate::selftest::passes_on_the_cpu(selftest, 4);
    }
}

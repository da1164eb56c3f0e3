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


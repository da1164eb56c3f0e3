//! Low-rank accumulate, in place: `out += s · (z Mᵀ) ⊙ mask`, where `M` is either B [cols, r]
//! or Aᵀ for A [r, cols] (read through strides, never transposed in memory). The [rows, cols]
//! product is never materialised: on CUDA each output tile is computed from the rank-r factors
//! (`kernels/lowrank_add.cu`) or, without a mask, by cuBLAS with β = 1, which accumulates into
//! `out` directly.
//!
//! Layout: `out` [rows, cols], `z` [rows, r], `mask` [rows, cols] (the dropout mask, already
//! divided by 1 − p): row-major, contiguous. The CPU path forms the product transiently with
//! candle's matmul (in f32 for half types) and adds it into `out`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp3, Layout, Tensor};

use super::{cpu_tensor, tensor_cpu_storage};
use crate::ops::nn::accumulate_dtype;
use crate::Result;
use crate::selftest::Case;

/// The rank-r right factor `M` [cols, r] of the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    /// The tensor is M itself, [cols, r] (LoRA's B).
    Rows,
    /// The tensor is Mᵀ, [r, cols] (LoRA's A, in `dx += (dy B) A`).
    Transposed,
}

impl Factor {
    /// Element strides (column j, rank k) of M[j, k] in the tensor's memory.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn strides(self, cols: usize, r: usize) -> (usize, usize) {
        match self {
            Factor::Rows => (r, 1),
            Factor::Transposed => (1, cols),
        }
    }
}

/// `out += s · (z Mᵀ) ⊙ mask`, in place on `out` (which must own its storage: a fresh result,
/// not a view shared with other tensors). Not tracked by autograd: the callers are backward
/// passes and fused forwards that define their own gradients.
pub fn lowrank_add(out: &Tensor, z: &Tensor, m: &Tensor, factor: Factor, mask: Option<&Tensor>, scale: f64) -> Result<()> {
    let (rows, cols) = out.dims2()?;
    let (z_rows, r) = z.dims2()?;
    let expected = match factor {
        Factor::Rows => [cols, r],
        Factor::Transposed => [r, cols],
    };
    if z_rows != rows || m.dims() != expected {
        return Err(crate::Error::msg(format!(
            "lowrank_add: out {:?}, z {:?} and factor {:?} ({factor:?}) do not fit together",
            out.dims(),
            z.dims(),
            m.dims()
        )));
    }
    if let Some(mask) = mask {
        if mask.dims() != out.dims() {
            return Err(crate::Error::msg(format!("lowrank_add: mask {:?} for out {:?}", mask.dims(), out.dims())));
        }
    }
    let op = LowRankAdd { factor, mask: mask.map(|t| t.contiguous()).transpose()?, scale };
    out.inplace_op3(&z.contiguous()?, &m.contiguous()?, &op)?;
    Ok(())
}

pub(crate) struct LowRankAdd {
    pub factor: Factor,
    pub mask: Option<Tensor>,
    pub scale: f64,
}

impl LowRankAdd {
    /// The CPU path: `s · (z Mᵀ) ⊙ mask` as a transient [rows, cols] tensor in z's dtype.
    fn product(&self, z: &Tensor, m: &Tensor) -> candle_core::Result<Tensor> {
        let mt = match self.factor {
            Factor::Rows => m.t()?,
            Factor::Transposed => m.clone(),
        };
        let p = (z.matmul(&mt)? * self.scale)?;
        match &self.mask {
            Some(mask) => {
                let mask = mask.to_dtype(p.dtype())?;
                p * mask
            }
            None => Ok(p),
        }
    }
}

impl InplaceOp3 for LowRankAdd {
    fn name(&self) -> &'static str {
        "lowrank-add"
    }

    fn cpu_fwd(&self, out: &mut CpuStorage, lo: &Layout, z: &CpuStorage, lz: &Layout, m: &CpuStorage, lm: &Layout) -> candle_core::Result<()> {
        let dtype = out.dtype();
        let acc = accumulate_dtype(dtype);
        let product = self.product(&cpu_tensor(z, lz, self.name())?.to_dtype(acc)?, &cpu_tensor(m, lm, self.name())?.to_dtype(acc)?)?;
        let sum = (cpu_tensor(out, lo, self.name())?.to_dtype(acc)? + product)?.to_dtype(dtype)?;
        let Some((start, end)) = lo.contiguous_offsets() else { candle_core::bail!("lowrank-add: out must be contiguous") };
        match (out, tensor_cpu_storage(&sum)?) {
            (CpuStorage::F64(o), CpuStorage::F64(v)) => o[start..end].copy_from_slice(&v),
            (CpuStorage::F32(o), CpuStorage::F32(v)) => o[start..end].copy_from_slice(&v),
            (CpuStorage::F16(o), CpuStorage::F16(v)) => o[start..end].copy_from_slice(&v),
            (CpuStorage::BF16(o), CpuStorage::BF16(v)) => o[start..end].copy_from_slice(&v),
            _ => candle_core::bail!("lowrank-add: out, z and M must share one float dtype"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        out: &mut candle_core::CudaStorage,
        lo: &Layout,
        z: &candle_core::CudaStorage,
        lz: &Layout,
        m: &candle_core::CudaStorage,
        lm: &Layout,
    ) -> candle_core::Result<()> {
        super::cuda::lowrank_add(self, out, lo, z, lz, m, lm)
    }
}

// The op on a device against its CPU reference (`candle-peft selftest`).

pub fn selftest(c: &mut Case) -> Result<()> {
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

#[cfg(test)]
mod selftest_tests {
    use super::*;

    /// The checks run and pass with the CPU on both sides, so a failure on a GPU is the kernel's.
    #[test]
    fn the_selftest_checks_pass_on_the_cpu_reference() {
        crate::selftest::passes_on_the_cpu(selftest, 3);
    }
}

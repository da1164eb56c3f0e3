//! NF4 on the GPU (`kernels/nf4.cu`): dequantize to a dense matrix; and, straight from the packed
//! codes, the batch-1 GEMV of decoding, `y = dequant(W) x`, and the few-row matmul of beam search
//! and small batches. All read the buffers that
//! [`Nf4Tensor::device_buffers`] uploads once. The CPU references are
//! [`Nf4Tensor::dequantize_reference`] and the dense product with it.
//!
//! Values are bit-identical to the reference (the kernel rounds each weight to the stored dtype
//! exactly as the reference does); the GEMV accumulates in f32.

use candle_core::{DType, Tensor};

use super::Nf4Tensor;
use crate::Result;

/// The dequantized weights in `dtype` on the tensor's device: the CUDA kernel on a GPU, the CPU
/// reference elsewhere.
pub fn dequantize(w: &Nf4Tensor, dtype: DType) -> Result<Tensor> {
    if !w.device.is_cuda() {
        return w.dequantize_reference(dtype);
    }
    #[cfg(feature = "cuda")]
    {
        Ok(super::nf4_cuda::dequantize(w, dtype)?)
    }
    #[cfg(not(feature = "cuda"))]
    Err(crate::Error::msg("NF4 on a CUDA device needs a build with the `cuda` feature"))
}

/// `x Wᵀ` for one row x [..., in] (all leading dims 1), W NF4 [out, in]; not differentiable
/// (decoding). On a GPU one kernel reads the packed codes; elsewhere dequantize then multiply.
pub fn gemv(w: &Nf4Tensor, x: &Tensor) -> Result<Tensor> {
    let (rows, cols) = (w.shape[0], w.shape.get(1).copied().unwrap_or(1));
    let dims = x.dims().to_vec();
    if w.shape.len() != 2 || dims.last() != Some(&cols) || x.elem_count() != cols {
        return Err(crate::Error::msg(format!("nf4 gemv: x {:?} is not one row for W {:?}", dims, w.shape)));
    }
    let mut out_dims = dims;
    *out_dims.last_mut().expect("checked") = rows;
    if !w.device.is_cuda() {
        let dense = w.dequantize_reference(x.dtype())?;
        return Ok(x.reshape((1, cols))?.matmul(&dense.t()?)?.reshape(out_dims)?);
    }
    #[cfg(feature = "cuda")]
    {
        Ok(super::nf4_cuda::rows_matmul(w, &x.contiguous()?, false)?.reshape(out_dims)?)
    }
    #[cfg(not(feature = "cuda"))]
    Err(crate::Error::msg("NF4 on a CUDA device needs a build with the `cuda` feature"))
}

/// Rows of x per block row of the few-row kernel (`FEW_ROWS` in `kernels/nf4.cu`).
pub const FEW_ROWS: usize = 8;

/// Up to this many untracked rows of x take [`matmul_few`] on a GPU instead of dequantize then
/// cuBLAS. Chosen, not measured: `bench nf4` times both for 1 to 1,024 rows on the GPU machine.
pub const FEW_ROWS_MAX: usize = 64;

/// `x Wᵀ` for x [..., in], W NF4 [out, in]; not differentiable (decoding with beams, small
/// batches). On a GPU one kernel reads the packed codes, decoding each weight once for up to
/// [`FEW_ROWS`] rows of x; elsewhere dequantize then multiply.
pub fn matmul_few(w: &Nf4Tensor, x: &Tensor) -> Result<Tensor> {
    let (rows, cols) = (w.shape[0], w.shape.get(1).copied().unwrap_or(1));
    let dims = x.dims().to_vec();
    if w.shape.len() != 2 || dims.last() != Some(&cols) {
        return Err(crate::Error::msg(format!("nf4 matmul: x {:?} does not end in W's {cols} inputs (W {:?})", dims, w.shape)));
    }
    let t = x.elem_count() / cols.max(1);
    let mut out_dims = dims;
    *out_dims.last_mut().expect("checked") = rows;
    if !w.device.is_cuda() {
        let dense = w.dequantize_reference(x.dtype())?;
        return Ok(x.reshape((t, cols))?.matmul(&dense.t()?)?.reshape(out_dims)?);
    }
    #[cfg(feature = "cuda")]
    {
        Ok(super::nf4_cuda::rows_matmul(w, &x.contiguous()?, true)?.reshape(out_dims)?)
    }
    #[cfg(not(feature = "cuda"))]
    Err(crate::Error::msg("NF4 on a CUDA device needs a build with the `cuda` feature"))
}

//! Host side of `kernels/dropout.cu`: inverted-dropout masks drawn on the GPU, bit for bit the
//! masks `ops::dropout::Dropout` draws on the CPU, and `x ⊙ mask` without the mask.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{bail, DType, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

use super::{grid_stride, view, wrap, KernelType, DROPOUT_PTX};
use crate::cuda::with_kernel_type;

/// The mask [shape] in `dtype` on `dev`: `1/keep` where the draw of element i is under `keep`.
pub fn mask(dev: &CudaDevice, shape: &Shape, dtype: DType, seed: u64, keep: f32) -> Result<Tensor> {
    let n = shape.elem_count();
    with_kernel_type!(dtype, T, {
        // SAFETY: the kernel writes all n elements.
        let out = unsafe { dev.alloc::<T>(n)? };
        let func = dev.get_or_load_custom_func(&format!("dropout_mask_{}", T::SUFFIX), "dropout", DROPOUT_PTX)?;
        let (n64, scale) = (n as i64, 1.0 / keep);
        let mut b = func.builder();
        b.arg(&out).arg(&n64).arg(&seed).arg(&keep).arg(&scale);
        // SAFETY: matches `dropout_mask_*`; out holds n elements.
        unsafe { b.launch(grid_stride(n)) }.w()?;
        Ok(wrap(out, dev, shape.clone()))
    })
}

/// `x ⊙ mask` for the mask `mask` would draw, as a fresh tensor not tracked by autograd: x must
/// be a contiguous CUDA tensor.
pub fn apply(x: &Tensor, seed: u64, keep: f32) -> Result<Tensor> {
    let n = x.elem_count();
    let (storage, layout) = x.storage_and_layout();
    let Storage::Cuda(xs) = &*storage else { bail!("dropout: x is not on the CUDA device") };
    let dev = xs.device().clone();
    with_kernel_type!(x.dtype(), T, {
        let xv = view::<T>(xs, layout, "dropout input")?;
        // SAFETY: the kernel writes all n elements.
        let out = unsafe { dev.alloc::<T>(n)? };
        let func = dev.get_or_load_custom_func(&format!("dropout_apply_{}", T::SUFFIX), "dropout", DROPOUT_PTX)?;
        let (n64, scale) = (n as i64, 1.0 / keep);
        let mut b = func.builder();
        b.arg(&out).arg(&xv).arg(&n64).arg(&seed).arg(&keep).arg(&scale);
        // SAFETY: matches `dropout_apply_*`; x and out hold n elements.
        unsafe { b.launch(grid_stride(n)) }.w()?;
        Ok(wrap(out, &dev, x.shape().clone()))
    })
}

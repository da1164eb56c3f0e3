//! CUDA plumbing that every kernel launcher shares, whatever layer its op belongs to (the NF4
//! kernels of `quant`, the fused ops of `ops`): the element types the kernels are instantiated
//! for, typed views of candle's CUDA storage, and tensors around fresh device buffers.

use candle_core::cuda_backend::cudarc::cublas::sys as cublas_sys;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{bail, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

/// The element types the kernels are instantiated for.
pub trait KernelType: CudaDType + DeviceRepr + candle_core::WithDType {
    /// The suffix of the kernel names (`lowrank_add_bf16`).
    const SUFFIX: &'static str;
    const CUBLAS: cublas_sys::cudaDataType;
}

impl KernelType for f32 {
    const SUFFIX: &'static str = "f32";
    const CUBLAS: cublas_sys::cudaDataType = cublas_sys::cudaDataType::CUDA_R_32F;
}

impl KernelType for f16 {
    const SUFFIX: &'static str = "f16";
    const CUBLAS: cublas_sys::cudaDataType = cublas_sys::cudaDataType::CUDA_R_16F;
}

impl KernelType for bf16 {
    const SUFFIX: &'static str = "bf16";
    const CUBLAS: cublas_sys::cudaDataType = cublas_sys::cudaDataType::CUDA_R_16BF;
}

/// Runs `$body` with `$t` bound to the Rust type of `$dtype`.
macro_rules! with_kernel_type {
    ($dtype:expr, $t:ident, $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F16 => {
                type $t = f16;
                $body
            }
            DType::BF16 => {
                type $t = bf16;
                $body
            }
            other => bail!("no fused kernel for dtype {other:?}"),
        }
    };
}

/// The contiguous elements of a CUDA storage under `layout`.
pub fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(s.as_cuda_slice::<T>()?.slice(start..end)),
        None => bail!("{what}: the input must be contiguous"),
    }
}

/// The CUDA storage of a tensor held outside the op's arguments (W, masks).
pub fn cuda_storage<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(s) => Ok(s),
        _ => bail!("{what}: the tensor is not on the CUDA device"),
    }
}

/// A fresh contiguous tensor around a CUDA buffer (not tracked by autograd).
pub fn wrap<T: KernelType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())), shape, BackpropOp::none(), false)
}

pub(crate) use with_kernel_type;

//! Host side of `kernels/swiglu.cu`: SwiGLU's gate forward and backward on the GPU, for
//! `ops::fused::SwiGlu`. The graph keeps g and u (the projections' outputs); the backward
//! writes dg and du and nothing else.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{bail, DType, Result, Shape, Tensor};
use half::{bf16, f16};

use super::{cuda_storage, grid_stride, view, wrap, Arg, KernelType, SWIGLU_PTX};
use crate::cuda::with_kernel_type;

/// `y = silu(g) ⊙ u`.
pub fn forward((g, lg): Arg, (u, lu): Arg) -> Result<(CudaStorage, Shape)> {
    if lg.shape() != lu.shape() || g.dtype() != u.dtype() {
        bail!("swiglu kernels: gate {:?} {:?} and up {:?} {:?} differ", lg.dims(), g.dtype(), lu.dims(), u.dtype());
    }
    let dev = g.device().clone();
    let n = lg.shape().elem_count();
    with_kernel_type!(g.dtype(), T, {
        let (gv, uv) = (view::<T>(g, lg, "swiglu g")?, view::<T>(u, lu, "swiglu u")?);
        // SAFETY: the kernel writes all n elements.
        let y = unsafe { dev.alloc::<T>(n)? };
        let func = dev.get_or_load_custom_func(&format!("swiglu_forward_{}", T::SUFFIX), "swiglu", SWIGLU_PTX)?;
        let n64 = n as i64;
        let mut b = func.builder();
        b.arg(&gv).arg(&uv).arg(&y).arg(&n64);
        // SAFETY: matches `swiglu_forward_*`; every buffer holds n elements.
        unsafe { b.launch(grid_stride(n)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), lg.shape().clone()))
    })
}

/// `(dg, du)` from g, u and the output's gradient.
pub fn backward(g: &Tensor, u: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    if g.shape() != u.shape() || g.shape() != dy.shape() || g.dtype() != u.dtype() || g.dtype() != dy.dtype() {
        bail!("swiglu kernels: g {:?}, u {:?} and dy {:?} must share shape and dtype", g.dims(), u.dims(), dy.dims());
    }
    let (g, u, dy) = (g.contiguous()?, u.contiguous()?, dy.contiguous()?);
    let guards = [&g, &u, &dy].map(|t| t.storage_and_layout());
    let storages = guards.iter().map(|(s, _)| cuda_storage(s, "swiglu backward")).collect::<Result<Vec<_>>>()?;
    let dev: CudaDevice = storages[0].device().clone();
    let n = g.elem_count();
    with_kernel_type!(g.dtype(), T, {
        let input = |i: usize, what: &str| view::<T>(storages[i], guards[i].1, what);
        let (gv, uv, dyv) = (input(0, "swiglu g")?, input(1, "swiglu u")?, input(2, "swiglu dy")?);
        // SAFETY: the kernel writes all n elements of both.
        let dg = unsafe { dev.alloc::<T>(n)? };
        let du = unsafe { dev.alloc::<T>(n)? };
        let func = dev.get_or_load_custom_func(&format!("swiglu_backward_{}", T::SUFFIX), "swiglu", SWIGLU_PTX)?;
        let n64 = n as i64;
        let mut b = func.builder();
        b.arg(&gv).arg(&uv).arg(&dyv).arg(&dg).arg(&du).arg(&n64);
        // SAFETY: matches `swiglu_backward_*`; every buffer holds n elements.
        unsafe { b.launch(grid_stride(n)) }.w()?;
        Ok((wrap(dg, &dev, g.shape().clone()), wrap(du, &dev, g.shape().clone())))
    })
}

//! Host side of `kernels/rms_norm.cu`: RMSNorm's forward (with the per-row `r` it keeps) and the
//! input's gradient on the GPU, for `ops::fused::RmsNorm`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{bail, DType, Result, Shape, Tensor};
use half::{bf16, f16};

use super::{cuda_storage, view, wrap, Arg, KernelType, RMS_NORM_PTX};
use crate::cuda::with_kernel_type;

/// One block a row.
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// The rows and columns of x [.., cols] normalised over the last dimension with w [cols].
fn rows_cols(x: &Shape, w: &Shape) -> Result<(usize, usize)> {
    let cols = x.dims().last().copied().unwrap_or(1);
    if w.elem_count() != cols {
        bail!("rms_norm kernels: weight of {} for rows of {cols}", w.elem_count());
    }
    let rows = x.elem_count() / cols.max(1);
    if rows > i32::MAX as usize || cols > i32::MAX as usize {
        bail!("rms_norm kernels: {rows} rows of {cols} is over the kernel's index range");
    }
    Ok((rows, cols))
}

/// `y = x·r ⊙ w` and `r` [rows, 1] in f32.
pub fn forward((x, lx): Arg, (w, lw): Arg, eps: f64) -> Result<(CudaStorage, Shape, Tensor)> {
    if x.dtype() != w.dtype() {
        bail!("rms_norm kernels: x is {:?} and the weight {:?}", x.dtype(), w.dtype());
    }
    let (rows, cols) = rows_cols(lx.shape(), lw.shape())?;
    let dev = x.device().clone();
    with_kernel_type!(x.dtype(), T, {
        let (xv, wv) = (view::<T>(x, lx, "rms_norm x")?, view::<T>(w, lw, "rms_norm weight")?);
        // SAFETY: the kernel writes every element of y and one r a row.
        let y = unsafe { dev.alloc::<T>(rows * cols)? };
        let rstd = unsafe { dev.alloc::<f32>(rows)? };
        let func = dev.get_or_load_custom_func(&format!("rms_norm_forward_{}", T::SUFFIX), "rms_norm", RMS_NORM_PTX)?;
        let (cols_i, eps) = (cols as i32, eps as f32);
        let mut b = func.builder();
        b.arg(&xv).arg(&wv).arg(&y).arg(&rstd).arg(&cols_i).arg(&eps);
        if rows > 0 {
            // SAFETY: matches `rms_norm_forward_*`; x and y hold rows x cols elements, w cols.
            unsafe { b.launch(per_row(rows)) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), lx.shape().clone(), wrap(rstd, &dev, (rows, 1))))
    })
}

/// dx from x, w, the forward's `r` [rows, 1] (f32) and dy.
pub fn backward(x: &Tensor, w: &Tensor, rstd: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if x.shape() != dy.shape() || x.dtype() != dy.dtype() || x.dtype() != w.dtype() || rstd.dtype() != DType::F32 {
        bail!("rms_norm backward: x {:?} {:?}, dy {:?} {:?}, weight {:?} and r {:?}", x.dims(), x.dtype(), dy.dims(), dy.dtype(), w.dtype(), rstd.dtype());
    }
    let (rows, cols) = rows_cols(x.shape(), w.shape())?;
    if rstd.elem_count() != rows {
        bail!("rms_norm backward: {} saved r for {rows} rows", rstd.elem_count());
    }
    let (x, w, rstd, dy) = (x.contiguous()?, w.contiguous()?, rstd.contiguous()?, dy.contiguous()?);
    let names = ["rms_norm x", "rms_norm weight", "rms_norm r", "rms_norm dy"];
    let guards = [&x, &w, &rstd, &dy].map(|t| t.storage_and_layout());
    let storages = guards.iter().zip(names).map(|((s, _), what)| cuda_storage(s, what)).collect::<Result<Vec<_>>>()?;
    let dev: CudaDevice = storages[0].device().clone();
    let rv = view::<f32>(storages[2], guards[2].1, names[2])?;
    with_kernel_type!(x.dtype(), T, {
        let input = |i: usize| view::<T>(storages[i], guards[i].1, names[i]);
        let (xv, wv, dyv) = (input(0)?, input(1)?, input(3)?);
        // SAFETY: the kernel writes every element.
        let dx = unsafe { dev.alloc::<T>(rows * cols)? };
        let func = dev.get_or_load_custom_func(&format!("rms_norm_backward_{}", T::SUFFIX), "rms_norm", RMS_NORM_PTX)?;
        let cols_i = cols as i32;
        let mut b = func.builder();
        b.arg(&xv).arg(&wv).arg(&rv).arg(&dyv).arg(&dx).arg(&cols_i);
        if rows > 0 {
            // SAFETY: matches `rms_norm_backward_*`; x, dy and dx hold rows x cols elements, r rows.
            unsafe { b.launch(per_row(rows)) }.w()?;
        }
        Ok(wrap(dx, &dev, x.shape().clone()))
    })
}

//! Host side of `kernels/adamw.cu`: AdamW's three in-place passes over an f32 parameter, for
//! `ops::adamw`.

use candle_core::cuda_backend::cudarc::driver::{CudaView, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::backend::BackendStorage;
use candle_core::{bail, Layout, Result};

use super::{grid_stride, view, Arg, ADAMW_PTX};
use crate::ops::adamw::AdamWScalars;

/// The contiguous span of a storage written in place.
fn span(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(span) => Ok(span),
        None => bail!("adamw: {what} must be contiguous"),
    }
}

fn same_length(n: usize, views: &[&CudaView<'_, f32>]) -> Result<()> {
    if views.iter().any(|v| v.len() != n) {
        bail!("adamw: the parameter, its gradient and its moments differ in length");
    }
    Ok(())
}

/// `moment ← decay·moment + gain·x`, x = g or g².
pub fn moment((dst, dl): (&mut CudaStorage, &Layout), (g, gl): Arg, decay: f32, gain: f32, square: bool) -> Result<()> {
    let dev = dst.device().clone();
    let (start, end) = span(dl, "the moment")?;
    let gv = view::<f32>(g, gl, "the gradient")?;
    same_length(end - start, &[&gv])?;
    let mut moment = dst.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
    let func = dev.get_or_load_custom_func("adamw_moment", "adamw", ADAMW_PTX)?;
    let (n, square) = ((end - start) as i64, square as i32);
    let mut b = func.builder();
    b.arg(&mut moment).arg(&gv).arg(&n).arg(&decay).arg(&gain).arg(&square);
    // SAFETY: matches `adamw_moment`; both buffers hold n f32.
    unsafe { b.launch(grid_stride(end - start)) }.w()?;
    Ok(())
}

/// `p ← p·decay − lr · (m·inv_bc1) / (√(v·inv_bc2) + ε)`.
pub fn apply((dst, dl): (&mut CudaStorage, &Layout), (m, ml): Arg, (v, vl): Arg, s: AdamWScalars) -> Result<()> {
    let dev = dst.device().clone();
    let (start, end) = span(dl, "the parameter")?;
    let (mv, vv) = (view::<f32>(m, ml, "m")?, view::<f32>(v, vl, "v")?);
    same_length(end - start, &[&mv, &vv])?;
    let mut p = dst.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
    let func = dev.get_or_load_custom_func("adamw_apply", "adamw", ADAMW_PTX)?;
    let (n, decay) = ((end - start) as i64, s.decay.unwrap_or(1.0));
    let mut b = func.builder();
    b.arg(&mut p).arg(&mv).arg(&vv).arg(&n).arg(&decay).arg(&s.inv_bc1).arg(&s.inv_bc2).arg(&s.eps).arg(&s.lr);
    // SAFETY: matches `adamw_apply`; the three buffers hold n f32.
    unsafe { b.launch(grid_stride(end - start)) }.w()?;
    Ok(())
}

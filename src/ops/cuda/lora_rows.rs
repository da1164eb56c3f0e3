//! Host side of `kernels/lora_rows.cu`: LoRA's term at inference for each adapter's rows, in
//! place on the base product y, for `ops::lora_rows`. The pair of kernels runs once for each
//! adapter present in the batch.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{bail, DType, Layout, Result, Tensor};
use half::{bf16, f16};

use super::{cuda_storage, view, KernelType};
use crate::cuda::with_kernel_type;

pub const LORA_ROWS_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lora_rows.ptx"));

/// `y[i] += s_a · B_a (A_a x[i])` for the rows i with `adapter_of[i] = Some(a)`; y and x
/// contiguous [rows, out] and [rows, in] in one dtype, the factors f32 on the same device.
pub fn add(y: &mut CudaStorage, ly: &Layout, x: &CudaStorage, lx: &Layout, adapter_of: &[Option<usize>], factors: &[(Tensor, Tensor, f64)]) -> Result<()> {
    let dev = y.device().clone();
    let (rows, cols_out) = super::super::rows_cols(ly);
    let (_, cols_in) = super::super::rows_cols(lx);
    if adapter_of.len() != rows {
        bail!("lora_rows: {rows} rows of y, {} row adapters", adapter_of.len());
    }
    let Some((start, end)) = ly.contiguous_offsets() else { bail!("lora_rows: y must be contiguous") };
    with_kernel_type!(y.dtype(), T, {
        let xv = view::<T>(x, lx, "lora_rows x")?;
        for (a, (fa, fb, scale)) in factors.iter().enumerate() {
            let idx: Vec<i32> = (0..rows).filter(|&i| adapter_of[i] == Some(a)).map(|i| i as i32).collect();
            if idx.is_empty() {
                continue;
            }
            let (n, r) = (idx.len(), fa.dim(0)?);
            let guards = [fa, fb].map(|t| t.storage_and_layout());
            let (av, bv) = (
                view::<f32>(cuda_storage(&guards[0].0, "lora_rows A")?, guards[0].1, "lora_rows A")?,
                view::<f32>(cuda_storage(&guards[1].0, "lora_rows B")?, guards[1].1, "lora_rows B")?,
            );
            if av.len() != r * cols_in || bv.len() != cols_out * r {
                bail!("lora_rows: A of {} and B of {} values do not fit rank {r}, [{cols_in} -> {cols_out}]", av.len(), bv.len());
            }
            let rows_dev = dev.clone_htod(&idx)?;
            let u = dev.alloc_zeros::<f32>(n * r)?;
            let (n_i, in_i, out_i, r_i, s) = (n as i32, cols_in as i32, cols_out as i32, r as i32, *scale as f32);
            let shrink = dev.get_or_load_custom_func(&format!("lora_rows_shrink_{}", T::SUFFIX), "lora_rows", LORA_ROWS_PTX)?;
            let mut b = shrink.builder();
            b.arg(&xv).arg(&rows_dev).arg(&av).arg(&u).arg(&n_i).arg(&in_i).arg(&r_i);
            // SAFETY: matches `lora_rows_shrink_*`; x [rows, in], A [r, in], u [n, r], rows < rows of x.
            unsafe { b.launch(LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.w()?;
            let expand = dev.get_or_load_custom_func(&format!("lora_rows_expand_{}", T::SUFFIX), "lora_rows", LORA_ROWS_PTX)?;
            let mut yv = y.as_cuda_slice_mut::<T>()?.slice_mut(start..end);
            let mut b = expand.builder();
            b.arg(&mut yv).arg(&rows_dev).arg(&bv).arg(&u).arg(&n_i).arg(&out_i).arg(&r_i).arg(&s);
            // SAFETY: matches `lora_rows_expand_*`; y [rows, out], B [out, r], u [n, r].
            unsafe { b.launch(LaunchConfig { grid_dim: (cols_out.div_ceil(256) as u32, n as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.w()?;
        }
        Ok(())
    })
}

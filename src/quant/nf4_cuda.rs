//! The NF4 kernels' launchers (`kernels/nf4.cu`): dequantize, and the GEMV and few-row matmul
//! straight from the packed codes. Entry points and CPU fallbacks: `quant::nf4_kernels`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{bail, DType, Result, Tensor};
use half::{bf16, f16};

use super::Nf4Tensor;
use crate::cuda::{cuda_storage, view, with_kernel_type, wrap, KernelType};

const NF4_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/nf4.ptx"));

/// The stored-dtype code of `kernels/nf4.cu` (0 f32, 1 f16, 2 bf16).
fn nf4_stored(w: &Nf4Tensor) -> Result<i32> {
    match w.dtype {
        DType::F32 => Ok(0),
        DType::F16 => Ok(1),
        DType::BF16 => Ok(2),
        other => bail!("NF4 on the GPU: stored dtype {other:?} (f32, f16 or bf16 expected)"),
    }
}

/// The scalar arguments the NF4 kernels take after their four buffers.
struct Nf4Scalars {
    offset: f32,
    double_quant: i32,
    blocksize: i32,
    nested: i32,
}

/// Runs `f` with the device views of an NF4 tensor's buffers (uploaded on first use) and the
/// scalars that go with them.
fn with_nf4_views<R>(
    w: &Nf4Tensor,
    f: impl FnOnce(&CudaDevice, &Nf4Scalars, [&CudaView<'_, u8>; 2], [&CudaView<'_, f32>; 2]) -> Result<R>,
) -> Result<R> {
    let b = w.device_buffers().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let (packed_s, packed_l) = b.packed.storage_and_layout();
    let (absq_s, absq_l) = b.absmax_q.storage_and_layout();
    let (scales_s, scales_l) = b.scales.storage_and_layout();
    let (tables_s, tables_l) = b.tables.storage_and_layout();
    let packed = cuda_storage(&packed_s, "nf4 packed")?;
    let dev = packed.device().clone();
    let packed = view::<u8>(packed, packed_l, "nf4 packed")?;
    let absq = view::<u8>(cuda_storage(&absq_s, "nf4 absmax")?, absq_l, "nf4 absmax")?;
    let scales = view::<f32>(cuda_storage(&scales_s, "nf4 scales")?, scales_l, "nf4 scales")?;
    let tables = view::<f32>(cuda_storage(&tables_s, "nf4 tables")?, tables_l, "nf4 tables")?;
    let scalars = Nf4Scalars {
        offset: b.offset,
        double_quant: b.double_quant as i32,
        blocksize: w.blocksize as i32,
        nested: b.nested_blocksize as i32,
    };
    f(&dev, &scalars, [&packed, &absq], [&scales, &tables])
}

/// NF4 dequantize on the device (`nf4_dequantize_*`).
pub(super) fn dequantize(w: &Nf4Tensor, dtype: DType) -> Result<Tensor> {
    let n = w.elem_count();
    let stored = nf4_stored(w)?;
    with_kernel_type!(dtype, T, {
        with_nf4_views(w, |dev, sc, [packed, absq], [scales, tables]| {
            // SAFETY: the kernel writes every one of the n elements.
            let out = unsafe { dev.alloc::<T>(n)? };
            let func = dev.get_or_load_custom_func(&format!("nf4_dequantize_{}", T::SUFFIX), "nf4", NF4_PTX)?;
            let threads = n.div_ceil(16);
            let cfg = LaunchConfig { grid_dim: (threads.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            let n_i = n as i64;
            let mut builder = func.builder();
            builder.arg(packed).arg(absq).arg(scales).arg(tables).arg(&sc.offset).arg(&sc.double_quant).arg(&sc.blocksize).arg(&sc.nested);
            builder.arg(&n_i).arg(&stored).arg(&out);
            // SAFETY: matches `nf4_dequantize_*`'s signature; the buffers hold what w's shape needs.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(wrap(out, dev, w.shape.as_slice()))
        })
    })
}

/// y [t, out] = x [t, in] · dequant(W)ᵀ straight from the packed codes: the GEMV (`nf4_gemv_*`,
/// one row of x per block row, `few` false) or the few-row matmul (`nf4_matmul_few_*`,
/// [`FEW_ROWS`](super::nf4_kernels::FEW_ROWS) rows of x per block row).
pub(super) fn rows_matmul(w: &Nf4Tensor, x: &Tensor, few: bool) -> Result<Tensor> {
    let (rows, cols) = (w.shape[0], w.shape[1]);
    let t = x.elem_count() / cols.max(1);
    let stored = nf4_stored(w)?;
    let (x_s, x_l) = x.storage_and_layout();
    let x_s = cuda_storage(&x_s, "nf4 matmul x")?;
    let (kernel, per_block_row) = if few { ("nf4_matmul_few", super::nf4_kernels::FEW_ROWS) } else { ("nf4_gemv", 1) };
    with_kernel_type!(x.dtype(), T, {
        let xv = view::<T>(x_s, x_l, "nf4 matmul x")?;
        with_nf4_views(w, |dev, sc, [packed, absq], [scales, tables]| {
            // SAFETY: one warp writes each output row for each of the t rows of x.
            let y = unsafe { dev.alloc::<T>(t * rows)? };
            let func = dev.get_or_load_custom_func(&format!("{kernel}_{}", T::SUFFIX), "nf4", NF4_PTX)?;
            const ROWS_PER_BLOCK: usize = 8;
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(ROWS_PER_BLOCK) as u32, t.div_ceil(per_block_row) as u32, 1),
                block_dim: (32 * ROWS_PER_BLOCK as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let (rows_i, cols_i, t_i) = (rows as i32, cols as i32, t as i32);
            let mut builder = func.builder();
            builder.arg(packed).arg(absq).arg(scales).arg(tables).arg(&sc.offset).arg(&sc.double_quant).arg(&sc.blocksize).arg(&sc.nested);
            builder.arg(&rows_i).arg(&cols_i).arg(&stored).arg(&xv).arg(&t_i).arg(&y);
            // SAFETY: matches `nf4_gemv_*` / `nf4_matmul_few_*`; x holds t·cols, y t·rows elements.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(wrap(y, dev, (t, rows)))
        })
    })
}

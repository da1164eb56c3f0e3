//! CUDA plumbing of the fused ops: the PTX that `build.rs` compiled from `kernels/*.cu`, typed
//! views of candle's CUDA storage, kernel launches, and a row-major cuBLAS GEMM that takes its
//! scalars in f32 (cudarc's typed GEMM rounds α to bf16 for bf16 data: 11.3137 would become
//! 11.3125).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{result as cublas, sys as cublas_sys};
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{bail, DType, Layout, Result, Shape, Storage, Tensor};
use half::{bf16, f16};

pub(crate) use crate::cuda::{cuda_storage, view, with_kernel_type, wrap, KernelType};

use super::lowrank_add::{Factor, LowRankAdd};
use super::row_norms::RowNorms;

pub const LOWRANK_ADD_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lowrank_add.ptx"));
pub const ROW_NORMS_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/row_norms.ptx"));
pub const SNELL_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/snell.ptx"));
pub const SNELL_SPARSE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/snell_sparse.ptx"));
pub const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
pub const ATTENTION_GEMM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention_gemm.ptx"));
pub const DROPOUT_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dropout.ptx"));
pub const SWIGLU_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx"));
pub const ROPE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rope.ptx"));
pub const ADAMW_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));
pub const RMS_NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));

/// One thread an element, grid-stride: 256 threads a block, enough blocks to fill an H100 several
/// times over (the elementwise kernels of swiglu, dropout, rope and attention_gemm).
fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// `C [m, n] = α · op(A) op(B) + β · C`, row-major, f32 accumulation. `a_t`: A is stored as
/// [k, m] (use its transpose); `b_t`: B is stored as [n, k].
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: KernelType>(
    dev: &CudaDevice,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: &impl DevicePtr<T>,
    a_t: bool,
    b: &impl DevicePtr<T>,
    b_t: bool,
    beta: f32,
    c: &mut impl DevicePtrMut<T>,
) -> Result<()> {
    let dense = |rows_stored: usize, cols_stored: usize, transposed: bool| Operand { offset: 0, ld: cols_stored, batch_stride: rows_stored * cols_stored, transposed };
    let (oa, ob) = (if a_t { dense(k, m, true) } else { dense(m, k, false) }, if b_t { dense(n, k, true) } else { dense(k, n, false) });
    gemm_batched(dev, (m, n, k), 1, alpha, (a, oa), (b, ob), beta, (c, dense(m, n, false)))
}

/// Where a GEMM operand lies in its buffer (row-major, in elements): batch `i` starts at
/// `offset + i · batch_stride`, rows are `ld` apart, and `transposed` says the buffer holds
/// the operand's transpose (an [n, k] buffer read as k x n). For C, `transposed` must be false.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub offset: usize,
    pub ld: usize,
    pub batch_stride: usize,
    pub transposed: bool,
}

impl Operand {
    /// The buffer elements this operand of a (rows x cols) matrix, `batch` times, reaches.
    fn extent(&self, (rows, cols): (usize, usize), batch: usize) -> usize {
        let (stored_rows, stored_cols) = if self.transposed { (cols, rows) } else { (rows, cols) };
        if batch == 0 || stored_rows == 0 || stored_cols == 0 {
            return 0;
        }
        self.offset + (batch - 1) * self.batch_stride + (stored_rows - 1) * self.ld + stored_cols
    }
}

/// `C_i = α op(A_i) op(B_i) + β C_i` for `i < batch`, row-major, op(A) m x k and op(B) k x n,
/// inputs in T and C in `C` (bf16 products into f32 scores, for one), accumulated in f32. One
/// batch is cuBLAS's plain GEMM. Every operand's extent is checked against its buffer.
///
/// cuBLAS is column-major, where row-major C is Cᵀ: it computes `Cᵀ = op(B)ᵀ op(A)ᵀ`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_batched<T: KernelType, C: KernelType>(
    dev: &CudaDevice,
    (m, n, k): (usize, usize, usize),
    batch: usize,
    alpha: f32,
    (a, oa): (&impl DevicePtr<T>, Operand),
    (b, ob): (&impl DevicePtr<T>, Operand),
    beta: f32,
    (c, oc): (&mut impl DevicePtrMut<C>, Operand),
) -> Result<()> {
    use cublas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    for (what, op, dims, len) in [("A", oa, (m, k), a.len()), ("B", ob, (k, n), b.len()), ("C", oc, (m, n), c.len())] {
        if op.extent(dims, batch) > len || (what == "C" && op.transposed) {
            bail!("gemm: {what} {op:?} of {dims:?} x {batch} does not fit its buffer of {len} elements");
        }
    }
    if batch == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    let int = |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("gemm: {v} exceeds cuBLAS's int")));
    let op = |o: &Operand| if o.transposed { CUBLAS_OP_T } else { CUBLAS_OP_N };
    let stream = dev.cuda_stream();
    let blas = dev.cublas_handle();
    let (a_ptr, _a_sync) = a.device_ptr(&stream);
    let (b_ptr, _b_sync) = b.device_ptr(&stream);
    let (c_ptr, _c_sync) = c.device_ptr_mut(&stream);
    let at = |ptr: u64, offset: usize, bytes: usize| (ptr + (offset * bytes) as u64) as *const std::ffi::c_void;
    let (a_ptr, b_ptr) = (at(a_ptr, oa.offset, std::mem::size_of::<T>()), at(b_ptr, ob.offset, std::mem::size_of::<T>()));
    let c_ptr = at(c_ptr, oc.offset, std::mem::size_of::<C>()) as *mut std::ffi::c_void;
    let (alpha, beta) = ((&alpha) as *const f32 as *const _, (&beta) as *const f32 as *const _);
    let (compute, algo) = (cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT);
    let (mi, ni, ki, lda, ldb, ldc) = (int(m)?, int(n)?, int(k)?, int(oa.ld)?, int(ob.ld)?, int(oc.ld)?);
    // SAFETY: every operand's extent was checked against its live buffer above, the scalars are
    // f32 as CUBLAS_COMPUTE_32F takes them, and cuBLAS runs on candle's stream of the device.
    unsafe {
        if batch == 1 {
            cublas::gemm_ex(*blas.handle(), op(&ob), op(&oa), ni, mi, ki, alpha, b_ptr, T::CUBLAS, ldb, a_ptr, T::CUBLAS, lda, beta, c_ptr, C::CUBLAS, ldc, compute, algo)
        } else {
            let stride = |s: usize| s as i64;
            cublas::gemm_strided_batched_ex(
                *blas.handle(),
                op(&ob),
                op(&oa),
                ni,
                mi,
                ki,
                alpha,
                b_ptr,
                T::CUBLAS,
                ldb,
                stride(ob.batch_stride),
                a_ptr,
                T::CUBLAS,
                lda,
                stride(oa.batch_stride),
                beta,
                c_ptr,
                C::CUBLAS,
                ldc,
                stride(oc.batch_stride),
                int(batch)?,
                compute,
                algo,
            )
        }
        .map_err(|e| candle_core::Error::Cuda(Box::new(e)))
    }
}

/// `out += s · (z Mᵀ) ⊙ mask` (see `kernels/lowrank_add.cu`). Without a mask, cuBLAS accumulates into `out` with β = 1 (tensor cores); otherwise the project's kernel.
pub(super) fn lowrank_add(
    op: &LowRankAdd,
    out: &mut CudaStorage,
    lo: &Layout,
    z: &CudaStorage,
    lz: &Layout,
    m: &CudaStorage,
    lm: &Layout,
) -> Result<()> {
    let dev = out.device().clone();
    let dtype = out.dtype();
    with_kernel_type!(dtype, T, {
        let (rows, cols) = super::rows_cols(lo);
        let r = lz.dims()[1];
        let zv = view::<T>(z, lz, "lowrank-add z")?;
        let mv = view::<T>(m, lm, "lowrank-add M")?;
        let Some((start, end)) = lo.contiguous_offsets() else { bail!("lowrank-add: out must be contiguous") };
        if op.mask.is_none() {
            let mut ov = out.as_cuda_slice_mut::<T>()?.slice_mut(start..end);
            return gemm::<T>(&dev, (rows, cols, r), op.scale as f32, &zv, false, &mv, op.factor == Factor::Rows, 1.0, &mut ov);
        }
        let mask_guard = op.mask.as_ref().map(|t| t.storage_and_layout());
        let mask = match &mask_guard {
            Some((s, l)) => Some(view::<T>(cuda_storage(s, "lowrank-add mask")?, l, "lowrank-add mask")?),
            None => None,
        };
        let mut ov = out.as_cuda_slice_mut::<T>()?.slice_mut(start..end);
        launch_lowrank_add::<T>(&dev, &mut ov, None, &zv, &mv, mask.as_ref(), (rows, cols, r), op.factor, op.scale)
    })
}

#[allow(clippy::too_many_arguments)]
fn launch_lowrank_add<T: KernelType>(
    dev: &CudaDevice,
    out: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<'_, T>,
    src: Option<&CudaView<'_, T>>,
    z: &CudaView<'_, T>,
    m: &CudaView<'_, T>,
    mask: Option<&CudaView<'_, T>>,
    (rows, cols, r): (usize, usize, usize),
    factor: Factor,
    scale: f64,
) -> Result<()> {
    let func = dev.get_or_load_custom_func(&format!("lowrank_add_{}", T::SUFFIX), "lowrank_add", LOWRANK_ADD_PTX)?;
    let (sj, sk) = factor.strides(cols, r);
    let cfg = LaunchConfig { grid_dim: (cols.div_ceil(64) as u32, rows.div_ceil(64) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let null: u64 = 0;
    let (rows, cols, r, sj, sk, scale) = (rows as i32, cols as i32, r as i32, sj as i64, sk as i64, scale as f32);
    let mut b = func.builder();
    b.arg(out);
    match src {
        Some(s) => b.arg(s),
        None => b.arg(&null),
    };
    b.arg(z);
    b.arg(m);
    match mask {
        Some(s) => b.arg(s),
        None => b.arg(&null),
    };
    b.arg(&rows).arg(&cols).arg(&r).arg(&sj).arg(&sk).arg(&scale);
    // SAFETY: the argument list matches the kernel's signature; every buffer holds the elements
    // the shapes above index.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// DoRA's row norms (see `kernels/row_norms.cu`).
pub(super) fn row_norms(
    op: &RowNorms,
    w: &CudaStorage,
    lw: &Layout,
    b: &CudaStorage,
    lb: &Layout,
    a: &CudaStorage,
    la: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let dev = w.device().clone();
    let (rows, cols) = lw.shape().dims2()?;
    let r = la.dims()[0];
    with_kernel_type!(w.dtype(), T, {
        let (wv, bv, av) = (view::<T>(w, lw, "W")?, view::<f32>(b, lb, "B")?, view::<f32>(a, la, "A")?);
        let out = dev.alloc_zeros::<f32>(rows)?;
        let func = dev.get_or_load_custom_func(&format!("row_norms_{}", T::SUFFIX), "row_norms", ROW_NORMS_PTX)?;
        const ROWS_PER_BLOCK: usize = 8;
        let shared = (ROWS_PER_BLOCK * r * 4) as u32;
        if shared > 48 * 1024 {
            bail!("row_norms: rank {r} needs {shared} bytes of shared memory, over the 48 KiB limit");
        }
        let cfg = LaunchConfig { grid_dim: (rows.div_ceil(ROWS_PER_BLOCK) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: shared };
        let (rows_i, cols_i, r_i, s) = (rows as i32, cols as i32, r as i32, op.scale as f32);
        let mut builder = func.builder();
        builder.arg(&wv).arg(&bv).arg(&av).arg(&out).arg(&rows_i).arg(&cols_i).arg(&r_i).arg(&s);
        // SAFETY: matches `row_norms_*`'s signature; out has `rows` floats.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(rows)))
    })
}

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// The fused LoRA forward: `xa = drop(x) Aᵀ`, `y = x Wᵀ`, `y += s · xa Bᵀ` (cuBLAS, β = 1).
/// Returns y and xa (for the backward).
pub(super) fn lora_forward(
    w: &Tensor,
    dropped: Option<&Tensor>,
    scale: f64,
    (x, lx): Arg,
    (a, la): Arg,
    (b, lb): Arg,
) -> Result<((CudaStorage, Shape), Tensor)> {
    let dev = x.device().clone();
    let (t, d_in) = lx.shape().dims2()?;
    let (d_out, r) = lb.shape().dims2()?;
    with_kernel_type!(x.dtype(), T, {
        let xv = view::<T>(x, lx, "x")?;
        let (av, bv) = (view::<T>(a, la, "A")?, view::<T>(b, lb, "B")?);
        let (w_storage, w_layout) = w.storage_and_layout();
        let wv = view::<T>(cuda_storage(&w_storage, "W")?, w_layout, "W")?;
        let d_guard = dropped.map(|t| t.storage_and_layout());
        let dropped = match &d_guard {
            Some((s, l)) => Some(view::<T>(cuda_storage(s, "drop(x)")?, l, "drop(x)")?),
            None => None,
        };
        let xd = dropped.as_ref().unwrap_or(&xv);
        // SAFETY: every element is written by the GEMMs below (β = 0) before it is read.
        let mut xa = unsafe { dev.alloc::<T>(t * r)? };
        gemm::<T>(&dev, (t, r, d_in), 1.0, xd, false, &av, true, 0.0, &mut xa)?;
        // SAFETY: as above.
        let mut y = unsafe { dev.alloc::<T>(t * d_out)? };
        gemm::<T>(&dev, (t, d_out, d_in), 1.0, &xv, false, &wv, true, 0.0, &mut y)?;
        gemm::<T>(&dev, (t, d_out, r), scale as f32, &xa, false, &bv, true, 1.0, &mut y)?;
        let xa = wrap(xa, &dev, (t, r));
        Ok(((CudaStorage::wrap_cuda_slice(y, dev.clone()), Shape::from((t, d_out))), xa))
    })
}

/// The fused control branch: `out = base + α · z Bᵀ`, one pass over [T, d].
pub(super) fn control_branch(alpha: f64, (base, l_base): Arg, (z, lz): Arg, (b, lb): Arg) -> Result<(CudaStorage, Shape)> {
    let dev = base.device().clone();
    let (t, d) = l_base.shape().dims2()?;
    let r = lz.dims()[1];
    with_kernel_type!(base.dtype(), T, {
        let (basev, zv, bv) = (view::<T>(base, l_base, "base")?, view::<T>(z, lz, "z")?, view::<T>(b, lb, "B")?);
        // SAFETY: the kernel writes every element of out (from base plus the branch).
        let mut out = unsafe { dev.alloc::<T>(t * d)? };
        launch_lowrank_add::<T>(&dev, &mut out.slice_mut(..), Some(&basev), &zv, &bv, None, (t, d, r), Factor::Rows, alpha)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), l_base.shape().clone()))
    })
}

/// A copy of a whole, contiguous CUDA tensor's storage, as a custom op's `cuda_fwd` returns it:
/// the ops that compute their output before candle applies them (`ops::Precomputed`) hand
/// it over this way, since candle's storages are owned.
pub fn owned_storage(t: &Tensor, what: &str) -> Result<(CudaStorage, Shape)> {
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cuda(s), Some((0, end))) if end == t.elem_count() => Ok((s.try_clone(layout)?, t.shape().clone())),
        _ => bail!("{what}: the precomputed output must be a whole contiguous CUDA tensor"),
    }
}

/// `x Wᵀ` for x [..., in] and a constant W [out, in] in x's dtype (the frozen linear of
/// training, whose backward needs only dx: see `ops::fused::FrozenMatmulT`).
pub fn frozen_matmul_t(w: &Tensor, x: &CudaStorage, lx: &Layout) -> Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let (out, inp) = w.dims2()?;
    let dims = lx.dims().to_vec();
    if dims.last() != Some(&inp) || w.dtype() != x.dtype() {
        bail!("frozen-matmul-t: x {:?} {:?} against W {:?} {:?}", dims, x.dtype(), w.dims(), w.dtype());
    }
    let rows = lx.shape().elem_count() / inp.max(1);
    with_kernel_type!(x.dtype(), T, {
        let xv = view::<T>(x, lx, "x")?;
        let (w_storage, w_layout) = w.storage_and_layout();
        let wv = view::<T>(cuda_storage(&w_storage, "W")?, w_layout, "W")?;
        // SAFETY: the GEMM (β = 0) writes every element.
        let mut y = unsafe { dev.alloc::<T>(rows * out)? };
        gemm::<T>(&dev, (rows, out, inp), 1.0, &xv, false, &wv, true, 0.0, &mut y)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("checked") = out;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), Shape::from(out_dims)))
    })
}

/// `residual + x Wᵀ` for x [..., in], residual [..., out] and a constant W [out, in], all in
/// x's dtype: the residual copied into the output, then one GEMM with β = 1 (f32 accumulation,
/// one rounding), so no separate [.., out] product exists (`ops::fused::FrozenMatmulTAdd`).
pub fn frozen_matmul_t_add(w: &Tensor, (x, lx): Arg, (r, lr): Arg) -> Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let (out, inp) = w.dims2()?;
    let rows = lx.shape().elem_count() / inp.max(1);
    if lx.dims().last() != Some(&inp) || lr.shape().elem_count() != rows * out || w.dtype() != x.dtype() || r.dtype() != x.dtype() {
        bail!("frozen-matmul-t-add: x {:?}, residual {:?} {:?} against W {:?} {:?}", lx.dims(), lr.dims(), r.dtype(), w.dims(), w.dtype());
    }
    with_kernel_type!(x.dtype(), T, {
        let (xv, rv) = (view::<T>(x, lx, "x")?, view::<T>(r, lr, "residual")?);
        let (w_storage, w_layout) = w.storage_and_layout();
        let wv = view::<T>(cuda_storage(&w_storage, "W")?, w_layout, "W")?;
        // SAFETY: the copy writes every element before the GEMM reads them (β = 1).
        let mut y = unsafe { dev.alloc::<T>(rows * out)? };
        dev.memcpy_dtod(&rv, &mut y)?;
        gemm::<T>(&dev, (rows, out, inp), 1.0, &xv, false, &wv, true, 1.0, &mut y)?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), lr.shape().clone()))
    })
}

pub mod snell;
mod snell_sparse;
pub mod attention;
pub mod attention_gemm;
pub mod swiglu;
pub mod dropout;
pub mod rope;
pub mod rms_norm;
pub mod adamw;
pub mod lora_rows;

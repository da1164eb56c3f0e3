//! Host side of `kernels/snell_sparse.cu`: SNELL's branch with the survivors of the competition
//! applied as a sparse matrix, taken at the same density cut as the CPU reference
//! (`src/ops/snell_sparse.rs`, [`SPARSE_MAX_DENSITY`]; the math: `src/ops/snell.rs`).
//!
//! ```text
//! survivors  count them per (row, tile column) and (column, tile row)     snell_survivor_counts
//!            scan both counts in place, read the total back (one u32)    snell_exclusive_scan
//!            dense path if over the cut, else list them in both orders   snell_survivor_fill
//! forward    xᵀ;  yᵀ = SpMM(column order, xᵀ);  y = (yᵀ)ᵀ                snell_transpose, snell_spmm
//! backward   xᵀ, dyᵀ;  dxᵀ = SpMM(row order, dyᵀ);  dx = (dxᵀ)ᵀ
//!            g = (xᵀ dy) ⊙ N at the survivors only                       snell_sddmm
//!            per head: dIn_h and m (row pass), dOut_h (column pass)     snell_sparse_grad_rows/_cols
//! ```
//!
//! Transients: the transposed activations and products (each the size of x or dy), the survivor
//! lists (24 bytes per survivor, plus 4 bytes per row and column per tile of the other axis);
//! never a [d_in, d_out] buffer. Both forward and backward rebuild the lists from In, Out and τ,
//! bit-identically (the tile walk is deterministic and no atomic decides a position), so nothing
//! is kept between them. The cut is the CPU's, not a crossover measured on a GPU.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{bail, Result};

use super::snell::Factors;
use super::{KernelType, SNELL_SPARSE_PTX};
use crate::ops::snell_merge::head_coefficients;
use crate::ops::snell_sparse::SPARSE_MAX_DENSITY;

const THREADS: u32 = 256;
/// Rows per block of the per-row and per-column gradient passes (one warp each).
const WARPS: u32 = THREADS / 32;

/// A kernel of `kernels/snell_sparse.cu` (candle does not export the function's type, so this is
/// a macro); `typed: T` appends T's suffix.
macro_rules! function {
    ($dev:expr, $name:expr) => {
        $dev.get_or_load_custom_func($name, "snell_sparse", SNELL_SPARSE_PTX)?
    };
    ($dev:expr, $name:expr, typed: $t:ty) => {
        $dev.get_or_load_custom_func(&format!("{}_{}", $name, <$t as KernelType>::SUFFIX), "snell_sparse", SNELL_SPARSE_PTX)?
    };
}

/// One walk over the survivors: span r is `offsets[r·stride] .. offsets[(r+1)·stride]` of
/// `index` (the other coordinate) and `values` (ΔW_s).
struct Order<'a> {
    offsets: &'a CudaSlice<u32>,
    stride: i32,
    index: &'a CudaSlice<u32>,
    values: &'a CudaSlice<f32>,
}

/// The survivors |Δ| > τ of ΔW [d_in, d_out] in row order (CSR over the input features) and
/// column order (CSC over the outputs); see the layout at the top of `kernels/snell_sparse.cu`.
pub(super) struct DeviceSurvivors {
    d_in: usize,
    d_out: usize,
    n_tx: i32,
    n_ty: i32,
    row_off: CudaSlice<u32>,
    col_off: CudaSlice<u32>,
    cols: CudaSlice<u32>,
    vals: CudaSlice<f32>,
    factor: CudaSlice<f32>,
    rows_c: CudaSlice<u32>,
    vals_c: CudaSlice<f32>,
    pos_c: CudaSlice<u32>,
    nnz: usize,
}

impl DeviceSurvivors {
    /// The survivors when they are at most [`SPARSE_MAX_DENSITY`] of the entries (None: the
    /// dense path is taken).
    pub(super) fn of(dev: &CudaDevice, f: &Factors, tau: f32) -> Result<Option<Self>> {
        if f.numel() >= u32::MAX as usize {
            return Ok(None); // the offsets are u32
        }
        let tiles = f.tiles();
        let (n_tx, n_ty) = (tiles.grid_dim.0 as usize, tiles.grid_dim.1 as usize);
        let (d_in, d_out) = (f.d_in as usize, f.d_out as usize);
        // SAFETY (both): the counts kernel writes every (row, tile column) and (column, tile row)
        // entry, the scan the last one.
        let mut row_off = unsafe { dev.alloc::<u32>(d_in * n_tx + 1)? };
        let mut col_off = unsafe { dev.alloc::<u32>(d_out * n_ty + 1)? };
        let counts = function!(dev, "snell_survivor_counts");
        let mut b = counts.builder();
        f.push(&mut b);
        b.arg(&tau).arg(&mut row_off).arg(&mut col_off);
        // SAFETY: matches `snell_survivor_counts(FACTORS, float, unsigned*, unsigned*)` with the
        // sizes above.
        unsafe { b.launch(tiles) }.w()?;
        let scan = function!(dev, "snell_exclusive_scan");
        for (offsets, n) in [(&mut row_off, d_in * n_tx), (&mut col_off, d_out * n_ty)] {
            let n = n as i64;
            let mut b = scan.builder();
            b.arg(offsets).arg(&n);
            // SAFETY: matches `snell_exclusive_scan(unsigned*, long long)`; the buffer holds n + 1.
            unsafe { b.launch(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 }) }.w()?;
        }
        let nnz = dev.clone_dtoh(&row_off.slice(d_in * n_tx..))?[0] as usize;
        if nnz as f64 > SPARSE_MAX_DENSITY * f.numel() as f64 {
            return Ok(None);
        }
        let len = nnz.max(1);
        // SAFETY (all six): the fill writes every survivor's entry, positions 0..nnz.
        let (mut cols, mut vals, mut factor) = unsafe { (dev.alloc::<u32>(len)?, dev.alloc::<f32>(len)?, dev.alloc::<f32>(len)?) };
        let (mut rows_c, mut vals_c, mut pos_c) = unsafe { (dev.alloc::<u32>(len)?, dev.alloc::<f32>(len)?, dev.alloc::<u32>(len)?) };
        let fill = function!(dev, "snell_survivor_fill");
        let mut b = fill.builder();
        f.push(&mut b);
        b.arg(&tau).arg(&row_off).arg(&col_off);
        b.arg(&mut cols).arg(&mut vals).arg(&mut factor).arg(&mut rows_c).arg(&mut vals_c).arg(&mut pos_c);
        // SAFETY: matches `snell_survivor_fill`; every list holds nnz (≥ 1) elements.
        unsafe { b.launch(tiles) }.w()?;
        Ok(Some(Self { d_in, d_out, n_tx: n_tx as i32, n_ty: n_ty as i32, row_off, col_off, cols, vals, factor, rows_c, vals_c, pos_c, nnz }))
    }

    fn rows(&self) -> Order<'_> {
        Order { offsets: &self.row_off, stride: self.n_tx, index: &self.cols, values: &self.vals }
    }

    fn columns(&self) -> Order<'_> {
        Order { offsets: &self.col_off, stride: self.n_ty, index: &self.rows_c, values: &self.vals_c }
    }

    /// `y = x ΔW_s` for x [t, d_in]: yᵀ[j, :] = Σ_i ΔW_s[i, j] xᵀ[i, :].
    pub(super) fn forward<T: KernelType>(&self, dev: &CudaDevice, x: &CudaView<T>, t: usize) -> Result<CudaSlice<T>> {
        let xt = transpose(dev, x, t, self.d_in)?;
        let yt = spmm(dev, &self.columns(), &xt.as_view(), self.d_out, t)?;
        transpose(dev, &yt.as_view(), self.d_out, t)
    }

    /// `(dx, dIn, dOut)` (dIn [H, d_in, k], dOut [H, d_out, k] in f32) for x [t, d_in], dy [t, d_out].
    pub(super) fn backward<T: KernelType>(
        &self,
        dev: &CudaDevice,
        f: &Factors,
        x: &CudaView<T>,
        dy: &CudaView<T>,
        t: usize,
    ) -> Result<(CudaSlice<T>, CudaSlice<f32>, CudaSlice<f32>)> {
        let (d_in, d_out, k) = (self.d_in, self.d_out, f.k as usize);
        let (xt, dyt) = (transpose(dev, x, t, d_in)?, transpose(dev, dy, t, d_out)?);
        let dxt = spmm(dev, &self.rows(), &dyt.as_view(), d_in, t)?;
        let dx = transpose(dev, &dxt.as_view(), d_in, t)?;
        drop(dxt);
        // SAFETY: the SDDMM writes g at every survivor.
        let mut g = unsafe { dev.alloc::<f32>(self.nnz.max(1))? };
        let sddmm = function!(dev, "snell_sddmm", typed: T);
        let (stride, n_t) = (self.n_tx, t as i32);
        let mut b = sddmm.builder();
        b.arg(&self.row_off).arg(&stride).arg(&self.cols).arg(&self.factor).arg(&xt).arg(&dyt).arg(&n_t).arg(&mut g);
        // SAFETY: matches `snell_sddmm_*`; xt holds d_in·t, dyt d_out·t, g nnz elements.
        unsafe { b.launch(LaunchConfig { grid_dim: (d_in as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }) }.w()?;
        drop((xt, dyt));
        let heads = f.heads as usize;
        // SAFETY (all three): the passes write every row of every head, and m at every survivor.
        let (mut d_input, mut d_output, mut m) = unsafe { (dev.alloc::<f32>(heads * d_in * k)?, dev.alloc::<f32>(heads * d_out * k)?, dev.alloc::<f32>(self.nnz.max(1))?) };
        let (rows_pass, cols_pass) = (function!(dev, "snell_sparse_grad_rows"), function!(dev, "snell_sparse_grad_cols"));
        let (d_in_i, d_out_i, k_i) = (f.d_in, f.d_out, f.k);
        for (h, c) in head_coefficients(heads).into_iter().enumerate() {
            let in_h = f.input.slice(h * d_in * k..(h + 1) * d_in * k);
            let out_h = f.output.slice(h * d_out * k..(h + 1) * d_out * k);
            let mut din_h = d_input.slice_mut(h * d_in * k..(h + 1) * d_in * k);
            let mut dout_h = d_output.slice_mut(h * d_out * k..(h + 1) * d_out * k);
            let c = c as f32;
            let mut b = rows_pass.builder();
            b.arg(&in_h).arg(&out_h).arg(&d_in_i).arg(&k_i).arg(&c).arg(&self.row_off).arg(&self.n_tx).arg(&self.cols).arg(&g).arg(&mut m).arg(&mut din_h);
            // SAFETY: matches `snell_sparse_grad_rows`; one warp per row of In_h.
            unsafe { b.launch(warp_per_row(d_in)) }.w()?;
            let mut b = cols_pass.builder();
            b.arg(&in_h).arg(&out_h).arg(&d_out_i).arg(&k_i).arg(&self.col_off).arg(&self.n_ty).arg(&self.rows_c).arg(&self.pos_c).arg(&m).arg(&mut dout_h);
            // SAFETY: matches `snell_sparse_grad_cols`; one warp per row of Out_h.
            unsafe { b.launch(warp_per_row(d_out)) }.w()?;
        }
        Ok((dx, d_input, d_output))
    }
}

fn warp_per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((rows as u32).div_ceil(WARPS), 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// `srcᵀ` [cols, rows] for src [rows, cols] (`snell_transpose_*`).
fn transpose<T: KernelType>(dev: &CudaDevice, src: &CudaView<T>, rows: usize, cols: usize) -> Result<CudaSlice<T>> {
    if rows.div_ceil(32) > 65535 {
        bail!("SNELL sparse apply: {rows} rows are more than the transpose's grid takes");
    }
    // SAFETY: the kernel writes every element.
    let mut dst = unsafe { dev.alloc::<T>(rows * cols)? };
    let func = function!(dev, "snell_transpose", typed: T);
    let (r, c) = (rows as i32, cols as i32);
    let mut b = func.builder();
    b.arg(src).arg(&mut dst).arg(&r).arg(&c);
    let cfg = LaunchConfig { grid_dim: ((cols as u32).div_ceil(32), (rows as u32).div_ceil(32), 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
    // SAFETY: matches `snell_transpose_*`; src holds rows·cols elements, as dst.
    unsafe { b.launch(cfg) }.w()?;
    Ok(dst)
}

/// `out[r, :] = Σ_{p ∈ span(r)} values[p] · src[index[p], :]` for r < rows, over t columns
/// (`snell_spmm_*`).
fn spmm<T: KernelType>(dev: &CudaDevice, order: &Order, src: &CudaView<T>, rows: usize, t: usize) -> Result<CudaSlice<T>> {
    if t.div_ceil(THREADS as usize) > 65535 {
        bail!("SNELL sparse apply: {t} tokens are more than the SpMM's grid takes");
    }
    // SAFETY: the kernel writes every element.
    let mut dst = unsafe { dev.alloc::<T>(rows * t)? };
    let func = function!(dev, "snell_spmm", typed: T);
    let n_t = t as i32;
    let mut b = func.builder();
    b.arg(order.offsets).arg(&order.stride).arg(order.index).arg(order.values).arg(src).arg(&n_t).arg(&mut dst);
    let cfg = LaunchConfig { grid_dim: (rows as u32, t.div_ceil(THREADS as usize) as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches `snell_spmm_*`; the spans index rows of src (< its row count), dst holds rows·t.
    unsafe { b.launch(cfg) }.w()?;
    Ok(dst)
}

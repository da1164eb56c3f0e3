//! Host side of `kernels/snell.cu`: SNELL's threshold by exact radix selection, its forward and its
//! backward, with one transient [d_in, d_out] buffer in the activations' dtype per call and
//! nothing of that size kept between forward and backward (see `src/ops/snell.rs` for the
//! math).
//!
//! ```text
//! threshold  3 histogram passes over |Δ|'s bits (11, 10, 10 bits; tiles recomputed each pass),
//!            the k-th order statistic exactly, its upper neighbour by one min-above pass, then
//!            torch.quantile's lerp in f32 on the host
//! forward    buf = ΔW_s (T)             y = x buf                                  cuBLAS
//! backward   buf = ΔW_s (T)             dx = dy bufᵀ                               cuBLAS
//!            buf = xᵀ dy                buf ⊙= N (snell_mask_grad)                 cuBLAS + kernel
//!            per head: dIn_h, dOut_h from buf by snell_dist_grad (recomputing D_h)
//! ```
//!
//! At high sparsity (at most `SPARSE_MAX_DENSITY` of the entries survive) forward and backward
//! take the sparse apply of `snell_sparse` instead, with no [d_in, d_out] buffer at all.
//!
//! One difference from torch.quantile: a NaN in ΔW is ordered above +inf by its bit pattern here,
//! where torch returns NaN (either way the factors are already NaN and training has diverged).

use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchArgs, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::backend::BackendStorage;
use candle_core::{bail, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

use super::snell_sparse::DeviceSurvivors;
use super::{cuda_storage, gemm, view, wrap, Arg, KernelType, SNELL_PTX};
use crate::cuda::with_kernel_type;
use crate::ops::snell_merge::head_coefficients;
use crate::ops::snell::{radix_quantile, RadixPass, MAX_CUDA_HEAD_RANK};

/// The factors' device views and sizes, as the tile kernels take them.
pub(super) struct Factors<'a> {
    pub(super) input: CudaView<'a, f32>,
    pub(super) output: CudaView<'a, f32>,
    pub(super) heads: i32,
    pub(super) d_in: i32,
    pub(super) d_out: i32,
    pub(super) k: i32,
}

impl<'a> Factors<'a> {
    fn new((input, li): (&'a CudaStorage, &Layout), (output, lo): (&'a CudaStorage, &Layout)) -> Result<Self> {
        let (heads, d_in, k) = li.shape().dims3()?;
        let (heads2, d_out, k2) = lo.shape().dims3()?;
        if heads2 != heads || k2 != k || input.dtype() != DType::F32 || output.dtype() != DType::F32 {
            bail!("SNELL kernels: In {:?} {:?} and Out {:?} {:?} (f32 factors of one rank expected)", li.dims(), input.dtype(), lo.dims(), output.dtype());
        }
        if k > MAX_CUDA_HEAD_RANK {
            bail!("SNELL kernels: rank per head {k} is over {MAX_CUDA_HEAD_RANK}");
        }
        Ok(Self {
            input: view::<f32>(input, li, "SNELL In")?,
            output: view::<f32>(output, lo, "SNELL Out")?,
            heads: heads as i32,
            d_in: d_in as i32,
            d_out: d_out as i32,
            k: k as i32,
        })
    }

    pub(super) fn numel(&self) -> usize {
        self.d_in as usize * self.d_out as usize
    }

    /// The arguments every tile kernel starts with (`FACTORS` in the .cu).
    pub(super) fn push<'b>(&'b self, b: &mut LaunchArgs<'b>) {
        b.arg(&self.input).arg(&self.output).arg(&self.heads).arg(&self.d_in).arg(&self.d_out).arg(&self.k);
    }

    /// One block of 256 threads per 64 × 64 tile of the update.
    pub(super) fn tiles(&self) -> LaunchConfig {
        LaunchConfig { grid_dim: ((self.d_out as u32).div_ceil(64), (self.d_in as u32).div_ceil(64), 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
    }
}

/// Runs `f` with the device views of In and Out.
fn with_factors<R>(input: &Tensor, output: &Tensor, f: impl FnOnce(&CudaDevice, &Factors) -> Result<R>) -> Result<R> {
    let (is, il) = input.storage_and_layout();
    let (os, ol) = output.storage_and_layout();
    let is = cuda_storage(&is, "SNELL In")?;
    let os = cuda_storage(&os, "SNELL Out")?;
    let factors = Factors::new((is, il), (os, ol))?;
    f(&is.device().clone(), &factors)
}

/// ΔW [d_in, d_out] in f32 (`snell_delta`).
pub fn kernel_delta(input: &Tensor, output: &Tensor) -> Result<Tensor> {
    with_factors(input, output, |dev, f| {
        // SAFETY: the kernel writes every entry.
        let mut delta = unsafe { dev.alloc::<f32>(f.numel())? };
        let func = dev.get_or_load_custom_func("snell_delta", "snell", SNELL_PTX)?;
        let mut b = func.builder();
        f.push(&mut b);
        b.arg(&mut delta);
        // SAFETY: matches `snell_delta(FACTORS, float*)`; delta holds d_in·d_out floats.
        unsafe { b.launch(f.tiles()) }.w()?;
        Ok(wrap(delta, dev, (f.d_in as usize, f.d_out as usize)))
    })
}

/// `torch.quantile(|ΔW|, s)`, exactly, without materialising ΔW: [`radix_quantile`] over
/// histograms and a min-above pass that recompute the tiles.
pub fn threshold(input: &Tensor, output: &Tensor, sparsity: f64) -> Result<f64> {
    with_factors(input, output, |dev, f| radix_threshold(dev, f, sparsity))
}

/// [`threshold`] on the op's storages.
pub fn threshold_of(sparsity: f64, input: Arg, output: Arg) -> Result<f64> {
    let f = Factors::new(input, output)?;
    radix_threshold(&input.0.device().clone(), &f, sparsity)
}

fn radix_threshold(dev: &CudaDevice, f: &Factors, sparsity: f64) -> Result<f64> {
    {
        let histogram = |pass: RadixPass| -> Result<Vec<u32>> {
            let mut hist = dev.alloc_zeros::<u32>(pass.bins)?;
            let func = dev.get_or_load_custom_func("snell_histogram", "snell", SNELL_PTX)?;
            let (shift, bins) = (pass.shift as i32, pass.bins as i32);
            let mut b = func.builder();
            f.push(&mut b);
            b.arg(&pass.prefix).arg(&pass.prefix_mask).arg(&shift).arg(&bins).arg(&mut hist);
            // SAFETY: matches `snell_histogram`; hist holds `bins` counters.
            unsafe { b.launch(f.tiles()) }.w()?;
            dev.clone_dtoh(&hist)
        };
        let min_above = |above: u32| -> Result<u32> {
            let mut best = dev.clone_htod(&[u32::MAX])?;
            let func = dev.get_or_load_custom_func("snell_min_above", "snell", SNELL_PTX)?;
            let mut b = func.builder();
            f.push(&mut b);
            b.arg(&above).arg(&mut best);
            // SAFETY: matches `snell_min_above`; best holds one counter.
            unsafe { b.launch(f.tiles()) }.w()?;
            Ok(dev.clone_dtoh(&best)?[0])
        };
        radix_quantile(f.numel(), sparsity, histogram, min_above).map(f64::from)
    }
}

/// `buf = ΔW_s` in T (`snell_sparse_delta_*`).
fn sparse_delta<T: KernelType>(dev: &CudaDevice, f: &Factors, tau: Option<f64>) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>> {
    // SAFETY: the kernel writes every entry.
    let mut buf = unsafe { dev.alloc::<T>(f.numel())? };
    let func = dev.get_or_load_custom_func(&format!("snell_sparse_delta_{}", T::SUFFIX), "snell", SNELL_PTX)?;
    let (tau_f, sparsify) = (tau.unwrap_or(0.0) as f32, tau.is_some() as i32);
    let mut b = func.builder();
    f.push(&mut b);
    b.arg(&tau_f).arg(&sparsify).arg(&mut buf);
    // SAFETY: matches `snell_sparse_delta_*`; buf holds d_in·d_out elements.
    unsafe { b.launch(f.tiles()) }.w()?;
    Ok(buf)
}

/// The survivors as a sparse matrix when a threshold applies and they are few enough
/// (`snell_sparse`).
fn sparse_survivors(dev: &CudaDevice, f: &Factors, tau: Option<f64>) -> Result<Option<DeviceSurvivors>> {
    match tau {
        Some(tau) => DeviceSurvivors::of(dev, f, tau as f32),
        None => Ok(None),
    }
}

/// The forward `y = x ΔW_s` (x [T, d_in] in T).
pub fn forward(tau: Option<f64>, (x, lx): Arg, input: Arg, output: Arg) -> Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let f = Factors::new(input, output)?;
    let (t, d_in) = lx.shape().dims2()?;
    let d_out = f.d_out as usize;
    if d_in != f.d_in as usize {
        bail!("SNELL forward: x {:?} against In {:?}", lx.dims(), input.1.dims());
    }
    with_kernel_type!(x.dtype(), T, {
        let xv = view::<T>(x, lx, "x")?;
        if let Some(survivors) = sparse_survivors(&dev, &f, tau)? {
            let y = survivors.forward::<T>(&dev, &xv, t)?;
            return Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), Shape::from((t, d_out))));
        }
        let delta = sparse_delta::<T>(&dev, &f, tau)?;
        // SAFETY: the GEMM (β = 0) writes every element.
        let mut y = unsafe { dev.alloc::<T>(t * d_out)? };
        gemm::<T>(&dev, (t, d_out, d_in), 1.0, &xv, false, &delta, false, 0.0, &mut y)?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), Shape::from((t, d_out))))
    })
}

/// `(dx, dIn, dOut)` for x [T, d_in] and dy [T, d_out], all on the device.
pub fn backward(tau: Option<f64>, x: &Tensor, input: &Tensor, output: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let dy = dy.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let (dys, dyl) = dy.storage_and_layout();
    let (xs, dys) = (cuda_storage(&xs, "SNELL x")?, cuda_storage(&dys, "SNELL dy")?);
    let (t, d_in) = xl.shape().dims2()?;
    with_factors(input, output, |dev, f| {
        let (heads, k, d_out) = (f.heads as usize, f.k as usize, f.d_out as usize);
        with_kernel_type!(x.dtype(), T, {
            let (xv, dyv) = (view::<T>(xs, xl, "x")?, view::<T>(dys, dyl, "dy")?);
            if let Some(survivors) = sparse_survivors(dev, f, tau)? {
                let (dx, d_input, d_output) = survivors.backward::<T>(dev, f, &xv, &dyv, t)?;
                return Ok((wrap(dx, dev, (t, d_in)), wrap(d_input, dev, (heads, d_in, k)), wrap(d_output, dev, (heads, d_out, k))));
            }
            let mut buf = sparse_delta::<T>(dev, f, tau)?;
            // SAFETY: the GEMM (β = 0) writes every element.
            let mut dx = unsafe { dev.alloc::<T>(t * d_in)? };
            gemm::<T>(dev, (t, d_in, d_out), 1.0, &dyv, false, &buf, true, 0.0, &mut dx)?;
            gemm::<T>(dev, (d_in, d_out, t), 1.0, &xv, true, &dyv, false, 0.0, &mut buf)?;
            if let Some(tau) = tau {
                let func = dev.get_or_load_custom_func(&format!("snell_mask_grad_{}", T::SUFFIX), "snell", SNELL_PTX)?;
                let tau_f = tau as f32;
                let mut b = func.builder();
                f.push(&mut b);
                b.arg(&tau_f).arg(&mut buf);
                // SAFETY: matches `snell_mask_grad_*`; buf holds d_in·d_out elements.
                unsafe { b.launch(f.tiles()) }.w()?;
            }
            let mut d_input = dev.alloc_zeros::<f32>(heads * d_in * k)?;
            let mut d_output = dev.alloc_zeros::<f32>(heads * d_out * k)?;
            let func = dev.get_or_load_custom_func(&format!("snell_dist_grad_{}", T::SUFFIX), "snell", SNELL_PTX)?;
            for (h, c) in head_coefficients(heads).into_iter().enumerate() {
                let in_h = f.input.slice(h * d_in * k..(h + 1) * d_in * k);
                let out_h = f.output.slice(h * d_out * k..(h + 1) * d_out * k);
                let mut din_h = d_input.slice_mut(h * d_in * k..(h + 1) * d_in * k);
                let mut dout_h = d_output.slice_mut(h * d_out * k..(h + 1) * d_out * k);
                for (a, bm, n_a, n_b, transposed, result) in [(&in_h, &out_h, d_in, d_out, 0i32, &mut din_h), (&out_h, &in_h, d_out, d_in, 1, &mut dout_h)] {
                    let cfg = LaunchConfig { grid_dim: (n_a.div_ceil(32) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: (64 * k * 4) as u32 };
                    let (n_a, n_b, k_i, ld, c_f) = (n_a as i32, n_b as i32, f.k, f.d_out, c as f32);
                    let mut b = func.builder();
                    b.arg(a).arg(bm).arg(&buf).arg(&n_a).arg(&n_b).arg(&k_i).arg(&transposed).arg(&ld).arg(&c_f).arg(result);
                    // SAFETY: matches `snell_dist_grad_*`; A holds n_a·k, B n_b·k, buf d_in·d_out and
                    // result n_a·k elements; 64·k floats of shared memory (k ≤ 64: 16 KiB).
                    unsafe { b.launch(cfg) }.w()?;
                }
            }
            Ok((wrap(dx, dev, (t, d_in)), wrap(d_input, dev, (heads, d_in, k)), wrap(d_output, dev, (heads, d_out, k))))
        })
    })
}

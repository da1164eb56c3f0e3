//! NF4 on the GPU (`kernels/nf4.cu`): dequantize to a dense matrix; and, straight from the packed
//! codes, the batch-1 GEMV of decoding, `y = dequant(W) x`, and the few-row matmul of beam search
//! and small batches. All read the buffers that
//! [`Nf4Tensor::device_buffers`] uploads once. The CPU references are
//! [`Nf4Tensor::dequantize_reference`] and the dense product with it.
//!
//! Values are bit-identical to the reference (the kernel rounds each weight to the stored dtype
//! exactly as the reference does); the GEMV accumulates in f32.

use candle_core::{DType, Tensor};

use super::Nf4Tensor;
use crate::Result;
use candle_core::Device;
use rand::Rng;
use crate::kernel_bench::{randn, BenchShapes, KernelTiming};
use crate::selftest::Case;

/// The dequantized weights in `dtype` on the tensor's device: the CUDA kernel on a GPU, the CPU
/// reference elsewhere.
pub fn dequantize(w: &Nf4Tensor, dtype: DType) -> Result<Tensor> {
    if !w.device.is_cuda() {
        return w.dequantize_reference(dtype);
    }
    #[cfg(feature = "cuda")]
    {
        Ok(super::nf4_cuda::dequantize(w, dtype)?)
    }
    #[cfg(not(feature = "cuda"))]
    Err(crate::Error::msg("NF4 on a CUDA device needs a build with the `cuda` feature"))
}

/// `x Wᵀ` for one row x [..., in] (all leading dims 1), W NF4 [out, in]; not differentiable
/// (decoding). On a GPU one kernel reads the packed codes; elsewhere dequantize then multiply.
pub fn gemv(w: &Nf4Tensor, x: &Tensor) -> Result<Tensor> {
    let (rows, cols) = (w.shape[0], w.shape.get(1).copied().unwrap_or(1));
    let dims = x.dims().to_vec();
    if w.shape.len() != 2 || dims.last() != Some(&cols) || x.elem_count() != cols {
        return Err(crate::Error::msg(format!("nf4 gemv: x {:?} is not one row for W {:?}", dims, w.shape)));
    }
    let mut out_dims = dims;
    *out_dims.last_mut().expect("checked") = rows;
    if !w.device.is_cuda() {
        let dense = w.dequantize_reference(x.dtype())?;
        return Ok(x.reshape((1, cols))?.matmul(&dense.t()?)?.reshape(out_dims)?);
    }
    #[cfg(feature = "cuda")]
    {
        Ok(super::nf4_cuda::rows_matmul(w, &x.contiguous()?, false)?.reshape(out_dims)?)
    }
    #[cfg(not(feature = "cuda"))]
    Err(crate::Error::msg("NF4 on a CUDA device needs a build with the `cuda` feature"))
}

/// Rows of x per block row of the few-row kernel (`FEW_ROWS` in `kernels/nf4.cu`).
pub const FEW_ROWS: usize = 8;

/// Up to this many untracked rows of x take [`matmul_few`] on a GPU instead of dequantize then
/// cuBLAS. Chosen, not measured: `bench nf4` times both for 1 to 1,024 rows on the GPU machine.
pub const FEW_ROWS_MAX: usize = 64;

/// `x Wᵀ` for x [..., in], W NF4 [out, in]; not differentiable (decoding with beams, small
/// batches). On a GPU one kernel reads the packed codes, decoding each weight once for up to
/// [`FEW_ROWS`] rows of x; elsewhere dequantize then multiply.
pub fn matmul_few(w: &Nf4Tensor, x: &Tensor) -> Result<Tensor> {
    let (rows, cols) = (w.shape[0], w.shape.get(1).copied().unwrap_or(1));
    let dims = x.dims().to_vec();
    if w.shape.len() != 2 || dims.last() != Some(&cols) {
        return Err(crate::Error::msg(format!("nf4 matmul: x {:?} does not end in W's {cols} inputs (W {:?})", dims, w.shape)));
    }
    let t = x.elem_count() / cols.max(1);
    let mut out_dims = dims;
    *out_dims.last_mut().expect("checked") = rows;
    if !w.device.is_cuda() {
        let dense = w.dequantize_reference(x.dtype())?;
        return Ok(x.reshape((t, cols))?.matmul(&dense.t()?)?.reshape(out_dims)?);
    }
    #[cfg(feature = "cuda")]
    {
        Ok(super::nf4_cuda::rows_matmul(w, &x.contiguous()?, true)?.reshape(out_dims)?)
    }
    #[cfg(not(feature = "cuda"))]
    Err(crate::Error::msg("NF4 on a CUDA device needs a build with the `cuda` feature"))
}

// The op on a device against its CPU reference (`candle-peft selftest`) and against the
// unfused graph it replaces (`candle-peft bench kernels`).

pub fn selftest(c: &mut Case) -> Result<()> {
    let (rows, cols) = (c.odd(65, 300), c.odd(33, 400) * 2 + 16 * c.rng.random_range(0..2usize));
    let w = c.draw(&[rows, cols], 0.05)?.to_dtype(c.dtype)?;
    for double_quant in [false, true] {
        let mut q = Nf4Tensor::quantize(&w, 64, double_quant)?;
        let reference = q.dequantize_reference(c.dtype)?.to_dtype(DType::F64)?;
        q.device = c.device.clone();
        let shape = format!("{rows}x{cols}{}", if double_quant { " dq" } else { "" });
        let got = q.dequantize(c.dtype)?;
        c.record("nf4 dequantize", &shape, "W", &got, &reference)?;
        let x = c.draw(&[1, cols], 1.0)?;
        let y = gemv(&q, &c.on_device(&x)?)?;
        let y_ref = x.matmul(&reference.t()?)?;
        c.record("nf4 gemv", &shape, "y", &y, &y_ref)?;
        // Rows of x over two block rows of the kernel, the last one partial.
        let t = c.rng.random_range(FEW_ROWS + 1..3 * FEW_ROWS);
        let x = c.draw(&[t, cols], 1.0)?;
        let y = matmul_few(&q, &c.on_device(&x)?)?;
        c.record("nf4 matmul_few", &format!("{shape} t{t}"), "y", &y, &x.matmul(&reference.t()?)?)?;
    }
    Ok(())
}

/// Rows of x at which `bench nf4` times the few-row kernel against dequantize-then-matmul.
const NF4_FEW_ROWS: [usize; 5] = [4, 16, 64, 256, 1024];

/// NF4 dequantize, GEMV and the few-row matmul: GB/s of packed weights, and each product against
/// dequantize-then-matmul with the same x (where the crossover of the two lies is what
/// `FEW_ROWS_MAX` should follow).
pub fn bench(shapes: &BenchShapes, device: &Device, dtype: DType, out: &mut Vec<KernelTiming>) -> Result<()> {
    for &(cols, rows) in &shapes.dims {
        let shape = format!("{rows}x{cols}");
        let w = Nf4Tensor::quantize(&randn(&[rows, cols], 0.02, dtype, &Device::Cpu)?, 64, true)?;
        let w = Nf4Tensor { device: device.clone(), ..w };
        let packed = w.packed.len() as f64;
        let n = w.elem_count() as f64;
        let row = |shape: String, variant: &str, ms: f64, dense: f64, bytes: f64| KernelTiming {
            gbps: Some(bytes / (ms * 1e-3) / 1e9),
            ..KernelTiming::new("nf4", &shape, variant, ms, dense)
        };
        let dequant = shapes.time(device, || {
            w.dequantize(dtype)?;
            Ok(())
        })?;
        for t in std::iter::once(1).chain(NF4_FEW_ROWS) {
            let x = randn(&[t, cols], 1.0, dtype, device)?;
            let fused = shapes.time(device, || {
                if t == 1 {
                    gemv(&w, &x)?;
                } else {
                    matmul_few(&w, &x)?;
                }
                Ok(())
            })?;
            let dense = shapes.time(device, || {
                x.matmul(&w.dequantize(dtype)?.t()?)?;
                Ok(())
            })?;
            if t == 1 {
                out.push(row(shape.clone(), "dequantize", dequant, dense, packed + n * dtype.size_in_bytes() as f64));
            }
            let shape = format!("{shape} t{t}");
            out.push(row(shape.clone(), if t == 1 { "gemv" } else { "matmul_few" }, fused, dense, packed));
            out.push(row(shape, "dequant+matmul", dense, dense, packed));
        }
    }
    Ok(())
}


#[cfg(test)]
mod selftest_tests {
    use super::*;

    /// The checks run and pass with the CPU on both sides, so a failure on a GPU is the kernel's.
    #[test]
    fn the_selftest_checks_pass_on_the_cpu_reference() {
        crate::selftest::passes_on_the_cpu(selftest, 2 * 3);
    }
}

//! DoRA's weight norm per output row, `n[i] = ‖W[i, :] + s · B[i, :] A‖₂`, without forming
//! `W + s·B A` ([out, in]: 180 MB in f32 for one 4096 x 11008 layer). The CUDA kernel
//! (`kernels/row_norms.cu`) keeps a block's rows of B in shared memory and the adapted weight
//! only in registers. The norm is detached in DoRA (PEFT ≥ 0.12), so there is no backward.
//!
//! Layout: W [rows, cols] in any float dtype; B [rows, r], A [r, cols] and n [rows] in f32;
//! row-major.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::cpu_tensor;
use crate::Result;
use candle_core::Device;
use crate::kernel_bench::{randn, BenchShapes, KernelTiming};
use crate::selftest::Case;

/// The CPU reference, one row at a time, accumulated in f64.
pub fn row_norms_reference(w: &[f64], b: &[f64], a: &[f64], (rows, cols, r): (usize, usize, usize), scale: f64) -> Vec<f64> {
    (0..rows)
        .map(|i| {
            (0..cols)
                .map(|j| {
                    let delta: f64 = (0..r).map(|k| b[i * r + k] * a[k * cols + j]).sum();
                    let v = w[i * cols + j] + scale * delta;
                    v * v
                })
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}

/// `‖W + s·B A‖` per row of W [out, in], in f32, for B [out, r] and A [r, in] (cast to f32).
pub fn row_norms(w: &Tensor, b: &Tensor, a: &Tensor, scale: f64) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let r = a.dim(0)?;
    if b.dims() != [rows, r] || a.dims() != [r, cols] {
        return Err(crate::Error::msg(format!(
            "row_norms: W {:?}, B {:?} and A {:?} do not fit together",
            w.dims(),
            b.dims(),
            a.dims()
        )));
    }
    let (b, a) = (b.to_dtype(DType::F32)?.contiguous()?, a.to_dtype(DType::F32)?.contiguous()?);
    Ok(w.contiguous()?.apply_op3_no_bwd(&b, &a, &RowNorms { scale })?)
}

pub(crate) struct RowNorms {
    pub scale: f64,
}

impl CustomOp3 for RowNorms {
    fn name(&self) -> &'static str {
        "dora-row-norms"
    }

    fn cpu_fwd(
        &self,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
        a: &CpuStorage,
        la: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cols) = lw.shape().dims2()?;
        let r = la.dims()[0];
        let values = |s: &CpuStorage, l: &Layout| cpu_tensor(s, l, self.name())?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
        let n = row_norms_reference(
            &values(w, lw)?,
            &values(b, lb)?,
            &values(a, la)?,
            (rows, cols, r),
            self.scale,
        );
        Ok((CpuStorage::F32(n.into_iter().map(|v| v as f32).collect()), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &candle_core::CudaStorage,
        lw: &Layout,
        b: &candle_core::CudaStorage,
        lb: &Layout,
        a: &candle_core::CudaStorage,
        la: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::row_norms(self, w, lw, b, lb, a, la)
    }
}

// The op on a device against its CPU reference (`candle-peft selftest`) and against the
// unfused graph it replaces (`candle-peft bench kernels`).

pub fn selftest(c: &mut Case) -> Result<()> {
    let (rows, cols, r) = (c.odd(65, 500), c.odd(65, 900), c.odd(1, 70));
    let (w, b, a) = (c.draw(&[rows, cols], 1.0)?, c.draw(&[rows, r], 0.2)?, c.draw(&[r, cols], 0.2)?);
    let got = row_norms(&c.on_device(&w)?, &b.to_dtype(DType::F32)?.to_device(c.device)?, &a.to_dtype(DType::F32)?.to_device(c.device)?, 0.5)?;
    let reference = row_norms(&w, &b, &a, 0.5)?.to_dtype(DType::F64)?;
    c.record("dora row_norms", &format!("{rows}x{cols} r{r}"), "n", &got, &reference)
}

pub fn bench(shapes: &BenchShapes, device: &Device, dtype: DType, out: &mut Vec<KernelTiming>) -> Result<()> {
    for &(cols, rows) in &shapes.dims {
        let r = 64;
        let shape = format!("{rows}x{cols} r{r}");
        let w = randn(&[rows, cols], 0.02, dtype, device)?;
        let b = randn(&[rows, r], 0.02, DType::F32, device)?;
        let a = randn(&[r, cols], 0.02, DType::F32, device)?;
        let unfused_step = || -> Result<()> {
            let v = (w.to_dtype(DType::F32)? + (b.matmul(&a)? * 2.0)?)?;
            v.sqr()?.sum(1)?.sqrt()?;
            Ok(())
        };
        let fused_step = || -> Result<()> {
            row_norms(&w, &b, &a, 2.0)?;
            Ok(())
        };
        let unfused = shapes.time(device, unfused_step)?;
        let fused = shapes.time(device, fused_step)?;
        let (unfused_mem, fused_mem) = (crate::memory::peak_extra_mib(device, unfused_step)?, crate::memory::peak_extra_mib(device, fused_step)?);
        for (variant, ms, mib) in [("unfused", unfused, unfused_mem), ("fused", fused, fused_mem)] {
            out.push(KernelTiming::new("dora_row_norms", &shape, variant, ms, unfused).peak_mib(mib));
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
        crate::selftest::passes_on_the_cpu(selftest, 1);
    }
}

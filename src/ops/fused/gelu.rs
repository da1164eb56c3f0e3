//! The exact (erf) GELU of the ViT's MLP, forward and backward each one pass over the values.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use num_traits::Float;

use super::*;

/// `y = x·Φ(x)`, `Φ(x) = (1 + erf(x/√2))/2`, saving only x (the graph's input).
/// Backward: `dx = dy · (Φ(x) + x·φ(x))`, `φ(x) = exp(−x²/2)/√(2π)`.
///
/// erf by Abramowitz and Stegun 7.1.26 (|error| ≤ 1.5e-7): `erf(z) = 1 − t·P(t)·exp(−z²)`,
/// `t = 1/(1 + 0.3275911·z)` for z ≥ 0, odd in z. With z = |x|/√2, `exp(−z²) = exp(−x²/2)` is
/// the exponential that φ needs too, so each value takes one exp (`ops::exp`, vectorized), where
/// candle's `gelu_erf` takes libm's scalar `erff` forward and four passes of ops backward.
pub struct Gelu;

const P: f64 = 0.327_591_1;
const A: [f64; 5] = [0.254_829_592, -0.284_496_736, 1.421_413_741, -1.453_152_027, 1.061_405_429];

/// `(Φ(x), φ(x))` of x given `e = exp(−x²/2)`.
#[inline(always)]
fn phi<T: Float>(x: T, e: T) -> (T, T) {
    let c = |v: f64| T::from(v).expect("constant");
    let z = x.abs() * c(std::f64::consts::FRAC_1_SQRT_2);
    let t = T::one() / (T::one() + c(P) * z);
    let poly = t * (c(A[0]) + t * (c(A[1]) + t * (c(A[2]) + t * (c(A[3]) + t * c(A[4])))));
    let erf = (T::one() - poly * e).copysign(x);
    (c(0.5) * (T::one() + erf), e * c(0.398_942_280_401_432_7))
}

/// `f(x, Φ(x), φ(x))` of each x into `out`, a chunk at a time (the exps vectorized).
fn map_f32(x: &[f32], out: &mut [f32], f: impl Fn(usize, f32, f32, f32) -> f32 + Sync) {
    use rayon::prelude::*;
    const TASK: usize = 16384;
    const CHUNK: usize = 256;
    out.par_chunks_mut(TASK).zip(x.par_chunks(TASK)).enumerate().for_each(|(task, (out, x))| {
        let mut e = [0f32; CHUNK];
        for (c, (out, x)) in out.chunks_mut(CHUNK).zip(x.chunks(CHUNK)).enumerate() {
            let e = &mut e[..x.len()];
            for (e, &x) in e.iter_mut().zip(x) {
                *e = -0.5 * x * x;
            }
            crate::ops::exp::exp_in_place(e);
            let first = task * TASK + c * CHUNK;
            for (i, ((o, &x), &e)) in out.iter_mut().zip(x).zip(e.iter()).enumerate() {
                let (cdf, pdf) = phi(x, e);
                *o = f(first + i, x, cdf, pdf);
            }
        }
    });
}

fn map_f64(x: &[f64], f: impl Fn(usize, f64, f64, f64) -> f64) -> Vec<f64> {
    x.iter().enumerate().map(|(i, &x)| {
        let (cdf, pdf) = phi(x, (-0.5 * x * x).exp());
        f(i, x, cdf, pdf)
    }).collect()
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(x) => {
                let x = contiguous(x, l, self.name())?;
                let mut out = vec![0f32; x.len()];
                map_f32(x, &mut out, |_, x, cdf, _| x * cdf);
                CpuStorage::F32(out)
            }
            CpuStorage::F64(x) => CpuStorage::F64(map_f64(contiguous(x, l, self.name())?, |_, x, cdf, _| x * cdf)),
            _ => candle_core::bail!("{}: x must be f32 or f64", self.name()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (x, dy) = (x.detach().contiguous()?, dy.contiguous()?);
        let dx = match x.dtype() {
            candle_core::DType::F32 => crate::threads::with_values(&x, |xs: &[f32]| {
                crate::threads::with_values(&dy, |dys: &[f32]| {
                    let mut out = vec![0f32; xs.len()];
                    map_f32(xs, &mut out, |i, x, cdf, pdf| dys[i] * (cdf + x * pdf));
                    Tensor::from_vec(out, x.shape(), x.device())
                })
            })???,
            _ => {
                let (xs, dys): (Vec<f64>, Vec<f64>) = (x.flatten_all()?.to_vec1()?, dy.to_dtype(candle_core::DType::F64)?.flatten_all()?.to_vec1()?);
                Tensor::from_vec(map_f64(&xs, |i, x, cdf, pdf| dys[i] * (cdf + x * pdf)), x.shape(), x.device())?.to_dtype(x.dtype())?
            }
        };
        Ok(Some(dx))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    /// The op against candle's `gelu_erf` (libm's erf) in f32 and f64, values and gradient, over
    /// -8..8 (both tails) on more values than one parallel task holds.
    #[test]
    fn the_fused_gelu_matches_candle_s_gelu_erf() {
        let n = 40_000;
        for dtype in [DType::F32, DType::F64] {
            let x = Tensor::from_vec((0..n).map(|i| -8.0 + 16.0 * i as f64 / n as f64).collect::<Vec<_>>(), n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let x = Var::from_tensor(&x).unwrap();
            let weights = Tensor::from_vec((0..n).map(|i| ((i * 7 % 13) as f64 - 6.0) / 3.0).collect::<Vec<_>>(), n, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
            let fused = crate::ops::nn::gelu_erf(&x, true).unwrap();
            let plain = x.as_tensor().gelu_erf().unwrap();
            let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            // erf's error (1.5e-7) times |x|/2, and f32 rounding.
            assert!(diff(&fused, &plain) < 1e-6, "{dtype:?}: {}", diff(&fused, &plain));
            let (gf, gp) = ((fused * &weights).unwrap().sum_all().unwrap().backward().unwrap(), (plain * &weights).unwrap().sum_all().unwrap().backward().unwrap());
            let (a, b) = (gf.get(x.as_tensor()).unwrap(), gp.get(x.as_tensor()).unwrap());
            assert!(diff(a, b) < 2e-6, "{dtype:?}: {}", diff(a, b));
        }
    }

    /// GELU, a frozen projection with its bias and LayerScale, and the residual as one op
    /// against the same composed of candle's ops, in f64: values and the gradients of a and the
    /// residual, with and without LayerScale.
    #[test]
    fn gelu_into_a_frozen_projection_matches_the_composed_ops() {
        let dev = Device::Cpu;
        let draw = |dims: &[usize], k: usize| {
            let n: usize = dims.iter().product();
            Tensor::from_vec((0..n).map(|i| ((i * k % 31) as f64 - 15.0) / 8.0).collect::<Vec<_>>(), dims, &dev).unwrap()
        };
        let (w, bias, gamma, weights) = (draw(&[5, 7], 3), draw(&[5], 5), draw(&[5], 11), draw(&[2, 3, 5], 13));
        for scale in [Some(&gamma), None] {
            let (a, residual) = (Var::from_tensor(&draw(&[2, 3, 7], 7)).unwrap(), Var::from_tensor(&draw(&[2, 3, 5], 17)).unwrap());
            let fused = crate::ops::nn::gelu_frozen_matmul_t_add(&a, &w.clone().into(), &bias, scale, &residual, true).unwrap();
            let branch = a.as_tensor().gelu_erf().unwrap().broadcast_matmul(&w.t().unwrap()).unwrap().broadcast_add(&bias).unwrap();
            let branch = match scale {
                Some(g) => branch.broadcast_mul(g).unwrap(),
                None => branch,
            };
            let composed = (residual.as_tensor() + branch).unwrap();
            let diff = |x: &Tensor, y: &Tensor| (x - y).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
            assert!(diff(&fused, &composed) < 1e-6);
            let (gf, gc) = ((fused * &weights).unwrap().sum_all().unwrap().backward().unwrap(), (composed * &weights).unwrap().sum_all().unwrap().backward().unwrap());
            for v in [&a, &residual] {
                assert!(diff(gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap()) < 2e-6);
            }
        }
    }
}

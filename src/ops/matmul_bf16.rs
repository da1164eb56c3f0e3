//! `y = x Wᵀ` for a frozen bf16 W [rows, cols] (row-major) and a few rows of x, on the CPU: the
//! product of decoding with `--dtype bf16`, reading W as stored (half of f32's bytes) where
//! candle's CPU matmul converts the whole of W to f32 on every call.
//!
//! Each output is the dot product of a W row with an x row, accumulated in f32 (a product of two
//! bf16 values is exact in f32). Levels, chosen at run time (`CANDLE_PEFT_SIMD=scalar|avx2`
//! forces a lower one), each tested against the scalar reference:
//! - AVX-512 BF16: `vdpbf16ps` on 256-bit registers adds 16 products into 8 f32 lanes, with x
//!   rounded to bf16 (exact when the model computes in bf16, as x then already is);
//! - AVX2 + FMA: 8 values of W widened to f32 (a zero-extension and a 16-bit shift), multiplied
//!   with x in f32 by FMA;
//! - scalar: the reference, the same sums in order.
//!
//! Each W row is read as one stream with 4 independent accumulator chains; chunks of rows go
//! over the threads.

use std::sync::OnceLock;

use candle_core::{DType, Tensor};
use half::bf16;

use crate::{Error, Result};

/// Up to this many rows of x, the product reads bf16 W directly; above, candle's GEMM, whose
/// conversion of W is then shared by enough rows.
pub const ROWS_MAX: usize = 16;

/// The SIMD level of the dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Scalar,
    Avx2,
    Avx512Bf16,
}

impl Level {
    /// The best level this CPU has, lowered by `CANDLE_PEFT_SIMD` (scalar, avx2) if set.
    pub fn detected() -> Level {
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| crate::simd::capped(Self::cpu(), Level::Scalar, Level::Avx2))
    }

    /// Every level this CPU can run, lowest first (for the tests).
    pub fn available() -> Vec<Level> {
        [Level::Scalar, Level::Avx2, Level::Avx512Bf16].into_iter().filter(|&l| l <= Self::cpu()).collect()
    }

    fn cpu() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                let bf16 = is_x86_feature_detected!("avx512bf16") && is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("avx512f");
                return if bf16 { Level::Avx512Bf16 } else { Level::Avx2 };
            }
        }
        Level::Scalar
    }
}

/// Whether `x Wᵀ` takes this product: an untracked x on the CPU, few rows, W bf16.
pub fn takes(x: &Tensor, w: &Tensor) -> bool {
    let cols = w.dims().last().copied().unwrap_or(0);
    x.device().is_cpu() && !x.track_op() && w.dtype() == DType::BF16 && w.rank() == 2 && x.dims().last() == Some(&cols) && x.elem_count() <= ROWS_MAX * cols
}

/// `x Wᵀ` for x [.., cols] of any float dtype and W bf16 [rows, cols]: y [.., rows] in x's dtype.
pub fn matmul_tensor(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    // W borrowed where it is contiguous (a weight is): a copy would read it twice.
    crate::threads::product_tensor(x, cols, rows, "a bf16 weight", |values, t| {
        super::with_values::<bf16, _>(w, |weight| matmul(weight, rows, cols, values, t, Level::detected()))?
    })
}

/// y [t, rows] = x [t, cols] · Wᵀ, W [rows, cols] row-major, on `level`.
pub fn matmul(w: &[bf16], rows: usize, cols: usize, x: &[f32], t: usize, level: Level) -> Result<Vec<f32>> {
    if w.len() != rows * cols || x.len() != t * cols {
        return Err(Error::msg(format!("bf16 product of W [{rows}, {cols}] ({} values) and x [{t}, {cols}] ({} values)", w.len(), x.len())));
    }
    let x_bf16: Vec<bf16> = if level == Level::Avx512Bf16 { x.iter().map(|&v| bf16::from_f32(v)).collect() } else { Vec::new() };
    Ok(crate::threads::rows_product(rows, t, |first, out| {
        for (i, out) in out.chunks_exact_mut(t).enumerate() {
            let w = &w[(first + i) * cols..(first + i + 1) * cols];
            for (j, y) in out.iter_mut().enumerate() {
                *y = dot(level, w, &x[j * cols..(j + 1) * cols], x_bf16.get(j * cols..(j + 1) * cols));
            }
        }
    }))
}

/// A W row's dot product with an x row.
fn dot(level: Level, w: &[bf16], x: &[f32], x_bf16: Option<&[bf16]>) -> f32 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the level is one this CPU has (`Level::detected` / `available`); w and x (and its
    // bf16 copy on that level) have the same length.
    unsafe {
        match (level, x_bf16) {
            (Level::Avx512Bf16, Some(xb)) => return x86::dot_bf16(w, xb),
            (Level::Avx2 | Level::Avx512Bf16, _) => return x86::dot_avx2(w, x),
            _ => {}
        }
    }
    let _ = (level, x_bf16);
    dot_scalar(w, x)
}

/// The reference.
pub fn dot_scalar(w: &[bf16], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(w, x)| w.to_f32() * x).sum()
}

/// The values of a row that the vectors, `step` at a time, leave over.
fn tail<T: Copy>(w: &[bf16], x: &[T], step: usize, f: impl Fn(T) -> f32) -> f32 {
    let body = w.len() / step * step;
    w[body..].iter().zip(&x[body..]).map(|(w, &x)| w.to_f32() * f(x)).sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use half::bf16;

    use super::tail;

    /// Accumulators per row: independent chains that hide the latency of the multiply-adds, and
    /// a row read as one stream (4 rows side by side read at half the speed from memory).
    const CHAINS: usize = 4;

    #[inline(always)]
    unsafe fn hsum(acc: [__m256; CHAINS]) -> f32 {
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// # Safety
    /// The CPU has AVX2 and FMA; `x.len() >= w.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_avx2(w: &[bf16], x: &[f32]) -> f32 {
        // 8 bf16 values as f32 lanes: zero-extended to 32 bits and shifted into the high half.
        let widen = |p: *const bf16| _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)), 16));
        let mut acc = [_mm256_setzero_ps(); CHAINS];
        for c in (0..w.len() / 32 * 32).step_by(32) {
            for (u, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(widen(w.as_ptr().add(c + 8 * u)), _mm256_loadu_ps(x.as_ptr().add(c + 8 * u)), *acc);
            }
        }
        hsum(acc) + tail(w, x, 32, |x| x)
    }

    /// # Safety
    /// The CPU has AVX-512 F, VL and BF16; `x.len() >= w.len()`.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bf16")]
    pub unsafe fn dot_bf16(w: &[bf16], x: &[bf16]) -> f32 {
        let load = |p: *const bf16| -> __m256bh { std::mem::transmute(_mm256_loadu_si256(p as *const __m256i)) };
        let mut acc = [_mm256_setzero_ps(); CHAINS];
        for c in (0..w.len() / 64 * 64).step_by(64) {
            for (u, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_dpbf16_ps(*acc, load(w.as_ptr().add(c + 16 * u)), load(x.as_ptr().add(c + 16 * u)));
            }
        }
        hsum(acc) + tail(w, x, 64, |x| x.to_f32())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Every level against the f64 product on odd shapes (a tail after the vectors, a last group
    /// of fewer than 4 rows), with x made of bf16 values so that every level computes the same
    /// products: only the order of the f32 sums differs.
    #[test]
    fn every_level_matches_the_reference() {
        let mut rng = StdRng::seed_from_u64(11);
        for (rows, cols, t) in [(1, 7, 1), (4, 16, 1), (9, 37, 2), (67, 576, 1), (130, 200, 5), (64, 1024, 16)] {
            let w: Vec<bf16> = (0..rows * cols).map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0))).collect();
            let x: Vec<f32> = (0..t * cols).map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)).to_f32()).collect();
            let exact: Vec<f64> = (0..t * rows)
                .map(|o| (0..cols).map(|c| w[o % rows * cols + c].to_f64() * x[o / rows * cols + c] as f64).sum())
                .collect();
            for level in Level::available() {
                let y = matmul(&w, rows, cols, &x, t, level).unwrap();
                let err = exact.iter().zip(&y).fold(0f64, |a, (e, y)| a.max((e - *y as f64).abs()));
                assert!(err < 1e-4 * (cols as f64).sqrt(), "{level:?} {rows}x{cols} t{t}: off by {err}");
            }
        }
        assert!(matmul(&[bf16::ZERO; 6], 2, 3, &[0.0; 4], 1, Level::Scalar).is_err());
    }

    /// The tensor entry point takes untracked few-row products on bf16 weights only, and gives
    /// candle's matmul's values.
    #[test]
    fn the_tensor_product_is_candles() {
        let dev = candle_core::Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (33, 48), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let x = Tensor::randn(0f32, 1.0, (1, 3, 48), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        assert!(takes(&x, &w));
        assert!(!takes(&x, &w.to_dtype(DType::F32).unwrap()));
        assert!(!takes(&Tensor::zeros((1, 17, 48), DType::BF16, &dev).unwrap(), &w));
        let want = x.to_dtype(DType::F32).unwrap().broadcast_matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
        let got = matmul_tensor(&x, &w).unwrap();
        assert_eq!((got.dims(), got.dtype()), (&[1, 3, 33][..], DType::BF16));
        let err: f32 = (want - got.to_dtype(DType::F32).unwrap()).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
        assert!(err < 0.1, "{err}");
    }
}

//! `exp` over f32 slices, eight lanes at a time where the CPU has AVX2 and FMA (chosen at run
//! time), libm's `expf` elsewhere: the softmax and SiLU of inference spend most of their time in
//! it, and libm takes a slow path (errno and all) for every masked attention score, whose
//! exponent underflows.
//!
//! The vector code is ggml's `ggml_v_expf`, itself ARM's optimized-routines `expf`:
//! `exp(x) = 2ⁿ · exp(b)` with `n = round(x / ln 2)` and `b = x − n·ln 2` (ln 2 split in two
//! parts so that b is exact), `exp(b) − 1 ≈ b·(c₁ + b·(c₂ + …))` a degree-5 polynomial on
//! |b| ≤ ln 2 / 2; `2ⁿ` is built in the exponent bits, and for |n| > 126 it is split in two
//! factors so that overflow gives +inf and underflow 0 (or a subnormal) as libm does. Its
//! largest error is 1.45 ulp (against libm's 0.5). NaN stays NaN.

/// `exp` of each value, in place.
pub fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA.
        unsafe { x86::exp_in_place(xs) };
        return;
    }
    exp_in_place_reference(xs);
}

/// `exp` of a tensor: an untracked f32 tensor on the CPU by [`exp_in_place`] over the threads,
/// any other by candle's (libm's `expf`, one thread). Training's attention and SwiGLU backward
/// spent 4-5% of a CPU step in libm.
pub fn exp_tensor(t: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    use rayon::prelude::*;
    if !t.device().is_cpu() || t.dtype() != candle_core::DType::F32 || t.track_op() {
        return t.exp();
    }
    let mut values: Vec<f32> = t.flatten_all()?.to_vec1()?;
    values.par_chunks_mut(1 << 14).for_each(exp_in_place);
    candle_core::Tensor::from_vec(values, t.shape(), t.device())
}

/// libm's `expf` on each value: the reference, and the path of other CPUs.
pub fn exp_in_place_reference(xs: &mut [f32]) {
    for x in xs {
        *x = x.exp();
    }
}

/// `silu(g) ⊙ u = g / (1 + exp(−g)) ⊙ u`, into `out`.
pub fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    const CHUNK: usize = 256;
    let mut e = [0f32; CHUNK];
    for ((g, u), out) in g.chunks(CHUNK).zip(u.chunks(CHUNK)).zip(out.chunks_mut(CHUNK)) {
        let e = &mut e[..g.len()];
        for (e, &g) in e.iter_mut().zip(g) {
            *e = -g;
        }
        exp_in_place(e);
        for (((o, &g), &u), &e) in out.iter_mut().zip(g).zip(u).zip(e.iter()) {
            *o = g / (1.0 + e) * u;
        }
    }
}

/// Each row of `cols` values replaced by its softmax `exp(x − max) / Σ exp(x − max)`.
pub fn softmax_rows_in_place(xs: &mut [f32], cols: usize) {
    for row in xs.chunks_mut(cols.max(1)) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        for v in row.iter_mut() {
            *v -= max;
        }
        exp_in_place(row);
        let sum: f32 = row.iter().sum();
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_in_place(xs: &mut [f32]) {
        let mut chunks = xs.chunks_exact_mut(8);
        for c in &mut chunks {
            let v = _mm256_loadu_ps(c.as_ptr());
            _mm256_storeu_ps(c.as_mut_ptr(), exp8(v));
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut buf = [0f32; 8];
            buf[..rest.len()].copy_from_slice(rest);
            let v = exp8(_mm256_loadu_ps(buf.as_ptr()));
            _mm256_storeu_ps(buf.as_mut_ptr(), v);
            rest.copy_from_slice(&buf[..rest.len()]);
        }
    }

    #[inline(always)]
    unsafe fn c(bits: u32) -> __m256 {
        _mm256_set1_ps(f32::from_bits(bits))
    }

    /// ggml's `ggml_v_expf` (see the module doc); the constants are its hex floats' bits.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        let r = c(0x4b40_0000); // 0x1.8p23: adding it rounds to an integer
        let z = _mm256_fmadd_ps(x, c(0x3fb8_aa3b), r); // x / ln 2 + r
        let n = _mm256_sub_ps(z, r);
        // b = x − n·ln2_hi − n·ln2_lo
        let b = _mm256_fnmadd_ps(n, c(0x35bf_be8e), _mm256_fnmadd_ps(n, c(0x3f31_7200), x));
        let e = _mm256_slli_epi32(_mm256_castps_si256(z), 23);
        let k = _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_castps_si256(_mm256_set1_ps(1.0))));
        let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        let big = _mm256_castps_si256(_mm256_cmp_ps(abs_n, _mm256_set1_ps(126.0), _CMP_GT_OQ));
        let u = _mm256_mul_ps(b, b);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(_mm256_fmadd_ps(c(0x3c07_2010), b, c(0x3d2b_9f17)), u, _mm256_fmadd_ps(c(0x3e2a_af33), b, c(0x3eff_fedb))),
            u,
            _mm256_mul_ps(c(0x3f7f_fff6), b),
        );
        if _mm256_movemask_ps(_mm256_castsi256_ps(big)) == 0 {
            return _mm256_fmadd_ps(j, k, k);
        }
        // |n| > 126: 2ⁿ as s1·s2 (or s1² past ±192, which is 0 or +inf).
        let g = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_LE_OQ)), _mm256_set1_epi32(0x8200_0000u32 as i32));
        let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
        let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
        let huge = _mm256_castsi256_ps(_mm256_castps_si256(_mm256_cmp_ps(abs_n, _mm256_set1_ps(192.0), _CMP_GT_OQ)));
        let big = _mm256_castsi256_ps(big);
        _mm256_or_ps(
            _mm256_and_ps(huge, _mm256_mul_ps(s1, s1)),
            _mm256_andnot_ps(
                huge,
                _mm256_or_ps(_mm256_and_ps(big, _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1)), _mm256_andnot_ps(big, _mm256_fmadd_ps(k, j, k))),
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        if a == b || (a.is_nan() && b.is_nan()) {
            return 0;
        }
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulps_of_libm_and_keeps_its_edges() {
        let mut xs: Vec<f32> = (-20000..20000).map(|i| i as f32 * 0.0047).collect();
        xs.extend([0.0, -0.0, 88.7, 88.73, 89.0, 100.0, -87.3, -103.0, -104.0, -150.0, -1e30, 1e30, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::MIN_POSITIVE]);
        xs.extend([1.0, 2.0, 3.0]); // a remainder past the last 8
        let mut fast = xs.clone();
        exp_in_place(&mut fast);
        for (&x, &y) in xs.iter().zip(&fast) {
            let want = x.exp();
            if want.is_normal() || want == 0.0 && y == 0.0 || !want.is_finite() {
                assert!(ulps(y, want) <= 2, "exp({x}) = {y}, libm {want}");
            } else {
                // Subnormal results: within the smallest normal's ulp.
                assert!((y - want).abs() <= f32::MIN_POSITIVE * 1e-6 + want.abs() * 1e-6, "exp({x}) = {y}, libm {want}");
            }
        }
    }

    #[test]
    fn softmax_and_silu_match_their_definitions() {
        let x: Vec<f32> = (0..2 * 37).map(|i| ((i * 7919) % 23) as f32 * 0.7 - 8.0).collect();
        let mut s = x.clone();
        softmax_rows_in_place(&mut s, 37);
        for (row, out) in x.chunks(37).zip(s.chunks(37)) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
            for (v, o) in row.iter().zip(out) {
                assert!(((v - max).exp() / sum - o).abs() < 1e-6);
            }
        }
        let u: Vec<f32> = x.iter().map(|v| v * 0.5 + 1.0).collect();
        let mut y = vec![0f32; x.len()];
        silu_mul(&x, &u, &mut y);
        for ((g, u), y) in x.iter().zip(&u).zip(&y) {
            let want = g / (1.0 + (-g).exp()) * u;
            assert!((want - y).abs() <= 1e-6 * want.abs().max(1.0), "{g} {u}: {y} against {want}");
        }
        // Masked scores (−inf) weigh 0, not NaN.
        let mut masked = vec![f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        softmax_rows_in_place(&mut masked, 3);
        assert_eq!(masked, [0.0, 1.0, 0.0]);
    }

    /// The tensor form: candle's exp within 2 ulps on a strided f32 tensor (more values than one
    /// task takes), and candle's own for a tracked tensor (same values exactly).
    #[test]
    fn exp_of_a_tensor_is_candles() {
        use candle_core::{Device, Tensor, Var};
        let t = Tensor::arange(0f32, 40000.0, &Device::Cpu).unwrap().affine(0.003, -60.0).unwrap().reshape((200, 200)).unwrap().t().unwrap();
        let (got, want) = (exp_tensor(&t).unwrap(), t.exp().unwrap());
        assert_eq!(got.dims(), want.dims());
        let (got, want): (Vec<f32>, Vec<f32>) = (got.flatten_all().unwrap().to_vec1().unwrap(), want.flatten_all().unwrap().to_vec1().unwrap());
        assert!(got.iter().zip(&want).all(|(&g, &w)| ulps(g, w) <= 2));
        let tracked = Var::from_tensor(&t).unwrap();
        let e = exp_tensor(tracked.as_tensor()).unwrap();
        assert!(e.track_op());
        assert_eq!(e.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
    }
}

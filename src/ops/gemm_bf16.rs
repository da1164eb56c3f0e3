//! `C = A Bᵀ` on the CPU with bf16 operands and f32 accumulation: the products of training with
//! a bf16 frozen base (`x Wᵀ` forward, `dy W` backward) on AVX-512 BF16.
//!
//! A [m, k] is f32 (the activations, rounded to bf16 as they are packed, as autocast rounds a
//! linear's input); B [n, k] is bf16 (W, or Wᵀ read through strides); C [m, n] is f32, row-major.
//!
//! `vdpbf16ps` multiplies pairs of bf16 along k and adds both products into one f32 lane, so the
//! operands are packed in pairs of k (llm.c / BLIS style panels, each padded with zeros):
//! - A in panels of [`MR`] rows: `pa[panel][p][i]` = the pair (k = 2p, 2p + 1) of row i, a u32;
//! - B in panels of [`NR`] columns: `pb[panel][p][j]` = the pair of column j.
//!
//! The microkernel keeps a [`MR`] x [`NR`] tile of C in 24 zmm registers; for each pair p it loads
//! the B panel's 32 pairs (two registers) and broadcasts each A row's pair, 24 `vdpbf16ps` of 32
//! multiply-adds each. The k pairs go in blocks of [`KC`] so that a block of B panels stays in L2
//! while the tiles of a chunk of A panels pass over it; tiles of (A chunk, B block) go over the
//! threads.
//!
//! The reference is [`reference`] (f64 sums of the same bf16-rounded values); the tests compare
//! the two on odd shapes and strides. Where the CPU has no AVX-512 BF16 ([`available`] is false)
//! the caller takes its f32 product instead.

use half::bf16;
use rayon::prelude::*;

use crate::{Error, Result};

/// Rows of A (and C) per panel.
pub const MR: usize = 12;
/// Columns of B (and C) per panel: two zmm registers of 16 f32.
pub const NR: usize = 32;
/// k pairs per block.
const KC: usize = 256;
/// A panels per task.
const MC_PANELS: usize = 8;
/// B panels per task.
const NC_PANELS: usize = 4;

/// A bf16 matrix [rows, cols] read through strides (W as stored, or its transpose).
#[derive(Clone, Copy)]
pub struct Strided<'a> {
    pub data: &'a [bf16],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl Strided<'_> {
    fn get(&self, r: usize, c: usize) -> bf16 {
        self.data[r * self.row_stride + c * self.col_stride]
    }

    fn check(&self) -> Result<()> {
        let last = (self.rows.max(1) - 1) * self.row_stride + (self.cols.max(1) - 1) * self.col_stride;
        if self.rows > 0 && self.cols > 0 && last >= self.data.len() {
            return Err(Error::msg(format!("bf16 GEMM: a [{}, {}] operand with strides ({}, {}) needs {} values, has {}", self.rows, self.cols, self.row_stride, self.col_stride, last + 1, self.data.len())));
        }
        Ok(())
    }
}

/// Whether this CPU runs the kernel (AVX-512 F / BF16, and the SIMD cap allows it).
pub fn available() -> bool {
    super::matmul_bf16::Level::detected() == super::matmul_bf16::Level::Avx512Bf16
}

/// `C = A Bᵀ`: A [m, k] f32 row-major, B [n, k]; C [m, n]. Errors where the CPU lacks AVX-512
/// BF16 (see [`available`]) or the shapes disagree.
pub fn gemm(a: &[f32], m: usize, b: Strided) -> Result<Vec<f32>> {
    let (n, k) = (b.rows, b.cols);
    if a.len() != m * k {
        return Err(Error::msg(format!("bf16 GEMM: A of {} values is not [{m}, {k}]", a.len())));
    }
    b.check()?;
    if !available() {
        return Err(Error::msg("bf16 GEMM: this CPU has no AVX-512 BF16"));
    }
    let kp = k.div_ceil(2);
    let (pa, pb) = (pack_a(a, m, k), pack_b(b));
    let mut c = vec![0f32; m * n];
    let (m_panels, n_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    let (m_chunks, n_blocks) = (m_panels.div_ceil(MC_PANELS), n_panels.div_ceil(NC_PANELS));
    // Each task writes its own tiles of C.
    let out = crate::threads::DisjointOut(c.as_mut_ptr());
    (0..m_chunks * n_blocks).into_par_iter().for_each(|task| {
        let out = &out;
        let (mc, nb) = (task / n_blocks, task % n_blocks);
        for k0 in (0..kp).step_by(KC) {
            let kc = KC.min(kp - k0);
            for mp in mc * MC_PANELS..((mc + 1) * MC_PANELS).min(m_panels) {
                let a_panel = &pa[(mp * kp + k0) * MR..][..kc * MR];
                for np in nb * NC_PANELS..((nb + 1) * NC_PANELS).min(n_panels) {
                    let b_panel = &pb[(np * kp + k0) * NR..][..kc * NR];
                    let (rows, cols) = (MR.min(m - mp * MR), NR.min(n - np * NR));
                    // SAFETY: `available` checked the CPU; the tile (rows from mp·MR, columns from
                    // np·NR) is inside C and belongs to this task alone.
                    unsafe {
                        #[cfg(target_arch = "x86_64")]
                        x86::tile(kc, a_panel, b_panel, out.0.add(mp * MR * n + np * NR), n, rows, cols, k0 > 0);
                    }
                }
            }
        }
    });
    Ok(c)
}

/// Whether the products of an f32 x with a bf16 frozen W (the CPU's mixed precision: a bf16
/// base, f32 activations) take the kernel: both on the CPU and the CPU has AVX-512 BF16.
pub fn applies(x: &candle_core::Tensor, w: &candle_core::Tensor) -> bool {
    use candle_core::DType;
    x.dtype() == DType::F32 && w.dtype() == DType::BF16 && x.device().is_cpu() && w.device().is_cpu() && w.rank() == 2 && available()
}

/// `x Wᵀ` [rows, out] for x [rows, in] f32 and W [out, in] bf16, where [`applies`].
pub fn x_wt(x: &candle_core::Tensor, w: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    let (out, inp) = w.dims2()?;
    tensor_gemm(x, w, "x", inp, |data| Strided { data, rows: out, cols: inp, row_stride: inp, col_stride: 1 })
}

/// `dy W` [rows, in] for dy [rows, out] f32 and W [out, in] bf16 (the backward of [`x_wt`]), W
/// read as Wᵀ through strides.
pub fn dy_w(dy: &candle_core::Tensor, w: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    let (out, inp) = w.dims2()?;
    tensor_gemm(dy, w, "dy", out, |data| Strided { data, rows: inp, cols: out, row_stride: 1, col_stride: inp })
}

/// `a Bᵀ` for a [rows, k] f32 (`what` in the error) and B read out of W's values by `b`.
fn tensor_gemm(a: &candle_core::Tensor, w: &candle_core::Tensor, what: &str, k: usize, b: impl Fn(&[bf16]) -> Strided) -> Result<candle_core::Tensor> {
    let (rows, cols) = a.dims2()?;
    if cols != k {
        return Err(Error::msg(format!("bf16 GEMM: {what} [{rows}, {cols}] against W {:?}", w.dims())));
    }
    let (c, n) = super::with_values::<bf16, _>(w, |w| {
        let b = b(w);
        super::with_values::<f32, _>(a, |a| gemm(a, rows, b).map(|c| (c, b.rows)))
    })???;
    Ok(candle_core::Tensor::from_vec(c, (rows, n), a.device())?)
}

/// The bf16 pair (k = 2p, 2p + 1) as the u32 `vdpbf16ps` reads: the lower k in the low half.
fn pair(lo: bf16, hi: bf16) -> u32 {
    lo.to_bits() as u32 | (hi.to_bits() as u32) << 16
}

/// A in panels of MR rows (module doc), rounded to bf16 (to nearest, ties to even).
fn pack_a(a: &[f32], m: usize, k: usize) -> Vec<u32> {
    let kp = k.div_ceil(2);
    let mut pa = vec![0u32; m.div_ceil(MR) * kp * MR];
    pa.par_chunks_mut(kp * MR).enumerate().for_each(|(panel, dst)| {
        for i in 0..MR.min(m - panel * MR) {
            let row = &a[(panel * MR + i) * k..][..k];
            // 16 values at a time converted in one instruction (the scalar conversion was a
            // third of the product's time), the rest here.
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `gemm` runs only where `available`: AVX-512 F and BF16.
            let done = unsafe { x86::pack_row(row, i, dst) };
            #[cfg(not(target_arch = "x86_64"))]
            let done = 0;
            for p in done / 2..kp {
                let hi = if 2 * p + 1 < k { bf16::from_f32(row[2 * p + 1]) } else { bf16::ZERO };
                dst[p * MR + i] = pair(bf16::from_f32(row[2 * p]), hi);
            }
        }
    });
    pa
}

/// B in panels of NR columns (module doc).
fn pack_b(b: Strided) -> Vec<u32> {
    let (n, k) = (b.rows, b.cols);
    let kp = k.div_ceil(2);
    let mut pb = vec![0u32; n.div_ceil(NR) * kp * NR];
    pb.par_chunks_mut(kp * NR).enumerate().for_each(|(panel, dst)| {
        let (r0, cols) = (panel * NR, NR.min(n - panel * NR));
        if b.row_stride == 1 && b.col_stride != 1 {
            // B stored transposed (the backward's Wᵀ): a pair's two values lie in two stored rows,
            // each contiguous over the panel's columns.
            let cs = b.col_stride;
            for (p, out) in dst.chunks_exact_mut(NR).enumerate() {
                let lo = &b.data[2 * p * cs + r0..][..cols];
                match (2 * p + 1 < k).then(|| &b.data[(2 * p + 1) * cs + r0..][..cols]) {
                    Some(hi) => out.iter_mut().zip(lo.iter().zip(hi)).for_each(|(o, (&l, &h))| *o = pair(l, h)),
                    None => out.iter_mut().zip(lo).for_each(|(o, &l)| *o = pair(l, bf16::ZERO)),
                }
            }
            return;
        }
        for j in 0..cols {
            let r = r0 + j;
            for p in 0..kp {
                let hi = if 2 * p + 1 < k { b.get(r, 2 * p + 1) } else { bf16::ZERO };
                dst[p * NR + j] = pair(b.get(r, 2 * p), hi);
            }
        }
    });
    pb
}

/// The reference: `C = bf16(A) Bᵀ` summed in f64.
pub fn reference(a: &[f32], m: usize, b: Strided) -> Vec<f32> {
    let (n, k) = (b.rows, b.cols);
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let s: f64 = (0..k).map(|p| bf16::from_f32(a[i * k + p]).to_f64() * b.get(j, p).to_f64()).sum();
            c[i * n + j] = s as f32;
        }
    }
    c
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// Row i of an A panel, [kp][MR] pairs in `dst`, 16 values at a time; how many it packed.
    ///
    /// # Safety
    /// AVX-512 F and BF16; `dst` holds the panel (row.len().div_ceil(2) · MR pairs).
    #[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
    pub unsafe fn pack_row(row: &[f32], i: usize, dst: &mut [u32]) -> usize {
        let mut pairs = [0u32; 8];
        let mut c = 0;
        while c + 16 <= row.len() {
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(row.as_ptr().add(c))));
            _mm256_storeu_si256(pairs.as_mut_ptr() as *mut __m256i, h);
            for (q, &pr) in pairs.iter().enumerate() {
                dst[(c / 2 + q) * MR + i] = pr;
            }
            c += 16;
        }
        c
    }

    /// C[rows, cols] (+)= the tile of kc pairs: A panel [kc][MR], B panel [kc][NR]; `add`: onto
    /// what C holds (a later block of k), else over it.
    ///
    /// # Safety
    /// AVX-512 F and BF16; c has `rows` rows of `cols` writable values, ldc apart.
    #[target_feature(enable = "avx512f,avx512bf16,avx512vl")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile(kc: usize, a: &[u32], b: &[u32], c: *mut f32, ldc: usize, rows: usize, cols: usize, add: bool) {
        debug_assert!(a.len() >= kc * MR && b.len() >= kc * NR);
        let (a, b) = (a.as_ptr(), b.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kc {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR) as *const _));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(p * NR + 16) as *const _));
            for (i, acc) in acc.iter_mut().enumerate() {
                let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(p * MR + i) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], ai, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], ai, b1);
            }
        }
        for (i, acc) in acc.iter().enumerate().take(rows) {
            for (h, v) in acc.iter().enumerate() {
                let here = cols.saturating_sub(16 * h).min(16);
                if here == 0 {
                    continue;
                }
                let mask: __mmask16 = if here == 16 { 0xffff } else { (1u16 << here) - 1 };
                let at = c.add(i * ldc + 16 * h);
                let v = if add { _mm512_add_ps(*v, _mm512_maskz_loadu_ps(mask, at)) } else { *v };
                _mm512_mask_storeu_ps(at, mask, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, Rng, SeedableRng};

    use super::*;

    /// Odd shapes (k odd, m and n off the panels, k over a block), B as stored and transposed
    /// through strides: the kernel's f32 sums of bf16 pairs against the f64 reference.
    #[test]
    fn the_kernel_matches_the_reference_on_odd_shapes_and_strides() {
        let mut rng = StdRng::seed_from_u64(1);
        for (m, n, k) in [(1, 1, 1), (13, 33, 7), (25, 70, 600), (12, 32, 2), (40, 129, 1031)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0))).collect();
            // B = W [n, k] as stored; and B' = W'ᵀ with W' [k, n] holding the same values.
            let wt: Vec<bf16> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            let stored = Strided { data: &w, rows: n, cols: k, row_stride: k, col_stride: 1 };
            let transposed = Strided { data: &wt, rows: n, cols: k, row_stride: 1, col_stride: n };
            let want = reference(&a, m, stored);
            for b in [stored, transposed] {
                if !available() {
                    // Without the instructions (or under CANDLE_PEFT_SIMD), a clear error: the
                    // callers take their f32 product then.
                    assert!(gemm(&a, m, b).unwrap_err().to_string().contains("AVX-512 BF16"));
                    continue;
                }
                let got = gemm(&a, m, b).unwrap();
                let err = want.iter().zip(&got).fold(0f32, |e, (x, y)| e.max((x - y).abs()));
                // f32 sums of k exact products: a few ulps of the sum of |terms| (at most k).
                assert!(err < 1e-5 * k as f32, "{m}x{n}x{k}: {err}");
            }
        }
    }

    /// The tensor entries against candle's f32 products of the same bf16-rounded values.
    #[test]
    fn tensor_products_match_candles() {
        use candle_core::{DType, Device, Tensor};
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (37, 70), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (45, 70), &dev).unwrap().to_dtype(DType::BF16).unwrap();
        let dy = Tensor::randn(0f32, 1.0, (37, 45), &dev).unwrap();
        assert_eq!(applies(&x, &w), available());
        if !applies(&x, &w) {
            assert!(x_wt(&x, &w).is_err(), "no kernel: an error, the callers take their f32 product");
            return;
        }
        let (xr, w32) = (x.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap(), w.to_dtype(DType::F32).unwrap());
        let max_diff = |a: Tensor, b: Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(max_diff(x_wt(&x, &w).unwrap(), xr.matmul(&w32.t().unwrap()).unwrap()) < 1e-4);
        let dyr = dy.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        assert!(max_diff(dy_w(&dy, &w).unwrap(), dyr.matmul(&w32).unwrap()) < 1e-4);
        assert!(x_wt(&dy, &w).is_err(), "x of 45 columns against W of 70");
    }

    #[test]
    fn bad_shapes_are_errors() {
        let w = vec![bf16::ZERO; 6];
        let b = Strided { data: &w, rows: 2, cols: 3, row_stride: 3, col_stride: 1 };
        assert!(gemm(&[0.0; 5], 2, b).unwrap_err().to_string().contains("not [2, 3]"));
        let short = Strided { data: &w, rows: 3, cols: 3, row_stride: 3, col_stride: 1 };
        assert!(gemm(&[0.0; 6], 2, short).unwrap_err().to_string().contains("needs 9 values"));
    }
}

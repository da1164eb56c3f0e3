//! GGUF's K-quants (Q4_K, Q5_K, Q6_K: the types of llama.cpp's popular Q4_K_M / Q5_K_M files)
//! kept packed, with their dot products against x's 8-bit blocks.
//!
//! A super-block holds 256 consecutive weights of a row, in sub-blocks with their own integer
//! scales under an f16 scale of the whole (llama.cpp's k-quants, `ggml-common.h`):
//!
//! | type | bytes | super-block | weight i |
//! |---|---|---|---|
//! | Q4_K | 144 | `d, dmin: f16, scales: [u8; 12], qs: [u8; 128]` | `d · sc_j · q_i − dmin · m_j`, j = i / 32, q 4 bits |
//! | Q5_K | 176 | `d, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]` | the same, q 5 bits |
//! | Q6_K | 210 | `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16` | `d · sc_k · (q_i − 32)`, k = i / 16, q 6 bits |
//!
//! - Q4_K / Q5_K: the eight 6-bit pairs `(sc_j, m_j)` are packed in `scales` (`scale_min`). The
//!   low 4 bits of weight `64g + l` (g < 4, l < 32) are the low nibble of `qs[32g + l]`, those of
//!   weight `64g + 32 + l` its high nibble; Q5_K's fifth bit of weight `32j + l` is bit j of `qh[l]`.
//! - Q6_K: weight `128h + 32g + l` (h < 2, g < 4, l < 32) has its low 4 bits in the low (g < 2) or
//!   high (g ≥ 2) nibble of `ql[64h + 32(g mod 2) + l]`, its high 2 bits in bits 2g, 2g + 1 of
//!   `qh[32h + l]`.
//!
//! The product quantizes each row of x as llama.cpp's Q8_K does: 8 bits with one scale per
//! super-block (`x_i ≈ d_x p_i`), and `s_x = d_x Σ p_i` per 32. A super-block's sum is then one
//! integer sum scaled once, `d d_x Σ_k sc_k Σ_{i ∈ k} (q_i − bias) p_i`, plus for Q4_K / Q5_K the
//! mins, `−dmin Σ_j m_j s_x,j`: Q4_K / Q5_K have a scale per 32 weights and bias 0, Q6_K a
//! scale per 16 and bias 32. `dot_row_scalar` is that sum as written, the reference of the SIMD
//! code below, which folds each scale into the `vpmaddwd` that widens the products.

use super::{f16_at, BlockType, Simd, BLOCK};

/// Weights per super-block.
pub const SUPER: usize = 256;

/// Sub-blocks of 32 per super-block.
const SUBS: usize = SUPER / BLOCK;

/// One sub-block of 32 weights: `weight_i = d · scales[i / 16] · (code_i − bias) + min`.
pub(super) struct SubBlock {
    pub d: f32,
    pub scales: [i32; 2],
    pub bias: i32,
    pub min: f32,
}

/// Q4_K / Q5_K's scale and min of sub-block j (ggml's `get_scale_min_k4`).
#[inline(always)]
fn scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// Sub-block j of a super-block: its 32 unsigned codes into `q`, and its scales.
pub(super) fn sub_block(kind: BlockType, sb: &[u8], j: usize, q: &mut [u8; BLOCK]) -> SubBlock {
    match kind {
        BlockType::Q4_K | BlockType::Q5_K => {
            let (sc, m) = scale_min(&sb[4..16], j);
            let qs = if kind == BlockType::Q4_K { &sb[16..144] } else { &sb[48..176] };
            for (l, c) in q.iter_mut().enumerate() {
                let byte = qs[32 * (j / 2) + l];
                *c = if j.is_multiple_of(2) { byte & 0x0f } else { byte >> 4 };
                if kind == BlockType::Q5_K {
                    *c |= ((sb[16 + l] >> j) & 1) << 4;
                }
            }
            SubBlock { d: f16_at(sb, 0), scales: [sc as i32; 2], bias: 0, min: -(f16_at(sb, 2) * m as f32) }
        }
        BlockType::Q6_K => {
            let (h, g) = (j / 4, j % 4);
            for (l, c) in q.iter_mut().enumerate() {
                let low = sb[64 * h + 32 * (g % 2) + l];
                let nibble = if g < 2 { low & 0x0f } else { low >> 4 };
                *c = nibble | ((sb[128 + 32 * h + l] >> (2 * g)) & 3) << 4;
            }
            SubBlock { d: f16_at(sb, 208), scales: [sb[192 + 2 * j] as i8 as i32, sb[193 + 2 * j] as i8 as i32], bias: 32, min: 0.0 }
        }
        _ => unreachable!("{kind:?} is not a K-quant"),
    }
}

/// A row of K-quant super-blocks as f32 (ggml's `dequantize_row_q*_K`, the same rounding).
pub(super) fn dequantize_row(kind: BlockType, row: &[u8], out: &mut [f32]) {
    let mut q = [0u8; BLOCK];
    for (sb, out) in row.chunks_exact(kind.block_bytes()).zip(out.chunks_exact_mut(SUPER)) {
        for (j, out) in out.chunks_exact_mut(BLOCK).enumerate() {
            let s = sub_block(kind, sb, j, &mut q);
            for (i, (o, &c)) in out.iter_mut().zip(&q).enumerate() {
                *o = s.d * s.scales[i / 16] as f32 * (c as i32 - s.bias) as f32 + s.min;
            }
        }
    }
}

/// One row of x for a K-quant product: `x_i ≈ d[i / 256] · p_i`, and `s = d · Σ p` per 32.
pub struct SuperRow {
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub p: Vec<i8>,
}

/// A row of x (its length a multiple of 256) as 8-bit super-blocks: `d = max|x| / 127`, round to
/// nearest even.
pub fn quantize_row(x: &[f32]) -> SuperRow {
    let mut row = SuperRow { d: Vec::with_capacity(x.len() / SUPER), s: Vec::with_capacity(x.len() / BLOCK), p: vec![0; x.len()] };
    for (xs, ps) in x.chunks_exact(SUPER).zip(row.p.chunks_exact_mut(SUPER)) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        for (xs, ps) in xs.chunks_exact(BLOCK).zip(ps.chunks_exact_mut(BLOCK)) {
            let mut sum = 0i32;
            for (p, &v) in ps.iter_mut().zip(xs) {
                *p = (v * inv).round_ties_even() as i8;
                sum += *p as i32;
            }
            row.s.push(d * sum as f32);
        }
        row.d.push(d);
    }
    row
}

/// The rows of x [t, cols] as [`SuperRow`]s, rows over the threads.
pub fn quantize_rows(x: &[f32], cols: usize) -> Vec<SuperRow> {
    use rayon::prelude::*;
    if x.len() / cols.max(1) < 4 {
        return x.chunks_exact(cols).map(quantize_row).collect();
    }
    x.par_chunks_exact(cols).map(quantize_row).collect()
}

/// The reference: each super-block's integer sum, scaled once, and its mins.
pub fn dot_row_scalar(kind: BlockType, w: &[u8], x: &SuperRow) -> f32 {
    let mut q = [0u8; BLOCK];
    let mut acc = 0f32;
    for (n, sb) in w.chunks_exact(kind.block_bytes()).enumerate() {
        let mut sum = 0i32;
        let mut d = 0f32;
        for j in 0..SUBS {
            let s = sub_block(kind, sb, j, &mut q);
            let b = n * SUBS + j;
            let p = &x.p[b * BLOCK..(b + 1) * BLOCK];
            let half = |h: usize| -> i32 { (16 * h..16 * h + 16).map(|i| (q[i] as i32 - s.bias) * p[i] as i32).sum() };
            sum += s.scales[0] * half(0) + s.scales[1] * half(1);
            acc += s.min * x.s[b];
            d = s.d;
        }
        acc += d * x.d[n] * sum as f32;
    }
    acc
}

/// One weight row against the rows `xs` of x on `simd`, 4 rows of x a pass.
pub(super) fn dot_rows(kind: BlockType, w: &[u8], xs: &[SuperRow], out: &mut [f32], simd: Simd) {
    #[cfg(target_arch = "x86_64")]
    if simd >= Simd::Avx2 {
        for (xs, out) in xs.chunks(4).zip(out.chunks_mut(4)) {
            // SAFETY: the level is one this CPU has (`Simd::detected` / `available`), and each
            // call gets as many rows as outputs.
            unsafe {
                match xs.len() {
                    4 => x86::dot_rows::<4>(kind, w, xs, out),
                    3 => x86::dot_rows::<3>(kind, w, xs, out),
                    2 => x86::dot_rows::<2>(kind, w, xs, out),
                    _ => x86::dot_rows::<1>(kind, w, xs, out),
                }
            }
        }
        return;
    }
    let _ = simd;
    for (x, o) in xs.iter().zip(out) {
        *o = dot_row_scalar(kind, w, x);
    }
}

/// Q4_K / Q5_K's eight scales and eight mins out of their 12 bytes, four at a time (the
/// unpacking of llama.cpp's `ggml_vec_dot_q4_K_q8_K`; `scale_min` one at a time).
#[inline(always)]
fn scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let u = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (u0, u1, u2) = (u(0), u(1), u(2));
    let scales = [u0 & LOW6, (u2 & LOW4) | (((u0 >> 6) & LOW2) << 4)];
    let mins = [u1 & LOW6, ((u2 >> 4) & LOW4) | (((u1 >> 6) & LOW2) << 4)];
    let bytes = |w: [u32; 2]| {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&w[0].to_le_bytes());
        b[4..].copy_from_slice(&w[1].to_le_bytes());
        b
    };
    (bytes(scales), bytes(mins))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::x86::{half, hsum};
    use super::{scales_mins, BlockType, SuperRow, BLOCK, SUBS, SUPER};

    /// One weight row against N rows of x, a super-block at a time: each sub-block's codes
    /// unpacked once, then for every x row `vpmaddubsw` (pairs of code · p, inside an i16) and
    /// `vpmaddwd` against the sub-block's scale (per 16 weights for Q6_K, whose signed codes
    /// take the sign trick), summed in i32 over the super-block (at most 8 · 2 · 8128 · 128, far
    /// from overflow) and scaled once. VNNI's `vpdpbusd` would need a multiply for the scales
    /// afterwards, so every level above AVX2 runs this.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `out.len() == xs.len() == N`; `w` is whole super-blocks
    /// and each x row has as many values as they have weights.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows<const N: usize>(kind: BlockType, w: &[u8], xs: &[SuperRow], out: &mut [f32]) {
        let low4 = _mm256_set1_epi8(0x0f);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut mins_acc = [_mm256_setzero_ps(); N];
        for (n, sb) in w.chunks_exact(kind.block_bytes()).enumerate() {
            let base = n * SUPER;
            let mut sums = [_mm256_setzero_si256(); N];
            let mut add = |u: __m256i, signs: Option<__m256i>, scales: __m256i, at: usize| {
                for (r, sum) in sums.iter_mut().enumerate() {
                    let mut p = _mm256_loadu_si256(xs.get_unchecked(r).p.as_ptr().add(base + at) as *const __m256i);
                    if let Some(s) = signs {
                        p = _mm256_sign_epi8(p, s);
                    }
                    *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(_mm256_maddubs_epi16(u, p), scales));
                }
            };
            let d = match kind {
                BlockType::Q4_K | BlockType::Q5_K => {
                    let (scales, mins) = scales_mins(&sb[4..16]);
                    let qs = sb.as_ptr().add(if kind == BlockType::Q4_K { 16 } else { 48 });
                    let qh = _mm256_loadu_si256(sb.as_ptr().add(16) as *const __m256i);
                    let fifth = |j: usize| {
                        let bit = _mm256_set1_epi8(1 << j);
                        _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit), _mm256_set1_epi8(0x10))
                    };
                    for g in 0..SUBS / 2 {
                        let v = _mm256_loadu_si256(qs.add(32 * g) as *const __m256i);
                        let (mut lo, mut hi) = (_mm256_and_si256(v, low4), _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
                        if kind == BlockType::Q5_K {
                            lo = _mm256_or_si256(lo, fifth(2 * g));
                            hi = _mm256_or_si256(hi, fifth(2 * g + 1));
                        }
                        add(lo, None, _mm256_set1_epi16(scales[2 * g] as i16), 64 * g);
                        add(hi, None, _mm256_set1_epi16(scales[2 * g + 1] as i16), 64 * g + BLOCK);
                    }
                    // −dmin · m_j against s_x of each sub-block.
                    let m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(mins.as_ptr() as *const __m128i)));
                    let m = _mm256_mul_ps(m, _mm256_set1_ps(-half(sb, 2)));
                    for (r, acc) in mins_acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(m, _mm256_loadu_ps(xs.get_unchecked(r).s.as_ptr().add(n * SUBS)), *acc);
                    }
                    half(sb, 0)
                }
                BlockType::Q6_K => {
                    for j in 0..SUBS {
                        let (h, g) = (j / 4, j % 4);
                        let low = _mm256_loadu_si256(sb.as_ptr().add(64 * h + 32 * (g % 2)) as *const __m256i);
                        let low = if g < 2 { _mm256_and_si256(low, low4) } else { _mm256_and_si256(_mm256_srli_epi16(low, 4), low4) };
                        let qh = _mm256_loadu_si256(sb.as_ptr().add(128 + 32 * h) as *const __m256i);
                        let high = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * g as i32)), _mm256_set1_epi8(3));
                        let signed = _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)), _mm256_set1_epi8(32));
                        let (lo, hi) = (*sb.get_unchecked(192 + 2 * j) as i8, *sb.get_unchecked(193 + 2 * j) as i8);
                        let scales = _mm256_set_m128i(_mm_set1_epi16(hi as i16), _mm_set1_epi16(lo as i16));
                        add(_mm256_sign_epi8(signed, signed), Some(signed), scales, BLOCK * j);
                    }
                    half(sb, 208)
                }
                _ => unreachable!("{kind:?} is not a K-quant"),
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let scale = _mm256_set1_ps(d * *xs.get_unchecked(r).d.get_unchecked(n));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r]), scale, *acc);
            }
        }
        for r in 0..N {
            *out.get_unchecked_mut(r) = hsum(_mm256_add_ps(acc[r], mins_acc[r]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_and_mins_unpack_alike_one_and_four_at_a_time() {
        for seed in 0..64u32 {
            let bytes: Vec<u8> = (0..12).map(|i| (seed.wrapping_mul(2654435761).rotate_left(i * 5) >> 8) as u8).collect();
            let (scales, mins) = scales_mins(&bytes);
            for j in 0..SUBS {
                assert_eq!(scale_min(&bytes, j), (scales[j], mins[j]), "bytes {bytes:?}, sub-block {j}");
            }
        }
    }
}

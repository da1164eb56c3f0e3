//! Q4_0, Q4_1 and Q8_0 matrices with 8 rows interleaved, and their product on AVX2 / VNNI: the
//! layout of llama.cpp's repacked `block_q4_0x8`, arrived at for the same reason.
//!
//! Row-major blocks make a block's dot product a horizontal sum: the integer sum of 32 products
//! lands in 8 lanes that must be scaled by `d_w · d_x` (a conversion and two multiplies) for
//! every block of every row, about as many instructions as the 32 multiply-adds themselves. With
//! 8 rows interleaved, one register holds 4 consecutive codes of each of 8 rows, and `vpdpbusd`
//! against 4 bytes of x broadcast to every lane adds 32 products into 8 per-row sums at once; the
//! scaling then costs one conversion and two multiply-adds per block for 8 rows. With AVX-512
//! two consecutive groups share each 512-bit register (16 rows), so one broadcast of x serves
//! 16 rows.
//!
//! Layout: the rows in groups of 8 (the last group padded with zero blocks), each group block
//! after block; a group's block holds the 8 rows' scales, then their codes:
//!
//! | type | bytes | group block |
//! |---|---|---|
//! | Q4_0 | 144 | `d: [f16; 8]`, `q: [u8; 128]` |
//! | Q4_1 | 160 | `d: [f16; 8]`, `m: [f16; 8]`, `q: [u8; 128]` |
//! | Q5_0 | 176 | `d: [f16; 8]`, `h: [u32; 8]`, `q: [u8; 128]` |
//! | Q5_1 | 192 | `d: [f16; 8]`, `m: [f16; 8]`, `h: [u32; 8]`, `q: [u8; 128]` |
//! | Q8_0 | 272 | `d: [f16; 8]`, `q: [i8; 256]` |
//!
//! For Q4 and Q5, `q[32g + 4k + i] = qs_k[4g + i]` (g < 4, row k, i < 4): the low nibbles of
//! chunk g are codes 4g..4g+3 of each row, its high nibbles codes 16+4g..16+4g+3. For Q8_0,
//! `q[32g + 4k + i] = qs_k[4g + i]` (g < 8). In both, code register n (n < 8) holds codes
//! 4n..4n+3 of every row, against x's bytes 4n..4n+3. Q5's fifth bits are regrouped the same way:
//! bit 4k + i of `h[n]` is bit 4n + i of row k's `qh`, so that `h[n]` is the byte mask of code
//! register n (one masked add with AVX-512 BW). The same bytes as the row-major blocks.
//!
//! The sum per block: `d_w d_x Σ u_i p_i + c · s_x`, with u the unsigned codes and c the
//! offset per unit of `s_x = d_x Σ p_i`: Q4_0 `c = −8 d_w`, Q5_0 `c = −16 d_w`, Q4_1 and Q5_1
//! `c = m`; Q8_0's signed codes
//! enter VNNI as `w + 128` (so `c = −128 d_w`) and AVX2 by the sign trick (`|w|` against
//! `sign(w) · p`, c = 0), which keeps `vpmaddubsw`'s pairs inside an i16.

use super::{BlockType, QMatrix, QuantizedRow, BLOCK};

/// Rows per group.
pub const GROUP: usize = 8;

/// How far ahead each product prefetches the blocks it reads (`simd::prefetch`; for the first
/// chunk of x's rows only, which brings the group in: the later chunks find it in L2), in each of
/// a pair's two streams. The hardware's prefetchers stop at 4 KiB pages, and a group's
/// blocks for a row of 576 columns are 2.9 KiB: without this the products waited on memory
/// about as long as they computed at 8 rows of x. Measured on a 2-core Xeon: with 150 MB
/// of 1536 x 576 Q4_1 matrices in turn, one at 8 rows of x took 66 us with no prefetch,
/// 53-71 us with 320 B to 1.3 KiB ahead (a fixed distance from each stream), 36-38 us with
/// 4-8 KiB. Prefetching in the order the loop reads, into the next pair, and 3 KiB ahead:
/// decoding LLaMA-7B's shape (Q4_0, rows of 18 KiB) reads 94% of the measured bandwidth
/// (78% at a fixed 6 KiB), SmolLM2 at batch 1 and 8 a little faster than at 6 KiB.
const PREFETCH: usize = 3 << 10;

/// Whether a type has the interleaved layout.
pub fn supported(kind: BlockType) -> bool {
    matches!(kind, BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q5_0 | BlockType::Q5_1 | BlockType::Q8_0)
}

/// Bytes of a row-major block before its codes: d, then m (Q4_1, Q5_1), then qh (Q5).
fn scale_bytes(kind: BlockType) -> usize {
    match kind {
        BlockType::Q4_1 => 4,
        BlockType::Q5_0 => 6,
        BlockType::Q5_1 => 8,
        _ => 2,
    }
}

/// Whether a row-major block has m after d.
fn has_min(kind: BlockType) -> bool {
    matches!(kind, BlockType::Q4_1 | BlockType::Q5_1)
}

/// Where a group block's regrouped fifth bits start (Q5), after d (and m).
fn high_bits_at(kind: BlockType) -> usize {
    if has_min(kind) { 32 } else { 16 }
}

/// Row k's `qh` into the group's regrouped fifth bits `h` (module doc), or back out.
fn regroup_high_bits(h: &mut [u8], k: usize, qh: u32) {
    for n in 0..8 {
        let bits = (qh >> (4 * n)) & 0xf;
        let word = u32::from_le_bytes(h[4 * n..4 * n + 4].try_into().expect("4 bytes")) | bits << (4 * k);
        h[4 * n..4 * n + 4].copy_from_slice(&word.to_le_bytes());
    }
}

fn row_high_bits(h: &[u8], k: usize) -> u32 {
    (0..8).map(|n| ((u32::from_le_bytes(h[4 * n..4 * n + 4].try_into().expect("4 bytes")) >> (4 * k)) & 0xf) << (4 * n)).fold(0, |a, b| a | b)
}

fn is_q5(kind: BlockType) -> bool {
    matches!(kind, BlockType::Q5_0 | BlockType::Q5_1)
}

/// Bytes of a group block.
pub fn group_block_bytes(kind: BlockType) -> usize {
    GROUP * kind.block_bytes()
}

/// The row-major blocks `rows` x `blocks` (ggml's layout) as interleaved groups.
pub fn interleave(kind: BlockType, rows: usize, blocks: usize, data: &[u8]) -> Vec<u8> {
    let (bb, sb) = (kind.block_bytes(), scale_bytes(kind));
    let groups = rows.div_ceil(GROUP);
    let mut out = vec![0u8; groups * blocks * group_block_bytes(kind)];
    for (g, group) in out.chunks_exact_mut(blocks * group_block_bytes(kind)).enumerate() {
        for (b, dst) in group.chunks_exact_mut(group_block_bytes(kind)).enumerate() {
            for k in 0..GROUP.min(rows - g * GROUP) {
                let src = &data[((g * GROUP + k) * blocks + b) * bb..][..bb];
                // The scales: d (then m) of row k, and its fifth bits.
                dst[2 * k..2 * k + 2].copy_from_slice(&src[0..2]);
                if has_min(kind) {
                    dst[16 + 2 * k..16 + 2 * k + 2].copy_from_slice(&src[2..4]);
                }
                if is_q5(kind) {
                    let qh = u32::from_le_bytes(src[sb - 4..sb].try_into().expect("4 bytes"));
                    regroup_high_bits(&mut dst[high_bits_at(kind)..], k, qh);
                }
                let (codes, q) = (&mut dst[GROUP * sb..], &src[scale_bytes(kind)..]);
                for chunk in 0..q.len() / 4 {
                    codes[32 * chunk + 4 * k..32 * chunk + 4 * k + 4].copy_from_slice(&q[4 * chunk..4 * chunk + 4]);
                }
            }
        }
    }
    out
}

/// Row `r`'s blocks in ggml's row-major layout, read back out of the interleaved `data`.
pub fn row_blocks(kind: BlockType, blocks: usize, data: &[u8], r: usize) -> Vec<u8> {
    let (bb, sb) = (kind.block_bytes(), scale_bytes(kind));
    let (g, k) = (r / GROUP, r % GROUP);
    let group = &data[g * blocks * group_block_bytes(kind)..];
    let mut out = vec![0u8; blocks * bb];
    for (b, dst) in out.chunks_exact_mut(bb).enumerate() {
        let src = &group[b * group_block_bytes(kind)..][..group_block_bytes(kind)];
        dst[0..2].copy_from_slice(&src[2 * k..2 * k + 2]);
        if has_min(kind) {
            dst[2..4].copy_from_slice(&src[16 + 2 * k..16 + 2 * k + 2]);
        }
        if is_q5(kind) {
            dst[sb - 4..sb].copy_from_slice(&row_high_bits(&src[high_bits_at(kind)..], k).to_le_bytes());
        }
        let codes = &src[GROUP * sb..];
        let q = &mut dst[scale_bytes(kind)..];
        for chunk in 0..q.len() / 4 {
            q[4 * chunk..4 * chunk + 4].copy_from_slice(&codes[32 * chunk + 4 * k..32 * chunk + 4 * k + 4]);
        }
    }
    out
}

/// `y = x Wᵀ` into `y` [t, rows] for the quantized rows `xq` of x, W interleaved; `vnni` picks
/// `vpdpbusd` over AVX2's `vpmaddubsw`, on two groups at once in 512-bit registers (one
/// broadcast of x's bytes serves 16 rows, and a 512-bit `vpdpbusd` does twice the work of a
/// 256-bit one in less than twice the time). Pairs of groups over the threads; every element
/// of y is written.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C, and with `vnni` AVX-512 F, VL, BW and VNNI.
#[cfg(target_arch = "x86_64")]
pub unsafe fn matmul(w: &QMatrix, xq: &[QuantizedRow], y: &mut [std::mem::MaybeUninit<f32>], vnni: bool) {
    matmul_many(&[w], xq, &mut [y], vnni)
}

/// [`matmul`] of several matrices against the same x (q, k and v; gate and up), `ys[i]` [t,
/// rows_i] for `ws[i]`: one parallel loop over all their tasks, so that the threads meet once
/// instead of once a matrix.
///
/// # Safety
/// As [`matmul`]; every matrix interleaved, of x's columns, `ys[i]` of t · rows_i values.
#[cfg(target_arch = "x86_64")]
pub unsafe fn matmul_many(ws: &[&QMatrix], xq: &[QuantizedRow], ys: &mut [&mut [std::mem::MaybeUninit<f32>]], vnni: bool) {
    let t = xq.len();
    // A unit of work: two groups with VNNI (the last may be one), else one.
    let per_unit = if vnni { 2 } else { 1 };
    // Each matrix's units in tasks of `per_task`, its tasks after the previous matrix's.
    let plans: Vec<(usize, usize, usize)> = ws
        .iter()
        .scan(0, |first_task, w| {
            let units = w.rows.div_ceil(GROUP).div_ceil(per_unit);
            let per_task = units.div_ceil(4 * rayon::current_num_threads()).max(1);
            let plan = (*first_task, units, per_task);
            *first_task += units.div_ceil(per_task);
            Some(plan)
        })
        .collect();
    let tasks = plans.last().map_or(0, |&(first, units, per_task)| first + units.div_ceil(per_task));
    // Each task writes its own groups' columns.
    let outs: Vec<crate::threads::DisjointOut> = ys.iter_mut().map(|y| crate::threads::DisjointOut(y.as_mut_ptr().cast::<f32>())).collect();
    let run_task = |task: usize| {
        let m = plans.partition_point(|&(first, _, _)| first <= task) - 1;
        let ((first, units, per_task), w, out) = (plans[m], ws[m], &outs[m]);
        let (rows, blocks) = (w.rows, w.cols / BLOCK);
        let groups = rows.div_ceil(GROUP);
        let group_bytes = blocks * group_block_bytes(w.kind);
        let task = task - first;
        // Each kernel call writes the rows and lanes that are copied out of it.
        let mut sums = [[0f32; 2 * GROUP]; 8];
        for unit in task * per_task..((task + 1) * per_task).min(units) {
            let g = unit * per_unit;
            let n_groups = per_unit.min(groups - g);
            let data = &w.data[g * group_bytes..(g + n_groups) * group_bytes];
            let lanes = (n_groups * GROUP).min(rows - g * GROUP);
            // x rows in chunks: 8 with VNNI (AVX-512 has registers for their sums), 4 on AVX2.
            let most = if vnni { 8 } else { 4 };
            let mut j = 0;
            while j < t {
                let n = (t - j).min(most);
                let xs = &xq[j..j + n];
                match (vnni, n_groups, n) {
                    (true, 2, 8) => x86::pair_vnni::<8>(w.kind, data, xs, &mut sums, j == 0),
                    (true, 2, 7) => x86::pair_vnni::<7>(w.kind, data, xs, &mut sums, j == 0),
                    (true, 2, 6) => x86::pair_vnni::<6>(w.kind, data, xs, &mut sums, j == 0),
                    (true, 2, 5) => x86::pair_vnni::<5>(w.kind, data, xs, &mut sums, j == 0),
                    (true, 2, 4) => x86::pair_vnni::<4>(w.kind, data, xs, &mut sums, j == 0),
                    (true, 2, 3) => x86::pair_vnni::<3>(w.kind, data, xs, &mut sums, j == 0),
                    (true, 2, 2) => x86::pair_vnni::<2>(w.kind, data, xs, &mut sums, j == 0),
                    (true, 2, _) => x86::pair_vnni::<1>(w.kind, data, xs, &mut sums, j == 0),
                    (true, _, 8) => x86::group_vnni::<8>(w.kind, data, xs, &mut sums, j == 0),
                    (true, _, 7) => x86::group_vnni::<7>(w.kind, data, xs, &mut sums, j == 0),
                    (true, _, 6) => x86::group_vnni::<6>(w.kind, data, xs, &mut sums, j == 0),
                    (true, _, 5) => x86::group_vnni::<5>(w.kind, data, xs, &mut sums, j == 0),
                    (true, _, 4) => x86::group_vnni::<4>(w.kind, data, xs, &mut sums, j == 0),
                    (true, _, 3) => x86::group_vnni::<3>(w.kind, data, xs, &mut sums, j == 0),
                    (true, _, 2) => x86::group_vnni::<2>(w.kind, data, xs, &mut sums, j == 0),
                    (true, _, _) => x86::group_vnni::<1>(w.kind, data, xs, &mut sums, j == 0),
                    (false, _, 4) => x86::group_avx2::<4>(w.kind, data, xs, &mut sums, j == 0),
                    (false, _, 3) => x86::group_avx2::<3>(w.kind, data, xs, &mut sums, j == 0),
                    (false, _, 2) => x86::group_avx2::<2>(w.kind, data, xs, &mut sums, j == 0),
                    (false, _, _) => x86::group_avx2::<1>(w.kind, data, xs, &mut sums, j == 0),
                }
                for (i, s) in sums.iter().take(n).enumerate() {
                    // SAFETY: row j + i, columns g·8 .. g·8 + lanes: this task's groups only.
                    std::ptr::copy_nonoverlapping(s.as_ptr(), out.0.add((j + i) * rows + g * GROUP), lanes);
                }
                j += n;
            }
        }
    };
    crate::threads::for_each_product_task(t, tasks, run_task);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BlockType, QuantizedRow, GROUP, PREFETCH};

    /// # Safety
    /// AVX2, FMA, F16C, AVX-512 F/VL/BW/VNNI; `xs.len() == N`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub unsafe fn group_vnni<const N: usize>(kind: BlockType, group: &[u8], xs: &[QuantizedRow], out: &mut [[f32; 2 * GROUP]; 8], fetch: bool) {
        group_dot::<true, N>(kind, group, xs, out, fetch)
    }

    /// # Safety
    /// AVX2, FMA, F16C; `xs.len() == N`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_avx2<const N: usize>(kind: BlockType, group: &[u8], xs: &[QuantizedRow], out: &mut [[f32; 2 * GROUP]; 8], fetch: bool) {
        group_dot::<false, N>(kind, group, xs, out, fetch)
    }

    /// Two consecutive groups (16 rows) against N rows of x: `group_dot` in 512-bit registers,
    /// the low half of each holding the first group's lanes, the high half the second's.
    ///
    /// # Safety
    /// AVX2, FMA, F16C, AVX-512 F/VL/BW/VNNI; `xs.len() == N`; `groups` is two groups.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub unsafe fn pair_vnni<const N: usize>(kind: BlockType, groups: &[u8], xs: &[QuantizedRow], out: &mut [[f32; 2 * GROUP]; 8], fetch: bool) {
        let gb = super::group_block_bytes(kind);
        let blocks = groups.len() / (2 * gb);
        let (first, second) = (groups.as_ptr(), groups.as_ptr().add(blocks * gb));
        // The same 16 bytes, 32 bytes or 4 bytes of both groups' blocks, side by side.
        let halves16 = |a: *const u8, b: *const u8| _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(_mm_loadu_si128(a as *const __m128i)), _mm_loadu_si128(b as *const __m128i));
        let halves32 = |a: *const u8, b: *const u8| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm256_loadu_si256(a as *const __m256i)), _mm256_loadu_si256(b as *const __m256i));
        let mut acc = [_mm512_setzero_ps(); N];
        let low = _mm512_set1_epi8(0x0f);
        // The block this loop reads PREFETCH bytes later (in each group): `ahead_pair` pairs on
        // (the pairs lie one after another), block `ahead_block` there; counted, not divided.
        let ahead = PREFETCH.div_ceil(gb);
        let (mut ahead_pair, mut ahead_block) = (ahead / blocks, ahead % blocks);
        for b in 0..blocks {
            let (ba, bb) = (first.add(b * gb), second.add(b * gb));
            if fetch {
                let next = first.wrapping_add(ahead_pair * 2 * blocks * gb + ahead_block * gb);
                crate::simd::prefetch(next, gb);
                crate::simd::prefetch(next.wrapping_add(blocks * gb), gb);
                ahead_block += 1;
                if ahead_block == blocks {
                    (ahead_pair, ahead_block) = (ahead_pair + 1, 0);
                }
            }
            let d = _mm512_cvtph_ps(halves16(ba, bb));
            let mut u = [_mm512_setzero_si512(); 8];
            let c = match kind {
                BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q5_0 | BlockType::Q5_1 => {
                    let at = GROUP * super::scale_bytes(kind);
                    for g in 0..4 {
                        let v = halves32(ba.add(at + 32 * g), bb.add(at + 32 * g));
                        u[g] = _mm512_and_si512(v, low);
                        u[g + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                    }
                    if super::is_q5(kind) {
                        let (ha, hb) = (ba.add(super::high_bits_at(kind)) as *const u32, bb.add(super::high_bits_at(kind)) as *const u32);
                        for n in 0..8 {
                            let mask = std::ptr::read_unaligned(ha.add(n)) as u64 | (std::ptr::read_unaligned(hb.add(n)) as u64) << 32;
                            u[n] = _mm512_mask_add_epi8(u[n], mask, u[n], _mm512_set1_epi8(0x10));
                        }
                    }
                    match kind {
                        BlockType::Q4_1 | BlockType::Q5_1 => _mm512_cvtph_ps(halves16(ba.add(16), bb.add(16))),
                        BlockType::Q5_0 => _mm512_mul_ps(d, _mm512_set1_ps(-16.0)),
                        _ => _mm512_mul_ps(d, _mm512_set1_ps(-8.0)),
                    }
                }
                _ => {
                    for g in 0..8 {
                        let v = halves32(ba.add(16 + 32 * g), bb.add(16 + 32 * g));
                        u[g] = _mm512_xor_si512(v, _mm512_set1_epi8(-128));
                    }
                    _mm512_mul_ps(d, _mm512_set1_ps(-128.0))
                }
            };
            let bytes = |j: usize, n: usize| {
                let p = xs.get_unchecked(j).p.as_ptr().add(b * 32 + 4 * n);
                _mm512_set1_epi32(std::ptr::read_unaligned(p as *const i32))
            };
            let mut sums = [_mm512_setzero_si512(); N];
            for n in 0..8 {
                for j in 0..N {
                    sums[j] = _mm512_dpbusd_epi32(sums[j], u[n], bytes(j, n));
                }
            }
            for j in 0..N {
                let x = xs.get_unchecked(j);
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(*x.d.get_unchecked(b)));
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[j]), scale, acc[j]);
                acc[j] = _mm512_fmadd_ps(c, _mm512_set1_ps(*x.s.get_unchecked(b)), acc[j]);
            }
        }
        for j in 0..N {
            _mm512_storeu_ps(out[j].as_mut_ptr(), acc[j]);
        }
    }

    /// One group of 8 rows against N rows of x (see the module doc). The loops index several
    /// arrays by one register number or row, as the module doc's formulas do.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn group_dot<const VNNI: bool, const N: usize>(kind: BlockType, group: &[u8], xs: &[QuantizedRow], out: &mut [[f32; 2 * GROUP]; 8], fetch: bool) {
        let gb = super::group_block_bytes(kind);
        let blocks = group.len() / gb;
        let mut acc = [_mm256_setzero_ps(); N];
        let low = _mm256_set1_epi8(0x0f);
        for b in 0..blocks {
            let blk = group.as_ptr().add(b * gb);
            if fetch {
                crate::simd::prefetch(blk.wrapping_add(PREFETCH), gb);
            }
            let d = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let mut u = [_mm256_setzero_si256(); 8];
            let mut signs = [_mm256_setzero_si256(); 8];
            let c = match kind {
                BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q5_0 | BlockType::Q5_1 => {
                    let codes = blk.add(GROUP * super::scale_bytes(kind));
                    for g in 0..4 {
                        let v = _mm256_loadu_si256(codes.add(32 * g) as *const __m256i);
                        u[g] = _mm256_and_si256(v, low);
                        u[g + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    }
                    if super::is_q5(kind) {
                        let h = blk.add(super::high_bits_at(kind)) as *const u32;
                        for n in 0..8 {
                            let mask = std::ptr::read_unaligned(h.add(n));
                            u[n] = if VNNI {
                                // A nibble plus 16 is the nibble with its fifth bit.
                                _mm256_mask_add_epi8(u[n], mask, u[n], _mm256_set1_epi8(0x10))
                            } else {
                                _mm256_or_si256(u[n], super::super::x86::high_bits(mask))
                            };
                        }
                    }
                    match kind {
                        BlockType::Q4_1 | BlockType::Q5_1 => _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i)),
                        BlockType::Q5_0 => _mm256_mul_ps(d, _mm256_set1_ps(-16.0)),
                        _ => _mm256_mul_ps(d, _mm256_set1_ps(-8.0)),
                    }
                }
                _ => {
                    let codes = blk.add(16);
                    for g in 0..8 {
                        let v = _mm256_loadu_si256(codes.add(32 * g) as *const __m256i);
                        if VNNI {
                            u[g] = _mm256_xor_si256(v, _mm256_set1_epi8(-128));
                        } else {
                            u[g] = _mm256_sign_epi8(v, v);
                            signs[g] = v;
                        }
                    }
                    if VNNI {
                        _mm256_mul_ps(d, _mm256_set1_ps(-128.0))
                    } else {
                        _mm256_setzero_ps()
                    }
                }
            };
            // Code register n against bytes 4n..4n+3 of every x row: the rows' sums are
            // independent chains, interleaved here rather than left to the out-of-order window.
            let bytes = |j: usize, n: usize| {
                let p = xs.get_unchecked(j).p.as_ptr().add(b * 32 + 4 * n);
                _mm256_set1_epi32(std::ptr::read_unaligned(p as *const i32))
            };
            let mut sums = [_mm256_setzero_si256(); N];
            if VNNI {
                for n in 0..8 {
                    for j in 0..N {
                        sums[j] = _mm256_dpbusd_epi32(sums[j], u[n], bytes(j, n));
                    }
                }
            } else if kind != BlockType::Q4_0 && kind != BlockType::Q4_1 {
                // Pairs of |w|·p reach 2·128·127 (Q8_0), of 5-bit codes 2·31·127, eight of
                // which overflow an i16: each pair sum is widened at once.
                for n in 0..8 {
                    for j in 0..N {
                        let p = if kind == BlockType::Q8_0 { _mm256_sign_epi8(bytes(j, n), signs[n]) } else { bytes(j, n) };
                        let pairs = _mm256_maddubs_epi16(u[n], p);
                        sums[j] = _mm256_add_epi32(sums[j], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
                    }
                }
            } else {
                // 4-bit codes: pairs reach 2·15·127, so all eight sums fit one i16 (30 480).
                for n in 0..8 {
                    for j in 0..N {
                        sums[j] = _mm256_add_epi16(sums[j], _mm256_maddubs_epi16(u[n], bytes(j, n)));
                    }
                }
                for s in &mut sums {
                    *s = _mm256_madd_epi16(*s, _mm256_set1_epi16(1));
                }
            }
            for j in 0..N {
                let x = xs.get_unchecked(j);
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(*x.d.get_unchecked(b)));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[j]), scale, acc[j]);
                acc[j] = _mm256_fmadd_ps(c, _mm256_set1_ps(*x.s.get_unchecked(b)), acc[j]);
            }
        }
        for j in 0..N {
            _mm256_storeu_ps(out[j].as_mut_ptr(), acc[j]);
        }
    }
}

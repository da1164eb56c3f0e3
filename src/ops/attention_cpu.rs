//! Attention for inference on the CPU in f32, one query row at a time:
//!
//! `o[b, i, h] = Σ_j p_j v[b, h/n, j]`, `p = softmax_j(q[b, h, i] · k[b, h/n, j] · scale + bias[b, i, j])`
//!
//! for q [b, H, t, d], k and v [b, G, s, d] with n = H / G (grouped-query attention: query head h
//! reads key/value head h / n in place, where the composed ops copy each key/value head n times),
//! bias [b, 1, t, s]. A row's s scores live in a buffer of their own, never a [t, s] matrix, and
//! the keys whose bias is `ops::attention_bias`'s mask value (−1e30, a weight of exactly 0 after
//! the exp) are not read where 8 in a row are masked: a causal prompt costs about half the
//! products. Eight keys' scores are summed side by side and each head's output stays in
//! registers over the keys, so that neither waits on one chain of multiply-adds. The output is
//! [b, t, H·d], the layout the output projection reads. Any strides (a view into a longer
//! cache) are read as they are.
//!
//! With AVX-512 a task is one (batch row, query position) and the query heads that share one
//! key/value head (up to 4): each key and value is widened to f32 once for all of them, 16
//! values a register, and the keys' sums are reduced 8 at a time by one shuffle tree instead of
//! one horizontal sum each; a single row's heads also spread over the threads.
//!
//! The reference is the composition of candle ops (`ops::nn::attention_reference`); the test
//! below compares the two.

use candle_core::{Layout, Storage, Tensor};

use crate::{Error, Result};

/// Up to this many query positions (decoding, beams, short prompts) the rows are used; a prompt
/// keeps the composed GEMMs, which read each key once for a block of queries where a row reads
/// every key once per query, and are no slower there (docs/BENCHMARKS.md, CPU inference).
pub const QUERIES_MAX: usize = 16;

/// The bias of a masked key (`ops::attention_bias` in f32).
pub const MASKED: f32 = -1e30;

/// A 4-D tensor's values with its strides.
#[derive(Clone, Copy)]
struct View<'a, T> {
    data: &'a [T],
    offset: usize,
    stride: [usize; 4],
}

impl<T> View<'_, T> {
    #[inline(always)]
    fn row(&self, a: usize, b: usize, c: usize, len: usize) -> &[T] {
        let at = self.offset + a * self.stride[0] + b * self.stride[1] + c * self.stride[2];
        &self.data[at..at + len]
    }
}

/// An element type the keys and values may be stored in: f32, or a half type (a KV cache in
/// f16 / bf16), widened to f32 as it is read.
pub trait Element: candle_core::WithDType + Into<f32> {
    /// 8 values widened to f32.
    ///
    /// # Safety
    /// AVX2 and F16C; `p` points at 8 readable values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;

    /// The values of `mask`'s lanes among 16 widened to f32, the others 0 (and not read).
    ///
    /// # Safety
    /// AVX-512 F, BW and VL; the masked lanes at `p` are readable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self, mask: u16) -> std::arch::x86_64::__m512;
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{
    __m128i, __m256, __m512, _mm256_castsi256_ps, _mm256_cvtepu16_epi32, _mm256_cvtph_ps, _mm256_loadu_ps, _mm256_maskz_loadu_epi16, _mm256_slli_epi32, _mm512_castsi512_ps, _mm512_cvtepu16_epi32,
    _mm512_cvtph_ps, _mm512_maskz_loadu_ps, _mm512_slli_epi32, _mm_loadu_si128,
};

impl Element for f32 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_loadu_ps(p)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self, mask: u16) -> __m512 {
        _mm512_maskz_loadu_ps(mask, p)
    }
}

impl Element for half::f16 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self, mask: u16) -> __m512 {
        _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16))
    }
}

impl Element for half::bf16 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        // A bf16 is the top half of an f32.
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i))))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self, mask: u16) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p as *const i16))))
    }
}

fn view<'a, T: Element>(storage: &'a Storage, layout: &Layout, what: &str) -> Result<View<'a, T>> {
    let stride = layout.stride();
    match (storage, stride) {
        (Storage::Cpu(cpu), &[s0, s1, s2, 1]) => match T::cpu_storage_as_slice(cpu) {
            Ok(data) => Ok(View { data, offset: layout.start_offset(), stride: [s0, s1, s2, 1] }),
            Err(e) => Err(Error::msg(format!("CPU attention: {what}: {e}"))),
        },
        _ => Err(Error::msg(format!("CPU attention: {what} must be a 4-D CPU tensor with unit stride in its last dim"))),
    }
}

/// Whether [`attention`] takes these tensors: on the CPU, q [b, H, t, d] and bias [b, 1, t, s]
/// in a float dtype, k and v [b, G, s, d] both in f32, f16 or bf16, G dividing H, each with unit
/// stride in its last dim. Anything else goes the composed way.
pub fn takes(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> bool {
    use candle_core::DType::{BF16, F16, F32};
    let plain = [q, k, v, bias].iter().all(|t| t.device().is_cpu() && t.rank() == 4 && t.layout().stride().last() == Some(&1));
    let dtypes = matches!(k.dtype(), F32 | F16 | BF16) && v.dtype() == k.dtype() && [q, bias].iter().all(|t| t.dtype().is_float());
    plain && dtypes && fits(q, k, v, bias).is_ok()
}

fn fits(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<()> {
    let (b, h, t, d) = q.dims4()?;
    let (_, g, s, _) = k.dims4()?;
    if g == 0 || h % g != 0 || v.dims4()? != (b, g, s, d) || k.dims4()? != (b, g, s, d) || bias.dims4()? != (b, 1, t, s) {
        return Err(Error::msg(format!(
            "CPU attention: q {:?}, k {:?}, v {:?}, bias {:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims(),
            bias.dims()
        )));
    }
    Ok(())
}

/// `softmax(q kᵀ · scale + bias) v` as [b, t, H·d] in q's dtype (see the module doc); q and the
/// bias are read in f32, the keys and values in their own dtype.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    attention_at(q, k, v, bias, scale, Level::cpu())
}

/// [`attention`] on the kernels of `level`.
fn attention_at(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64, level: Level) -> Result<Tensor> {
    use candle_core::DType;
    fits(q, k, v, bias)?;
    let (q32, bias32) = (q.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?);
    let out = match k.dtype() {
        DType::F16 => attention_typed::<half::f16>(&q32, k, v, &bias32, scale, level)?,
        DType::BF16 => attention_typed::<half::bf16>(&q32, k, v, &bias32, scale, level)?,
        _ => attention_typed::<f32>(&q32, k, v, &bias32, scale, level)?,
    };
    Ok(out.to_dtype(q.dtype())?)
}

/// The kernels a CPU runs, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Portable,
    /// AVX2, FMA and F16C: a task per query row, 8 keys' sums side by side.
    Avx2,
    /// AVX-512 F, BW and VL besides: a task per query row and heads sharing a key/value head.
    Avx512,
}

impl Level {
    /// The best this CPU runs, lowered by `CANDLE_PEFT_SIMD`; read once.
    fn cpu() -> Level {
        static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
        *LEVEL.get_or_init(|| crate::simd::capped(Self::best(), Level::Portable, Level::Avx2))
    }

    /// Every level this CPU runs (for the tests).
    #[cfg(test)]
    fn available() -> Vec<Level> {
        [Level::Portable, Level::Avx2, Level::Avx512].into_iter().filter(|&l| l <= Self::best()).collect()
    }

    fn best() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
            match (avx2, crate::simd::cpu_has_avx512()) {
                (true, true) => return Level::Avx512,
                (true, false) => return Level::Avx2,
                _ => {}
            }
        }
        Level::Portable
    }
}

fn attention_typed<T: Element>(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64, level: Level) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (g, s) = (k.dim(1)?, k.dim(2)?);
    let (n, scale) = (h / g, scale as f32);
    let guards = [q, k, v, bias].map(|t| t.storage_and_layout());
    let qv = view::<f32>(&guards[0].0, guards[0].1, "q")?;
    let bv = view::<f32>(&guards[3].0, guards[3].1, "bias")?;
    let kv = view::<T>(&guards[1].0, guards[1].1, "k")?;
    let vv = view::<T>(&guards[2].0, guards[2].1, "v")?;
    let mut out = vec![0f32; b * t * h * d];
    let shape = Shape { h, t, s, d, n, scale };
    // A task's heads: those sharing a key/value head (AVX-512), else every head of its row.
    let group = if level == Level::Avx512 { head_group(n) } else { h };
    let groups = h / group;
    crate::threads::for_each_chunk_mut(&mut out, group * d, |task, o| {
        let (row, h0) = (task / groups, task % groups * group);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has what `level` names (`Level::cpu`, or the tests' `available`).
        unsafe {
            match (level, group) {
                (Level::Avx512, 4) => return x512::heads::<T, 4, 4>(row, h0, o, shape, (qv, bv), (kv, vv)),
                (Level::Avx512, 3) => return x512::heads::<T, 3, 8>(row, h0, o, shape, (qv, bv), (kv, vv)),
                (Level::Avx512, 2) => return x512::heads::<T, 2, 8>(row, h0, o, shape, (qv, bv), (kv, vv)),
                (Level::Avx512, _) => return x512::heads::<T, 1, 8>(row, h0, o, shape, (qv, bv), (kv, vv)),
                (Level::Avx2, _) => return row_avx2(row, o, shape, (qv, bv), (kv, vv)),
                (Level::Portable, _) => {}
            }
        }
        output_row::<T, false>(row, o, shape, (qv, bv), (kv, vv))
    });
    drop(guards);
    Ok(Tensor::from_vec(out, (b, t, h * d), q.device())?)
}

#[derive(Clone, Copy)]
struct Shape {
    h: usize,
    t: usize,
    s: usize,
    d: usize,
    n: usize,
    scale: f32,
}

type Views<'a, T> = (View<'a, T>, View<'a, T>);

/// Query heads a task takes out of the `n` sharing a key/value head: the largest divisor of n
/// up to 4 (their 8 or 4 keys' sums fill 24 or 16 of AVX-512's 32 registers).
fn head_group(n: usize) -> usize {
    (1..=4).rev().find(|&g| n.is_multiple_of(g)).unwrap_or(1)
}

/// Where a query row's keys start: the first unmasked one (a row's left padding is not visited
/// at all, so that the row gives the same bits alone or in any batch), `None` when every key is
/// masked (a padding query of a left-padded prompt).
fn first_key(bias_row: &[f32]) -> Option<usize> {
    bias_row.iter().position(|&b| b > MASKED)
}

/// [`output_row`] compiled for AVX2, FMA and F16C (a closure does not inherit a function's target
/// features, so this is called from inside the task).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_avx2<T: Element>(row: usize, o: &mut [f32], shape: Shape, qb: Views<f32>, kv: Views<T>) {
    output_row::<T, true>(row, o, shape, qb, kv)
}

/// The H heads' outputs of one (batch row, query position). `SIMD`: the AVX2 kernels of `x86`
/// (only inside `row_avx2`, compiled with their features), else the portable loops.
#[inline(always)]
fn output_row<T: Element, const SIMD: bool>(row: usize, o: &mut [f32], Shape { h, t, s, d, n, scale }: Shape, (qv, bv): Views<f32>, (kv, vv): Views<T>) {
    let (bi, i) = (row / t, row % t);
    let bias_row = bv.row(bi, 0, i, s);
    let Some(first) = first_key(bias_row) else {
        o.fill(0.0);
        return;
    };
    let bias_row = &bias_row[first..];
    let mut p = vec![0f32; s - first];
    for hi in 0..h {
        let (qrow, kh) = (qv.row(bi, hi, i, d), hi / n);
        for (j0, (pj, bias)) in p.chunks_mut(KEYS).zip(bias_row.chunks(KEYS)).enumerate().map(|(c, pb)| (first + c * KEYS, pb)) {
            if bias.iter().all(|&b| b <= MASKED) {
                pj.fill(f32::NEG_INFINITY);
                continue;
            }
            let key = |k: usize| kv.row(bi, kh, j0 + k, d);
            let dots: [f32; KEYS] = if pj.len() == KEYS && SIMD {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: SIMD is only set where the CPU has AVX2, FMA and F16C (`row_avx2`).
                unsafe {
                    x86::dots(qrow, std::array::from_fn(key))
                }
                #[cfg(not(target_arch = "x86_64"))]
                unreachable!("SIMD rows are x86-64 only")
            } else {
                std::array::from_fn(|k| if k < pj.len() { dot(qrow, key(k)) } else { 0.0 })
            };
            for ((pj, &b), dot) in pj.iter_mut().zip(bias).zip(dots) {
                // A masked key's weight is exactly 0 whatever its (possibly never written) values.
                *pj = if b <= MASKED { f32::NEG_INFINITY } else { dot * scale + b };
            }
        }
        let inv = unnormalized_softmax(&mut p);
        let (oh, value) = (&mut o[hi * d..(hi + 1) * d], |j| vv.row(bi, kh, first + j, d));
        #[cfg(target_arch = "x86_64")]
        if SIMD {
            // SAFETY: as above.
            unsafe { x86::weighted_values(&p, inv, value, oh) };
            continue;
        }
        weighted_values(&p, inv, value, oh);
    }
}

/// A row's scores `p` into `exp(p − max p)` in place; returns 1 / their sum, the factor that
/// makes them the softmax (applied once to the weighted values rather than to every weight).
#[inline(always)]
fn unnormalized_softmax(p: &mut [f32]) -> f32 {
    let max = lanes(p, f32::NEG_INFINITY, f32::max);
    for pj in p.iter_mut() {
        *pj -= max;
    }
    super::exp::exp_in_place(p);
    1.0 / lanes(p, 0.0, |a, b| a + b)
}

/// `p`'s values folded by `f` in 8 lanes, then the lanes folded: the max or the sum of a row's
/// scores as vector operations instead of one chain through every key.
#[inline(always)]
fn lanes(p: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = p.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(init, |a, &x| f(a, x));
    for c in chunks {
        for l in 0..8 {
            acc[l] = f(acc[l], c[l]);
        }
    }
    acc.into_iter().fold(tail, f)
}

/// Keys whose scores are summed side by side: one accumulator chain each, so that the
/// multiply-adds of one key do not wait on each other's latency.
const KEYS: usize = 8;

/// `q · k` (the portable path, and the SIMD path's last keys), in 8 lanes and then the lanes;
/// `lora_rows` sums its dot products the same way.
#[inline(always)]
pub(crate) fn dot<T: Element>(q: &[f32], k: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let (qc, kc) = (q.chunks_exact(8), k.chunks_exact(8));
    let tail: f32 = qc.remainder().iter().zip(kc.remainder()).map(|(x, y)| x * Into::<f32>::into(*y)).sum();
    for (x, y) in qc.zip(kc) {
        for l in 0..8 {
            acc[l] += x[l] * Into::<f32>::into(y[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `o = inv · Σ_j p_j v_j` over the keys with p_j ≠ 0 (the portable path).
#[inline(always)]
fn weighted_values<'a, T: Element>(p: &[f32], inv: f32, value: impl Fn(usize) -> &'a [T], o: &mut [f32]) {
    o.fill(0.0);
    for (j, &pj) in p.iter().enumerate() {
        if pj != 0.0 {
            for (o, &v) in o.iter_mut().zip(value(j)) {
                *o += pj * Into::<f32>::into(v);
            }
        }
    }
    for o in o.iter_mut() {
        *o *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{Element, KEYS};

    /// [`super::dot`] for [`KEYS`] keys at once: their sums in 8 registers, reduced together at
    /// the end.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; every key as long as q.
    #[inline(always)]
    pub unsafe fn dots<T: Element>(q: &[f32], keys: [&[T]; KEYS]) -> [f32; KEYS] {
        let d = q.len();
        debug_assert!(keys.iter().all(|k| k.len() >= d));
        let keys = keys.map(|k| k.as_ptr());
        let mut acc = [_mm256_setzero_ps(); KEYS];
        let mut c = 0;
        while c + 8 <= d {
            let x = _mm256_loadu_ps(q.as_ptr().add(c));
            for k in 0..KEYS {
                acc[k] = _mm256_fmadd_ps(x, T::load8(keys[k].add(c)), acc[k]);
            }
            c += 8;
        }
        // Two rounds of pairwise sums leave each 128-bit half holding a partial sum of keys 0-3
        // (of 4-7 in b); the halves then add.
        let h01 = _mm256_hadd_ps(acc[0], acc[1]);
        let h23 = _mm256_hadd_ps(acc[2], acc[3]);
        let h45 = _mm256_hadd_ps(acc[4], acc[5]);
        let h67 = _mm256_hadd_ps(acc[6], acc[7]);
        let (a, b) = (_mm256_hadd_ps(h01, h23), _mm256_hadd_ps(h45, h67));
        let sums = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
        let mut out = [0f32; KEYS];
        _mm256_storeu_ps(out.as_mut_ptr(), sums);
        for (o, key) in out.iter_mut().zip(keys) {
            for (i, x) in q.iter().enumerate().skip(c) {
                *o += x * Into::<f32>::into(*key.add(i));
            }
        }
        out
    }

    /// [`super::weighted_values`], o held in registers 64 values at a time (8 independent
    /// chains) rather than loaded and stored once per key.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; every value row as long as o.
    #[inline(always)]
    pub unsafe fn weighted_values<'a, T: Element>(p: &[f32], inv: f32, value: impl Fn(usize) -> &'a [T], o: &mut [f32]) {
        const SPAN: usize = 64;
        let d = o.len();
        let mut c0 = 0;
        while c0 + SPAN <= d {
            let mut acc = [_mm256_setzero_ps(); SPAN / 8];
            for (j, &pj) in p.iter().enumerate() {
                if pj != 0.0 {
                    let (w, v) = (_mm256_set1_ps(pj), value(j).as_ptr().add(c0));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(w, T::load8(v.add(8 * r)), *acc);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.as_mut_ptr().add(c0 + 8 * r), _mm256_mul_ps(*acc, _mm256_set1_ps(inv)));
            }
            c0 += SPAN;
        }
        if c0 < d {
            super::weighted_values(p, inv, |j| &value(j)[c0..], &mut o[c0..]);
        }
    }
}

/// The AVX-512 rows: a task's query heads against the key/value head they share.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x512 {
    use std::arch::x86_64::*;

    use super::{first_key, Element, Shape, Views, MASKED};

    /// The outputs of query heads h0 .. h0 + HG of one (batch row, query position), which share
    /// key/value head h0 / n, into o [HG · d]: KEYS keys' scores at a time (HG · KEYS
    /// accumulators), the softmax per head, then the values.
    ///
    /// # Safety
    /// AVX2, FMA, F16C and AVX-512 F, BW, VL; o is HG · d long; h0 + HG ≤ h.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn heads<T: Element, const HG: usize, const KEYS: usize>(
        row: usize,
        h0: usize,
        o: &mut [f32],
        Shape { t, s, d, n, scale, .. }: Shape,
        (qv, bv): Views<f32>,
        (kv, vv): Views<T>,
    ) {
        let (bi, i) = (row / t, row % t);
        let bias_row = bv.row(bi, 0, i, s);
        let Some(first) = first_key(bias_row) else {
            o.fill(0.0);
            return;
        };
        let (bias, len, kh) = (&bias_row[first..], s - first, h0 / n);
        let mut q = [std::ptr::null::<f32>(); HG];
        for (hh, q) in q.iter_mut().enumerate() {
            *q = qv.row(bi, h0 + hh, i, d).as_ptr();
        }
        // p[hh · len + j]: head hh's score of key first + j, then its weight.
        let mut p = vec![0f32; HG * len];
        let mut j0 = 0;
        while j0 < len {
            let m = (len - j0).min(KEYS);
            let block = &bias[j0..j0 + m];
            if block.iter().all(|&b| b <= MASKED) {
                for hh in 0..HG {
                    p[hh * len + j0..hh * len + j0 + m].fill(f32::NEG_INFINITY);
                }
                j0 += m;
                continue;
            }
            // A part block's missing keys repeat its last one; their sums are not read.
            let mut keys = [std::ptr::null::<T>(); KEYS];
            for (k, key) in keys.iter_mut().enumerate() {
                *key = kv.row(bi, kh, first + j0 + k.min(m - 1), d).as_ptr();
            }
            let dots = dots::<T, HG, KEYS>(&q, &keys, d);
            for (hh, dots) in dots.iter().enumerate() {
                for (k, &b) in block.iter().enumerate() {
                    // A masked key's weight is exactly 0 whatever its (possibly never written) values.
                    p[hh * len + j0 + k] = if b <= MASKED { f32::NEG_INFINITY } else { dots[k] * scale + b };
                }
            }
            j0 += m;
        }
        let mut inv = [0f32; HG];
        for (p, inv) in p.chunks_exact_mut(len).zip(inv.iter_mut()) {
            *inv = super::unnormalized_softmax(p);
        }
        let values: Vec<*const T> = (0..len).map(|j| if bias[j] <= MASKED { std::ptr::null() } else { vv.row(bi, kh, first + j, d).as_ptr() }).collect();
        weighted_values::<T, HG>(&p, &values, inv, o, d);
    }

    /// The first `left` of 16 lanes (all of them from 16 on).
    #[inline(always)]
    pub(crate) fn lane_mask(left: usize) -> u16 {
        if left >= 16 {
            u16::MAX
        } else {
            (1u16 << left) - 1
        }
    }

    /// `q[hh] · keys[k]` over d values, 16 a register: each key widened once for the HG heads.
    /// Each sum runs over the values in order and then its lanes by one fixed tree, so it does
    /// not depend on HG, KEYS or its companions (`lora_rows` takes its rows of x as the q).
    #[inline(always)]
    pub(crate) unsafe fn dots<T: Element, const HG: usize, const KEYS: usize>(q: &[*const f32; HG], keys: &[*const T; KEYS], d: usize) -> [[f32; KEYS]; HG] {
        let mut acc = [[_mm512_setzero_ps(); KEYS]; HG];
        let mut c = 0;
        while c < d {
            let m = lane_mask(d - c);
            let mut x = [_mm512_setzero_ps(); HG];
            for hh in 0..HG {
                x[hh] = _mm512_maskz_loadu_ps(m, q[hh].add(c));
            }
            for k in 0..KEYS {
                let key = T::load16(keys[k].add(c), m);
                for hh in 0..HG {
                    acc[hh][k] = _mm512_fmadd_ps(x[hh], key, acc[hh][k]);
                }
            }
            c += 16;
        }
        let mut out = [[0f32; KEYS]; HG];
        for hh in 0..HG {
            for (k0, out) in out[hh].chunks_mut(8).enumerate() {
                let mut eight = [_mm512_setzero_ps(); 8];
                for (e, a) in eight.iter_mut().zip(&acc[hh][8 * k0..]) {
                    *e = *a;
                }
                let sums = sums8(eight);
                let mut all = [0f32; 8];
                _mm256_storeu_ps(all.as_mut_ptr(), sums);
                out.copy_from_slice(&all[..out.len()]);
            }
        }
        out
    }

    /// The sums of 8 registers' 16 lanes each, by one tree of shuffles: pairs' lanes interleaved
    /// and added within each 128-bit quarter, then quarters of 4 registers' partial sums, then
    /// the quarters added across.
    #[inline(always)]
    pub(crate) unsafe fn sums8(a: [__m512; 8]) -> __m256 {
        // Per quarter: [a0+a2, b0+b2, a1+a3, b1+b3] of registers a, b.
        let pair = |a: __m512, b: __m512| _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        // Per quarter: the four registers' partial sums side by side.
        let quad = |x: __m512, y: __m512| {
            let (x, y) = (_mm512_castps_pd(x), _mm512_castps_pd(y));
            _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)))
        };
        let low = quad(pair(a[0], a[1]), pair(a[2], a[3]));
        let high = quad(pair(a[4], a[5]), pair(a[6], a[7]));
        // Quarters 0 + 1 and 2 + 3 of each, then those two added.
        let halves = _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(low, high), _mm512_shuffle_f32x4::<0b11_01_11_01>(low, high));
        let whole = _mm512_add_ps(_mm512_shuffle_f32x4::<0b00_00_10_00>(halves, halves), _mm512_shuffle_f32x4::<0b00_00_11_01>(halves, halves));
        _mm512_castps512_ps256(whole)
    }

    /// `o[hh] = inv[hh] · Σ_j p[hh][j] v_j` over the keys with a value (masked keys have none),
    /// 64 of o's values per head in registers at a time, each value widened once for the heads.
    #[inline(always)]
    unsafe fn weighted_values<T: Element, const HG: usize>(p: &[f32], values: &[*const T], inv: [f32; HG], o: &mut [f32], d: usize) {
        const SPAN: usize = 4;
        let len = values.len();
        let mut c0 = 0;
        while c0 < d {
            let mut m = [0u16; SPAN];
            for (r, m) in m.iter_mut().enumerate() {
                *m = lane_mask(d.saturating_sub(c0 + 16 * r));
            }
            let mut acc = [[_mm512_setzero_ps(); SPAN]; HG];
            for (j, &value) in values.iter().enumerate() {
                if value.is_null() {
                    continue;
                }
                let mut v = [_mm512_setzero_ps(); SPAN];
                for r in 0..SPAN {
                    // Lanes past d are neither read nor stored (their mask is 0).
                    v[r] = T::load16(value.wrapping_add(c0 + 16 * r), m[r]);
                }
                for (hh, acc) in acc.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(*p.get_unchecked(hh * len + j));
                    for (acc, v) in acc.iter_mut().zip(v) {
                        *acc = _mm512_fmadd_ps(w, v, *acc);
                    }
                }
            }
            for hh in 0..HG {
                let scale = _mm512_set1_ps(inv[hh]);
                for r in 0..SPAN {
                    _mm512_mask_storeu_ps(o.as_mut_ptr().wrapping_add(hh * d + c0 + 16 * r), m[r], _mm512_mul_ps(acc[hh][r], scale));
                }
            }
            c0 += 16 * SPAN;
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    #[test]
    fn matches_the_composed_attention_on_grouped_heads_padding_and_a_cache_view() {
        // d of 20 and 136 (a part of 16 and of 64 left over); keys a few blocks of 8 and a part,
        // the first block all padding in the second case.
        for (past, d, pad) in [(3, 20, 2), (18, 136, 10)] {
            matches_the_composed_attention(past, d, pad, DType::F32, (6, 2));
        }
    }

    #[test]
    fn keys_and_values_in_half_precision_are_read_as_stored() {
        for dtype in [DType::F16, DType::BF16] {
            matches_the_composed_attention(18, 72, 10, dtype, (6, 2));
        }
    }

    #[test]
    fn every_grouping_of_query_heads_over_key_value_heads() {
        // 1, 2, 4 query heads a key/value head, 8 (two tasks of 4) and 5 (five of 1).
        for heads in [(3, 3), (4, 2), (8, 2), (8, 1), (10, 2)] {
            matches_the_composed_attention(11, 64, 3, DType::BF16, heads);
        }
    }

    /// Keys and values in `kv` (the reference reads the same rounded values in f32), `heads`:
    /// (query heads, key/value heads); at every level this CPU runs.
    fn matches_the_composed_attention(past: usize, d: usize, pad: usize, kv: DType, (h, g): (usize, usize)) {
        let dev = Device::Cpu;
        let (b, t) = (2, 5);
        let s = past + t;
        let q = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap();
        // k and v as views into a longer buffer, as a cache with room to grow holds them.
        let room = Tensor::randn(0f32, 1.0, (b, g, s + 4, d), &dev).unwrap();
        let room = room.to_dtype(kv).unwrap();
        let k = room.narrow(2, 0, s).unwrap();
        let v = (room.narrow(2, 2, s).unwrap() * 0.5).unwrap();
        // Row 1 left-padded.
        let mask = vec![vec![1u32; s], [vec![0u32; pad], vec![1u32; s - pad]].concat()];
        let bias = crate::ops::nn::attention_bias(&mask, t, DType::F32, &dev).unwrap();
        let f32 = |t: &Tensor| t.contiguous().unwrap().to_dtype(DType::F32).unwrap();
        let want = crate::ops::nn::attention_reference(&q, &f32(&k), &f32(&v), &bias).unwrap();
        for level in Level::available() {
            let got = attention_at(&q, &k, &v, &bias, 1.0 / (d as f64).sqrt(), level).unwrap();
            let diff = (got - &want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-5, "{level:?}, {h} heads over {g}, d {d}: {diff}");
        }
    }

    #[test]
    fn left_padding_changes_no_bit_of_a_row() {
        let dev = Device::Cpu;
        let (h, g, d, s) = (4, 2, 72, 21);
        let q = Tensor::randn(0f32, 1.0, (1, h, 1, d), &dev).unwrap();
        let kv = Tensor::randn(0f32, 1.0, (2, 1, g, s, d), &dev).unwrap();
        let (k, v) = (kv.get(0).unwrap(), kv.get(1).unwrap());
        let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for level in Level::available() {
            let alone = attention_at(&q, &k, &v, &crate::ops::nn::attention_bias(&[vec![1u32; s]], 1, DType::F32, &dev).unwrap(), 0.125, level).unwrap();
            // 3 and 11 padding keys of any value before the same keys: the same bits.
            for pad in [3, 11] {
                let junk = Tensor::randn(0f32, 9.0, (1, g, pad, d), &dev).unwrap();
                let (kp, vp) = (Tensor::cat(&[&junk, &k], 2).unwrap(), Tensor::cat(&[&junk, &v], 2).unwrap());
                let mask = [vec![0u32; pad], vec![1u32; s]].concat();
                let bias = crate::ops::nn::attention_bias(&[mask], 1, DType::F32, &dev).unwrap();
                let padded = attention_at(&q, &kp, &vp, &bias, 0.125, level).unwrap();
                assert_eq!(bits(&padded), bits(&alone), "{level:?}, {pad} padding keys");
            }
        }
    }

    #[test]
    fn shapes_that_do_not_fit_are_errors() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 3, 2, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 2, 4), DType::F32, &dev).unwrap();
        let bias = Tensor::zeros((1, 1, 2, 2), DType::F32, &dev).unwrap();
        assert!(attention(&q, &k, &k, &bias, 1.0).unwrap_err().to_string().contains("do not fit"));
        assert!(!takes(&q, &k, &k, &bias), "3 query heads over 2 key heads go the composed way");
    }
}

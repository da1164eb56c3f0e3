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
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{__m128i, __m256, _mm256_castsi256_ps, _mm256_cvtepu16_epi32, _mm256_cvtph_ps, _mm256_loadu_ps, _mm256_slli_epi32, _mm_loadu_si128};

impl Element for f32 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_loadu_ps(p)
    }
}

impl Element for half::f16 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

impl Element for half::bf16 {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        // A bf16 is the top half of an f32.
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i))))
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
    use candle_core::DType;
    fits(q, k, v, bias)?;
    let (q32, bias32) = (q.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?);
    let out = match k.dtype() {
        DType::F16 => attention_typed::<half::f16>(&q32, k, v, &bias32, scale)?,
        DType::BF16 => attention_typed::<half::bf16>(&q32, k, v, &bias32, scale)?,
        _ => attention_typed::<f32>(&q32, k, v, &bias32, scale)?,
    };
    Ok(out.to_dtype(q.dtype())?)
}

fn attention_typed<T: Element>(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
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
    let simd = crate::simd::avx2_fma_f16c();
    crate::threads::for_each_chunk_mut(&mut out, h * d, |row, o| {
        #[cfg(target_arch = "x86_64")]
        if simd {
            // SAFETY: the CPU has AVX2, FMA and F16C.
            return unsafe { row_avx2(row, o, shape, (qv, bv), (kv, vv)) };
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
    // The keys before the first unmasked one (a row's left padding) are not visited at all: the
    // row's sums then run over the same keys in the same order whatever padding its batch put
    // before it, so that a row gives the same bits alone or in any batch (continuous batching
    // pads rows of different lengths to one).
    let bias_row = bv.row(bi, 0, i, s);
    let first = bias_row.iter().position(|&b| b > MASKED).unwrap_or(s);
    if first == s {
        // Every key masked (a padding query of a left-padded prompt): nothing to attend to.
        o.fill(0.0);
        return;
    }
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
        let max = lanes(&p, f32::NEG_INFINITY, f32::max);
        for pj in p.iter_mut() {
            *pj -= max;
        }
        super::exp::exp_in_place(&mut p);
        let inv = 1.0 / lanes(&p, 0.0, |a, b| a + b);
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    #[test]
    fn matches_the_composed_attention_on_grouped_heads_padding_and_a_cache_view() {
        // d of 20 and 136 (a part of 64 left over); keys a few blocks of 8 and a part, the
        // first block all padding in the second case.
        for (past, d, pad) in [(3, 20, 2), (18, 136, 10)] {
            matches_the_composed_attention(past, d, pad, DType::F32);
        }
    }

    #[test]
    fn keys_and_values_in_half_precision_are_read_as_stored() {
        for dtype in [DType::F16, DType::BF16] {
            matches_the_composed_attention(18, 72, 10, dtype);
        }
    }

    #[test]
    fn a_bf16_query_gets_a_bf16_output() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 1, 16), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (1, 1, 9, 16), &dev).unwrap();
        let bias = crate::ops::nn::attention_bias(&[vec![1u32; 9]], 1, DType::F32, &dev).unwrap();
        let want = attention(&q, &k, &k, &bias, 0.25).unwrap();
        let half = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let got = attention(&half(&q), &half(&k), &half(&k), &half(&bias), 0.25).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let diff = (got.to_dtype(DType::F32).unwrap() - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 0.05, "{diff}");
    }

    /// Keys and values in `kv` (the reference reads the same rounded values in f32).
    fn matches_the_composed_attention(past: usize, d: usize, pad: usize, kv: DType) {
        let dev = Device::Cpu;
        let (b, h, g, t) = (2, 6, 2, 5);
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
        let got = attention(&q, &k, &v, &bias, 1.0 / (d as f64).sqrt()).unwrap();
        let f32 = |t: &Tensor| t.contiguous().unwrap().to_dtype(DType::F32).unwrap();
        let want = crate::ops::nn::attention_reference(&q, &f32(&k), &f32(&v), &bias).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn left_padding_changes_no_bit_of_a_row() {
        let dev = Device::Cpu;
        let (h, g, d, s) = (4, 2, 72, 21);
        let q = Tensor::randn(0f32, 1.0, (1, h, 1, d), &dev).unwrap();
        let kv = Tensor::randn(0f32, 1.0, (2, 1, g, s, d), &dev).unwrap();
        let (k, v) = (kv.get(0).unwrap(), kv.get(1).unwrap());
        let alone = attention(&q, &k, &v, &crate::ops::nn::attention_bias(&[vec![1u32; s]], 1, DType::F32, &dev).unwrap(), 0.125).unwrap();
        // 3 and 11 padding keys of any value before the same keys: the same bits.
        for pad in [3, 11] {
            let junk = Tensor::randn(0f32, 9.0, (1, g, pad, d), &dev).unwrap();
            let (kp, vp) = (Tensor::cat(&[&junk, &k], 2).unwrap(), Tensor::cat(&[&junk, &v], 2).unwrap());
            let mask = [vec![0u32; pad], vec![1u32; s]].concat();
            let bias = crate::ops::nn::attention_bias(&[mask], 1, DType::F32, &dev).unwrap();
            let padded = attention(&q, &kp, &vp, &bias, 0.125).unwrap();
            let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&padded), bits(&alone), "{pad} padding keys");
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

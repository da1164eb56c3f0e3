//! Attention for inference on the CPU in f32, one query row at a time:
//!
//! `o[b, i, h] = Σ_j p_j v[b, h/n, j]`, `p = softmax_j(q[b, h, i] · k[b, h/n, j] · scale + bias[b, i, j])`
//!
//! for q [b, H, t, d], k and v [b, G, s, d] with n = H / G (grouped-query attention: query head h
//! reads key/value head h / n in place, where the composed ops copy each key/value head n times),
//! bias [b, 1, t, s]. A row's s scores live in a buffer of their own, never a [t, s] matrix, and
//! the keys whose bias is `ops::attention_bias`'s mask value (−1e30, a weight of exactly 0 after
//! the exp) are not read at all: a causal prompt costs half the products. The output is
//! [b, t, H·d], the layout the output projection reads. Any strides (a view into a longer
//! cache) are read as they are.
//!
//! The reference is the composition of candle ops (`ops::nn::attention_reference`); the test
//! below compares the two.

use candle_core::{CpuStorage, Layout, Storage, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// Up to this many query positions (decoding, beams, short prompts) the rows are used; a prompt
/// keeps the composed GEMMs, which read each key once for a block of queries where a row reads
/// every key once per query, and are no slower there (docs/BENCHMARKS.md, CPU inference).
pub const QUERIES_MAX: usize = 16;

/// The bias of a masked key (`ops::attention_bias` in f32).
pub const MASKED: f32 = -1e30;

/// A 4-D f32 tensor's values with its strides.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    stride: [usize; 4],
}

impl View<'_> {
    #[inline(always)]
    fn row(&self, a: usize, b: usize, c: usize, len: usize) -> &[f32] {
        let at = self.offset + a * self.stride[0] + b * self.stride[1] + c * self.stride[2];
        &self.data[at..at + len]
    }
}

fn view<'a>(storage: &'a Storage, layout: &Layout, what: &str) -> Result<View<'a>> {
    let stride = layout.stride();
    match (storage, stride) {
        (Storage::Cpu(CpuStorage::F32(data)), &[s0, s1, s2, 1]) => Ok(View { data, offset: layout.start_offset(), stride: [s0, s1, s2, 1] }),
        _ => Err(Error::msg(format!("CPU attention: {what} must be a 4-D f32 CPU tensor with unit stride in its last dim"))),
    }
}

/// Whether [`attention`] takes these tensors: f32 on the CPU, q [b, H, t, d], k and v
/// [b, G, s, d] with G dividing H, bias [b, 1, t, s], each with unit stride in its last dim.
/// Anything else goes the composed way.
pub fn takes(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> bool {
    let plain = [q, k, v, bias].iter().all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.rank() == 4 && t.layout().stride().last() == Some(&1));
    plain && fits(q, k, v, bias).is_ok()
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

/// `softmax(q kᵀ · scale + bias) v` as [b, t, H·d] (see the module doc).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    fits(q, k, v, bias)?;
    let (b, h, t, d) = q.dims4()?;
    let (g, s) = (k.dim(1)?, k.dim(2)?);
    let (n, scale) = (h / g, scale as f32);
    let guards = [q, k, v, bias].map(|t| t.storage_and_layout());
    let [qv, kv, vv, bv] = [("q", 0), ("k", 1), ("v", 2), ("bias", 3)].map(|(what, i)| view(&guards[i].0, guards[i].1, what));
    let (qv, kv, vv, bv) = (qv?, kv?, vv?, bv?);
    let mut out = vec![0f32; b * t * h * d];
    let shape = Shape { h, t, s, d, n, scale };
    let fma = crate::simd::avx2_fma();
    let views = [qv, kv, vv, bv];
    out.par_chunks_mut(h * d).enumerate().for_each(|(row, o)| {
        #[cfg(target_arch = "x86_64")]
        if fma {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { row_avx2(row, o, shape, views) };
        }
        output_row::<false>(row, o, shape, views)
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

/// [`output_row`] compiled for AVX2 and FMA (a closure does not inherit a function's target
/// features, so this is called from inside the task).
///
/// # Safety
/// The CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(row: usize, o: &mut [f32], shape: Shape, views: [View; 4]) {
    output_row::<true>(row, o, shape, views)
}

/// The H heads' outputs of one (batch row, query position). `FMA`: fused multiply-adds (only
/// where the CPU has them: else `mul_add` is a library call).
#[inline(always)]
fn output_row<const FMA: bool>(row: usize, o: &mut [f32], Shape { h, t, s, d, n, scale }: Shape, [qv, kv, vv, bv]: [View; 4]) {
    let (bi, i) = (row / t, row % t);
    let bias_row = bv.row(bi, 0, i, s);
    let mut p = vec![0f32; s];
    for hi in 0..h {
        let (qrow, kh) = (qv.row(bi, hi, i, d), hi / n);
        let mut max = f32::NEG_INFINITY;
        for (j, pj) in p.iter_mut().enumerate() {
            *pj = if bias_row[j] <= MASKED { f32::NEG_INFINITY } else { dot::<FMA>(qrow, kv.row(bi, kh, j, d)) * scale + bias_row[j] };
            max = max.max(*pj);
        }
        for pj in p.iter_mut() {
            *pj -= max;
        }
        super::exp::exp_in_place(&mut p);
        let inv = 1.0 / p.iter().sum::<f32>();
        let oh = &mut o[hi * d..(hi + 1) * d];
        oh.fill(0.0);
        for (j, &pj) in p.iter().enumerate() {
            if pj != 0.0 {
                axpy::<FMA>(pj * inv, vv.row(bi, kh, j, d), oh);
            }
        }
    }
}

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `a · b` in 8 independent lanes (which the compiler keeps in one vector register).
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] = madd::<FMA>(x[l], y[l], acc[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a·x`.
#[inline(always)]
fn axpy<const FMA: bool>(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = madd::<FMA>(a, *x, *y);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;

    #[test]
    fn matches_the_composed_attention_on_grouped_heads_padding_and_a_cache_view() {
        let dev = Device::Cpu;
        let (b, h, g, t, past, d) = (2, 6, 2, 5, 3, 20);
        let s = past + t;
        let q = Tensor::randn(0f32, 1.0, (b, h, t, d), &dev).unwrap();
        // k and v as views into a longer buffer, as a cache with room to grow holds them.
        let room = Tensor::randn(0f32, 1.0, (b, g, s + 4, d), &dev).unwrap();
        let k = room.narrow(2, 0, s).unwrap();
        let v = (room.narrow(2, 2, s).unwrap() * 0.5).unwrap();
        // Row 1 left-padded by two tokens.
        let mask = vec![vec![1u32; s], [vec![0u32; 2], vec![1u32; s - 2]].concat()];
        let bias = crate::ops::nn::attention_bias(&mask, t, DType::F32, &dev).unwrap();
        let got = attention(&q, &k, &v, &bias, 1.0 / (d as f64).sqrt()).unwrap();
        let want = crate::ops::nn::attention_reference(&q, &k.contiguous().unwrap(), &v.contiguous().unwrap(), &bias).unwrap();
        let diff = (got - want).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
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

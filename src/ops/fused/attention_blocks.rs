//! The training attention core on the CPU in f32, a block of query rows at a time, so that the
//! [b, h, t, s] scores never exist whole and the causally masked keys cost nothing.
//!
//! For each (sequence, query head) and each block of up to [`ROWS`] query rows, with `vis(i)`
//! the keys row i sees (all `s`, or `s − t + i + 1` when causal):
//! - forward: `S = scale · q kᵀ + bias` over the block's visible keys, `P = softmax(S)` in
//!   place, `o = P v`, and the row's log-sum-exp `ℓ = max + ln Σ exp(S − max)` saved;
//! - backward: `P = exp(scale · q kᵀ + bias − ℓ)` recomputed, `dv += Pᵀ do`, `dP = do vᵀ`,
//!   `dS = P ⊙ (dP − rowsum(do ⊙ o))`, `dq = scale · dS k`, `dk += scale · dSᵀ q`.
//!
//! A block's products cover the keys its last row sees; the entries past a row's own `vis(i)`
//! are set to exactly 0, so the causal walk gives the full walk's values bit for bit (adding a
//! zero changes no sum). Each product is one single-threaded call of the `gemm` crate (candle's
//! own CPU matmul); the (sequence, head) pairs run in parallel. In the backward each query head
//! keeps its own dk, dv, summed over the heads of each key/value group at the end (as
//! `repeat_heads` and its gradient do).
//!
//! Layout, row-major and contiguous: q [b, h, t, d]; k, v [b, g, s, d] (query head `hq` reads
//! key/value head `hq / (h / g)`); bias [b, 1, t, s]; o and do [b, t, h·d] (the heads merged,
//! as the output projection reads them); ℓ [b, h, t]. The composed candle ops of
//! `attention::Attention` are the reference (and the path of every other dtype).

use rayon::prelude::*;

use crate::threads::DisjointOut;

/// Query rows a block: the scores of a block against 256 keys are 64 KiB, in L2.
pub const ROWS: usize = 64;

#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub b: usize,
    pub h: usize,
    pub g: usize,
    pub t: usize,
    pub s: usize,
    pub d: usize,
}

impl Dims {
    /// The keys query row `i` sees.
    fn visible(&self, i: usize, causal: bool) -> usize {
        if causal {
            (self.s + i + 1 - self.t).min(self.s)
        } else {
            self.s
        }
    }

    /// Whether the kernels take these dims: a causal query row sees at least its own key.
    pub fn fit(&self, causal: bool) -> bool {
        self.g > 0 && self.h.is_multiple_of(self.g) && self.d > 0 && self.t > 0 && (!causal || self.s >= self.t)
    }

    /// The offset of query head `pair % h`'s key/value head in k or v, for the pair `pair`.
    fn kv_offset(&self, pair: usize) -> usize {
        let (bi, hq) = (pair / self.h, pair % self.h);
        (bi * self.g + hq / (self.h / self.g)) * self.s * self.d
    }
}

/// A matrix operand: its first element and its row and column strides, in elements.
#[derive(Clone, Copy)]
struct Operand {
    ptr: *const f32,
    rows: isize,
    cols: isize,
}

impl Operand {
    fn rows(values: &[f32], stride: usize) -> Self {
        Self { ptr: values.as_ptr(), rows: stride as isize, cols: 1 }
    }

    /// The transpose of a row-major matrix whose rows are `stride` apart.
    fn transposed(values: &[f32], stride: usize) -> Self {
        Self { ptr: values.as_ptr(), rows: 1, cols: stride as isize }
    }
}

/// `c = [c +] beta · a b` for a [m, k] and b [k, n]; c [m, n] row-major, rows `c_stride` apart.
///
/// # Safety
/// Every element the strides reach from `a`, `b` (m·k and k·n) and `c` (m·n) is in bounds, and
/// no other thread touches c's elements meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn product(m: usize, n: usize, k: usize, c: *mut f32, c_stride: usize, accumulate: bool, a: Operand, b: Operand, beta: f32) {
    gemm::gemm(
        m, n, k, c, 1, c_stride as isize, accumulate, a.ptr, a.cols, a.rows, b.ptr, b.cols, b.rows, 1.0, beta, false, false, false,
        gemm::Parallelism::None,
    );
}

/// The scores of one block, `rows` query rows from `r0`, against `keys` keys: `scale · q kᵀ +
/// bias` on each row's visible keys, then `exp(· − shift(i))`, the entries past `vis(i)` 0. The
/// shift is the row's max (forward, which returns each row's max) or its ℓ (backward).
#[allow(clippy::too_many_arguments)]
fn block_exp(
    out: &mut [f32],
    q_rows: &[f32],
    k: &[f32],
    bias_rows: &[f32],
    dims: &Dims,
    (r0, rows, keys): (usize, usize, usize),
    scale: f32,
    causal: bool,
    mut shift: impl FnMut(usize, &[f32]) -> f32,
) {
    let (s, d) = (dims.s, dims.d);
    // SAFETY: q_rows holds rows·d values, k keys·d, out rows·keys; out is this task's own.
    unsafe { product(rows, keys, d, out.as_mut_ptr(), keys, false, Operand::rows(q_rows, d), Operand::transposed(k, d), scale) };
    for (i, row) in out.chunks_exact_mut(keys).enumerate() {
        let vis = dims.visible(r0 + i, causal);
        let (seen, hidden) = row.split_at_mut(vis);
        for (x, b) in seen.iter_mut().zip(&bias_rows[i * s..i * s + vis]) {
            *x += b;
        }
        let m = shift(i, seen);
        for x in seen.iter_mut() {
            *x -= m;
        }
        crate::ops::exp::exp_in_place(seen);
        hidden.fill(0.0);
    }
}

/// The forward: o [b, t, h·d] and ℓ [b, h, t].
#[allow(clippy::too_many_arguments)]
pub fn forward(q: &[f32], k: &[f32], v: &[f32], bias: &[f32], dims: Dims, scale: f32, causal: bool) -> (Vec<f32>, Vec<f32>) {
    let Dims { b, h, t, s, d, .. } = dims;
    let mut o = vec![0f32; b * t * h * d];
    let mut lse = vec![0f32; b * h * t];
    let o_out = DisjointOut(o.as_mut_ptr());
    lse.par_chunks_mut(t).enumerate().for_each(|(pair, lse)| {
        let o_out = &o_out;
        let (bi, hq) = (pair / h, pair % h);
        let kv = dims.kv_offset(pair);
        let (k, v) = (&k[kv..kv + s * d], &v[kv..kv + s * d]);
        let q = &q[pair * t * d..(pair + 1) * t * d];
        let mut p = vec![0f32; ROWS.min(t) * s];
        for r0 in (0..t).step_by(ROWS) {
            let rows = ROWS.min(t - r0);
            let keys = dims.visible(r0 + rows - 1, causal);
            let p = &mut p[..rows * keys];
            let bias_rows = &bias[(bi * t + r0) * s..(bi * t + r0 + rows) * s];
            let mut maxes = [0f32; ROWS];
            let q_rows = &q[r0 * d..(r0 + rows) * d];
            block_exp(p, q_rows, k, bias_rows, &dims, (r0, rows, keys), scale, causal, |i, seen| {
                maxes[i] = seen.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                maxes[i]
            });
            for (i, row) in p.chunks_exact_mut(keys).enumerate() {
                // A plain sequential sum: the zeros past vis(i) leave it as it is.
                let sum: f32 = row.iter().sum();
                let inv = 1.0 / sum;
                for x in row.iter_mut() {
                    *x *= inv;
                }
                lse[r0 + i] = maxes[i] + sum.ln();
            }
            // SAFETY: o's rows r0.. of sequence bi, columns hq·d.., belong to this pair alone.
            unsafe {
                let o_rows = o_out.0.add(((bi * t + r0) * h + hq) * d);
                product(rows, d, keys, o_rows, h * d, false, Operand::rows(p, keys), Operand::rows(v, d), 1.0);
            }
        }
    });
    (o, lse)
}

/// The inputs of the backward beside q, k, v: the forward's o and ℓ, and the gradient of o.
pub struct Saved<'a> {
    pub o: &'a [f32],
    pub lse: &'a [f32],
    pub dout: &'a [f32],
}

/// The backward: dq [b, h, t, d], dk and dv [b, g, s, d].
#[allow(clippy::too_many_arguments)]
pub fn backward(q: &[f32], k: &[f32], v: &[f32], bias: &[f32], saved: Saved, dims: Dims, scale: f32, causal: bool) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims { b, h, g, t, s, d } = dims;
    let mut dq = vec![0f32; b * h * t * d];
    // Each query head's own dk and dv, summed over its group below.
    let mut dk_heads = vec![0f32; b * h * s * d];
    let mut dv_heads = vec![0f32; b * h * s * d];
    let tasks = dq.par_chunks_mut(t * d).zip(dk_heads.par_chunks_mut(s * d)).zip(dv_heads.par_chunks_mut(s * d));
    tasks.enumerate().for_each(|(pair, ((dq, dk), dv))| {
        let (bi, hq) = (pair / h, pair % h);
        let kv = dims.kv_offset(pair);
        let (k, v) = (&k[kv..kv + s * d], &v[kv..kv + s * d]);
        let q = &q[pair * t * d..(pair + 1) * t * d];
        let lse = &saved.lse[pair * t..(pair + 1) * t];
        let mut p = vec![0f32; ROWS.min(t) * s];
        let mut ds = vec![0f32; ROWS.min(t) * s];
        for r0 in (0..t).step_by(ROWS) {
            let rows = ROWS.min(t - r0);
            let keys = dims.visible(r0 + rows - 1, causal);
            let (p, ds) = (&mut p[..rows * keys], &mut ds[..rows * keys]);
            let bias_rows = &bias[(bi * t + r0) * s..(bi * t + r0 + rows) * s];
            let q_rows = &q[r0 * d..(r0 + rows) * d];
            block_exp(p, q_rows, k, bias_rows, &dims, (r0, rows, keys), scale, causal, |i, _| lse[r0 + i]);
            // This head's rows of o and do: [rows, d], rows h·d apart.
            let merged = ((bi * t + r0) * h + hq) * d;
            let span = (rows - 1) * h * d + d;
            let (o, dout) = (&saved.o[merged..merged + span], &saved.dout[merged..merged + span]);
            // SAFETY: every operand's extent is in its slice; dq, dk, dv, ds are this task's own.
            unsafe {
                product(keys, d, rows, dv.as_mut_ptr(), d, true, Operand::transposed(p, keys), Operand::rows(dout, h * d), 1.0);
                product(rows, keys, d, ds.as_mut_ptr(), keys, false, Operand::rows(dout, h * d), Operand::transposed(v, d), 1.0);
            }
            for (i, (ds, p)) in ds.chunks_exact_mut(keys).zip(p.chunks_exact(keys)).enumerate() {
                let (o, dout) = (&o[i * h * d..i * h * d + d], &dout[i * h * d..i * h * d + d]);
                let rowdot: f32 = o.iter().zip(dout).map(|(a, b)| a * b).sum();
                for (x, &p) in ds.iter_mut().zip(p) {
                    *x = p * (*x - rowdot);
                }
            }
            // SAFETY: as above.
            unsafe {
                product(rows, d, keys, dq[r0 * d..].as_mut_ptr(), d, false, Operand::rows(ds, keys), Operand::rows(k, d), scale);
                product(keys, d, rows, dk.as_mut_ptr(), d, true, Operand::transposed(ds, keys), Operand::rows(q_rows, d), scale);
            }
        }
    });
    let n = h / g;
    let group = |heads: Vec<f32>| -> Vec<f32> {
        if n == 1 {
            return heads;
        }
        let mut out = vec![0f32; b * g * s * d];
        for (kv, out) in out.chunks_exact_mut(s * d).enumerate() {
            for head in heads.chunks_exact(s * d).skip(kv * n).take(n) {
                for (o, x) in out.iter_mut().zip(head) {
                    *o += x;
                }
            }
        }
        out
    };
    (dq, group(dk_heads), group(dv_heads))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor, Var, D};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn draw(rng: &mut StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    fn f64_tensor(values: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).unwrap().to_dtype(DType::F64).unwrap()
    }

    fn max_diff(got: &[f32], want: &Tensor) -> f64 {
        let want: Vec<f64> = want.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(got.len(), want.len());
        got.iter().zip(&want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max)
    }

    /// The blocks against candle's autograd of the composed attention in f64: grouped heads
    /// (3 query heads a key/value head), d odd, a last block of fewer rows, keys of an earlier
    /// chunk (s > t), one row left-padded; causal and not.
    #[test]
    fn forward_and_backward_match_the_composed_attention_in_f64() {
        let mut rng = StdRng::seed_from_u64(7);
        let (b, h, g, t, d) = (2, 6, 2, ROWS + 9, 13);
        let s = t + 5;
        let past = s - t;
        let mask = [(0..s).map(|j| u32::from(j >= past + 3)).collect::<Vec<_>>(), vec![1; s]];
        let bias = crate::ops::nn::attention_bias(&mask, t, DType::F32, &Device::Cpu).unwrap();
        let bias_values: Vec<f32> = bias.flatten_all().unwrap().to_vec1().unwrap();
        let (q, k, v) = (draw(&mut rng, b * h * t * d), draw(&mut rng, b * g * s * d), draw(&mut rng, b * g * s * d));
        let dout = draw(&mut rng, b * t * h * d);
        let scale = 1.0 / (d as f64).sqrt();
        let dims = Dims { b, h, g, t, s, d };

        let qv = Var::from_tensor(&f64_tensor(&q, &[b, h, t, d])).unwrap();
        let kv = Var::from_tensor(&f64_tensor(&k, &[b, g, s, d])).unwrap();
        let vv = Var::from_tensor(&f64_tensor(&v, &[b, g, s, d])).unwrap();
        let repeat = |x: &Tensor| crate::ops::fused::repeat_heads(x, h / g).unwrap();
        let scores = (qv.as_tensor() * scale).unwrap().matmul(&repeat(kv.as_tensor()).t().unwrap()).unwrap();
        let scores = scores.broadcast_add(&bias.to_dtype(DType::F64).unwrap()).unwrap();
        let p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        let o_ref = p.matmul(&repeat(vv.as_tensor())).unwrap().transpose(1, 2).unwrap().reshape((b, t, h * d)).unwrap();
        let grads = (&o_ref * f64_tensor(&dout, &[b, t, h * d])).unwrap().sum_all().unwrap().backward().unwrap();

        // The bias masks the causal keys too, so both walks must give the reference.
        let mut walks = Vec::new();
        for causal in [true, false] {
            let (o, lse) = forward(&q, &k, &v, &bias_values, dims, scale as f32, causal);
            assert!(max_diff(&o, &o_ref) < 1e-5, "o, causal {causal}: {}", max_diff(&o, &o_ref));
            let saved = Saved { o: &o, lse: &lse, dout: &dout };
            let (dq, dk, dv) = backward(&q, &k, &v, &bias_values, saved, dims, scale as f32, causal);
            for (name, got, var) in [("dq", &dq, &qv), ("dk", &dk, &kv), ("dv", &dv, &vv)] {
                let want = grads.get(var.as_tensor()).unwrap();
                assert!(max_diff(got, want) < 1e-4, "{name}, causal {causal}: {}", max_diff(got, want));
            }
            walks.push((o, dq, dk, dv));
        }
        // Skipping the masked keys changes no bit.
        assert!(walks[0] == walks[1], "the causal walk differs from the full walk");
    }

    #[test]
    fn a_causal_query_needs_its_own_key() {
        let dims = |t, s| Dims { b: 1, h: 2, g: 1, t, s, d: 4 };
        assert!(dims(4, 4).fit(true) && dims(4, 9).fit(true) && dims(9, 4).fit(false));
        assert!(!dims(9, 4).fit(true));
        assert!(!Dims { g: 3, ..dims(4, 4) }.fit(false));
    }
}

//! SNELL's branch applied as a sparse matrix at high sparsity (the seed uses s = 0.9 to 0.995 on
//! many tasks): the same math as the dense path of [`super::snell`], with the three products of
//! the size of the frozen linear replaced by work on the survivors only, so that their cost falls
//! with the density ρ = nnz / (d_in·d_out):
//!
//! ```text
//! forward    y[t, j]  += ΔW_s[i, j] · x[t, i]    for each survivor (i, j)       SpMM     T·nnz
//! backward   dx[t, i] += ΔW_s[i, j] · dy[t, j]                                  SpMM     T·nnz
//!            Ĝ[i, j]   = Σ_t x[t, i] · dy[t, j]  at the survivors only           SDDMM    T·nnz
//!            M_h, dIn_h, dOut_h as in the dense path, summed over the survivors only      H·k·nnz
//! ```
//!
//! ΔW itself (and τ) is still computed densely, as the dense path does: the threshold needs every
//! entry, and the mask must be the same in forward and backward. Layout: the survivors are kept
//! row-compressed over ΔW_s's rows i (the input features), columns ascending. The products walk
//! the tokens in blocks of [`TOKENS`]: a block of x (dy, the result) is transposed into
//! [features, TOKENS] in cache, so that each survivor costs one multiply-add of TOKENS lanes and
//! nothing of the activations' size is transposed or allocated besides the result. Ĝ sums over
//! a fixed number of token chunks, in a fixed order, so its value does not depend on the threads.
//! Here on the CPU (f32, f64: x and the factors in one dtype); the CUDA path is
//! `kernels/snell_sparse.cu` (host side `cuda::snell_sparse`), with the same cut.

use candle_core::{Device, Tensor, WithDType};
use num_traits::{Float, NumAssign};
use rayon::prelude::*;

use super::with_values;
use crate::Result;

/// The density at or under which the branch takes the sparse path. A chosen cut, not a measured
/// crossover: at 1% (s = 0.99) the sparse path is 1.6x faster than the dense one on SmolLM2's
/// MLP shapes (`bench snell --device cpu`, docs/BENCHMARKS.md); where between 1% and 50% the
/// two meet has not been measured.
pub const SPARSE_MAX_DENSITY: f64 = 0.05;

/// Tokens per block of the products (the lanes of each survivor's multiply-add).
const TOKENS: usize = 16;

/// Token chunks of Ĝ's sum: its parallelism, fixed so that the order of the sum is.
const G_CHUNKS: usize = 8;

/// The entries of ΔW [d_in, d_out] with |Δ| > τ, row-compressed.
pub(crate) struct Survivors<T> {
    d_in: usize,
    d_out: usize,
    row_ptr: Vec<usize>,
    cols: Vec<u32>,
    /// ΔW_s = Δ · |Δ| at each survivor.
    values: Vec<T>,
    /// The competition factor N = |Δ| at each survivor.
    factor: Vec<T>,
}

impl<T: Float + NumAssign + WithDType + Send + Sync> Survivors<T> {
    /// The survivors of Δ under τ when they are at most [`SPARSE_MAX_DENSITY`] of the entries
    /// (None otherwise: the dense path is faster). The comparison is `competition_factor`'s:
    /// |Δ| > τ in Δ's dtype.
    pub fn of(delta: &Tensor, tau: f64) -> Result<Option<Self>> {
        let (d_in, d_out) = delta.dims2()?;
        let tau = T::from(tau).expect("a float converts");
        Ok(with_values(delta, |delta: &[T]| {
            let count = delta.iter().filter(|v| v.abs() > tau).count();
            if count as f64 > SPARSE_MAX_DENSITY * delta.len() as f64 {
                return None;
            }
            let mut s = Self {
                d_in,
                d_out,
                row_ptr: Vec::with_capacity(d_in + 1),
                cols: Vec::with_capacity(count),
                values: Vec::with_capacity(count),
                factor: Vec::with_capacity(count),
            };
            s.row_ptr.push(0);
            for row in delta.chunks(d_out) {
                for (j, &v) in row.iter().enumerate() {
                    if v.abs() > tau {
                        s.cols.push(j as u32);
                        s.values.push(v * v.abs());
                        s.factor.push(v.abs());
                    }
                }
                s.row_ptr.push(s.cols.len());
            }
            Some(s)
        })?)
    }

    fn row(&self, i: usize) -> std::ops::Range<usize> {
        self.row_ptr[i]..self.row_ptr[i + 1]
    }

    /// `y = x ΔW_s` for x [T, d_in].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let t = x.dim(0)?;
        let (d_in, d_out) = (self.d_in, self.d_out);
        let mut y = vec![T::zero(); t * d_out];
        with_values(x, |x: &[T]| {
            y.par_chunks_mut(TOKENS * d_out).enumerate().for_each_init(
                || (vec![T::zero(); d_in * TOKENS], vec![T::zero(); d_out * TOKENS]),
                |(xb, yb), (block, y_rows)| {
                    gather_block(x, d_in, block * TOKENS, y_rows.len() / d_out, xb);
                    yb.fill(T::zero());
                    for i in 0..d_in {
                        let x_i = &xb[i * TOKENS..(i + 1) * TOKENS];
                        for p in self.row(i) {
                            let j = self.cols[p] as usize;
                            axpy(&mut yb[j * TOKENS..(j + 1) * TOKENS], self.values[p], x_i);
                        }
                    }
                    scatter_block(yb, d_out, y_rows);
                },
            )
        })?;
        Ok(Tensor::from_vec(y, (t, d_out), &Device::Cpu)?)
    }

    /// `(dx, dIn, dOut)` for x [T, d_in], dy [T, d_out] and the factors In [H, d_in, k] and Out
    /// [H, d_out, k]. The distances D_h are formed at the survivors only, by the expansion of the
    /// dense path (`‖a_i‖² + ‖b_j‖² − 2 a_i·b_j`, clamped at 0), with a_i·b_j as a plain dot.
    pub fn backward(&self, x: &Tensor, dy: &Tensor, input: &Tensor, output: &Tensor, coefficients: &[f64]) -> Result<(Tensor, Tensor, Tensor)> {
        let (t, d_in) = x.dims2()?;
        let (heads, _, k) = input.dims3()?;
        let d_out = self.d_out;
        let (x, dy): (Vec<T>, Vec<T>) = (x.flatten_all()?.to_vec1()?, dy.flatten_all()?.to_vec1()?);
        // dx[t, i] = Σ_j ΔW_s[i, j] dy[t, j], a block of tokens at a time.
        let mut dx = vec![T::zero(); t * d_in];
        dx.par_chunks_mut(TOKENS * d_in).enumerate().for_each_init(
            || (vec![T::zero(); d_out * TOKENS], vec![T::zero(); d_in * TOKENS]),
            |(dyb, dxb), (block, dx_rows)| {
                gather_block(&dy, d_out, block * TOKENS, dx_rows.len() / d_in, dyb);
                dxb.fill(T::zero());
                for i in 0..d_in {
                    let dx_i = &mut dxb[i * TOKENS..(i + 1) * TOKENS];
                    for p in self.row(i) {
                        let j = self.cols[p] as usize;
                        axpy(dx_i, self.values[p], &dyb[j * TOKENS..(j + 1) * TOKENS]);
                    }
                }
                scatter_block(dxb, d_in, dx_rows);
            },
        );
        let dx = Tensor::from_vec(dx, (t, d_in), &Device::Cpu)?;
        let g = self.sampled_product(&x, &dy, t);
        let (input_v, output_v): (Vec<T>, Vec<T>) = (input.flatten_all()?.to_vec1()?, output.flatten_all()?.to_vec1()?);
        let mut d_input = vec![T::zero(); heads * d_in * k];
        let mut d_output = vec![T::zero(); heads * d_out * k];
        let two = T::from(2.0).expect("a float converts");
        let squared_norms = |rows: &[T]| rows.chunks(k).map(|r| r.iter().fold(T::zero(), |s, &v| s + v * v)).collect::<Vec<T>>();
        for (h, &c) in coefficients.iter().enumerate() {
            let c = T::from(c).expect("a float converts");
            let in_h = &input_v[h * d_in * k..(h + 1) * d_in * k];
            let out_h = &output_v[h * d_out * k..(h + 1) * d_out * k];
            let (a2, b2) = (squared_norms(in_h), squared_norms(out_h));
            let din_h = &mut d_input[h * d_in * k..(h + 1) * d_in * k];
            let dout_h = &mut d_output[h * d_out * k..(h + 1) * d_out * k];
            let mut col_sum = vec![T::zero(); d_out];
            for i in 0..d_in {
                let (in_i, mut row_sum) = (&in_h[i * k..(i + 1) * k], T::zero());
                for p in self.row(i) {
                    let j = self.cols[p] as usize;
                    let out_j = &out_h[j * k..(j + 1) * k];
                    let sq = (a2[i] + b2[j]) - dot(in_i, out_j) * two;
                    // torch.cdist's gradient at a zero distance is 0.
                    let m = if sq > T::zero() { c * g[p] / sq.sqrt() } else { T::zero() };
                    row_sum += m;
                    col_sum[j] += m;
                    for e in 0..k {
                        din_h[i * k + e] -= m * out_j[e];
                        dout_h[j * k + e] -= m * in_i[e];
                    }
                }
                for e in 0..k {
                    din_h[i * k + e] += row_sum * in_i[e];
                }
            }
            for (j, &s) in col_sum.iter().enumerate() {
                for e in 0..k {
                    dout_h[j * k + e] += s * out_h[j * k + e];
                }
            }
        }
        let cpu = &Device::Cpu;
        Ok((dx, Tensor::from_vec(d_input, (heads, d_in, k), cpu)?, Tensor::from_vec(d_output, (heads, d_out, k), cpu)?))
    }

    /// `Ĝ = (xᵀ dy) ⊙ N` at the survivors: [`G_CHUNKS`] chunks of token blocks summed in
    /// parallel, then added in chunk order.
    fn sampled_product(&self, x: &[T], dy: &[T], t: usize) -> Vec<T> {
        let (d_in, d_out, nnz) = (self.d_in, self.d_out, self.cols.len());
        let blocks = t.div_ceil(TOKENS);
        let per_chunk = blocks.div_ceil(G_CHUNKS).max(1);
        let partials: Vec<Vec<T>> = (0..blocks.div_ceil(per_chunk))
            .into_par_iter()
            .map(|chunk| {
                let (mut xb, mut dyb) = (vec![T::zero(); d_in * TOKENS], vec![T::zero(); d_out * TOKENS]);
                let mut g = vec![T::zero(); nnz];
                for block in chunk * per_chunk..((chunk + 1) * per_chunk).min(blocks) {
                    let (t0, rows) = (block * TOKENS, TOKENS.min(t - block * TOKENS));
                    gather_block(x, d_in, t0, rows, &mut xb);
                    gather_block(dy, d_out, t0, rows, &mut dyb);
                    for i in 0..d_in {
                        let x_i = &xb[i * TOKENS..(i + 1) * TOKENS];
                        for p in self.row(i) {
                            let j = self.cols[p] as usize;
                            g[p] += dot(x_i, &dyb[j * TOKENS..(j + 1) * TOKENS]);
                        }
                    }
                }
                g
            })
            .collect();
        let mut g = vec![T::zero(); nnz];
        for partial in &partials {
            for (acc, &v) in g.iter_mut().zip(partial) {
                *acc += v;
            }
        }
        for (acc, &n) in g.iter_mut().zip(&self.factor) {
            *acc *= n;
        }
        g
    }
}

/// `block[f·TOKENS + u] = src[(t0 + u)·width + f]` for the `rows` tokens from t0, zero past them.
fn gather_block<T: Float>(src: &[T], width: usize, t0: usize, rows: usize, block: &mut [T]) {
    if rows < TOKENS {
        block.fill(T::zero());
    }
    for u in 0..rows {
        let row = &src[(t0 + u) * width..(t0 + u + 1) * width];
        for (f, &v) in row.iter().enumerate() {
            block[f * TOKENS + u] = v;
        }
    }
}

/// The inverse of [`gather_block`] into `dst` [rows, width] (rows = dst.len() / width).
fn scatter_block<T: Float>(block: &[T], width: usize, dst: &mut [T]) {
    for (u, row) in dst.chunks_mut(width).enumerate() {
        for (f, v) in row.iter_mut().enumerate() {
            *v = block[f * TOKENS + u];
        }
    }
}

/// `y += a x`.
fn axpy<T: Float + NumAssign>(y: &mut [T], a: T, x: &[T]) {
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// `a · b` in eight interleaved partial sums, which the compiler can keep in SIMD registers (a
/// single running sum is a dependency chain it may not reorder).
fn dot<T: Float + NumAssign>(a: &[T], b: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = ca.remainder().iter().zip(cb.remainder()).fold(T::zero(), |s, (&x, &y)| s + x * y);
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().fold(tail, |s, &v| s + v)
}

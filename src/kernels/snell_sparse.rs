//! SNELL's branch applied as a sparse matrix at high sparsity (the seed uses s = 0.9 to 0.995 on
//! many tasks): the same math as the dense path of [`super::snell`], with the three products of
//! the size of the frozen linear replaced by work on the survivors only, so that their cost falls
//! with the density ρ = nnz / (d_in·d_out):
//!
//! ```text
//! forward    yᵀ[j, :]  = Σ_i ΔW_s[i, j] · xᵀ[i, :]             SpMM over the columns         T·nnz
//! backward   dxᵀ[i, :] = Σ_j ΔW_s[i, j] · dyᵀ[j, :]            SpMM over the rows            T·nnz
//!            Ĝ[i, j]   = xᵀ[i, :] · dyᵀ[j, :]  at survivors    sampled product (SDDMM)       T·nnz
//!            M_h, dIn_h, dOut_h as in the dense path, summed over the survivors only         H·k·nnz
//! ```
//!
//! ΔW itself (and τ) is still computed densely, as the dense path does: the threshold needs every
//! entry, and the mask must be the same in forward and backward. Layout: the survivors are kept
//! row-compressed over ΔW_s's rows i (the input features), columns ascending, with a
//! column-compressed index beside it; x, dy and the results are transposed to [features, T] so
//! that every product runs along T in contiguous memory. Here on the CPU (f32, f64: x and the
//! factors in one dtype); the CUDA path is `kernels/snell_sparse.cu` (host side
//! `cuda::snell_sparse`), with the same cut and the same two orders of the survivors, ΔW and τ
//! recomputed there from the factors tile by tile.

use candle_core::{Device, Tensor, WithDType};
use num_traits::{Float, NumAssign};
use rayon::prelude::*;

use crate::Result;

/// The density at or under which the branch takes the sparse path. A chosen cut, not a measured
/// crossover: at 1% (s = 0.99) the sparse path is 1.6x faster than the dense one on SmolLM2's
/// MLP shapes (`bench snell --device cpu`, docs/BENCHMARKS.md); where between 1% and 50% the
/// two meet has not been measured.
pub const SPARSE_MAX_DENSITY: f64 = 0.05;

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
    /// The same entries column-compressed (over j, rows ascending): (row i, index into the above).
    col_ptr: Vec<usize>,
    by_col: Vec<(u32, u32)>,
}

/// A contiguous [rows, cols] tensor's values.
fn values<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    Ok(t.flatten_all()?.to_vec1::<T>()?)
}

impl<T: Float + NumAssign + WithDType + Send + Sync> Survivors<T> {
    /// The survivors of Δ under τ when they are at most [`SPARSE_MAX_DENSITY`] of the entries
    /// (None otherwise: the dense path is faster). The comparison is `competition_factor`'s:
    /// |Δ| > τ in Δ's dtype.
    pub fn of(delta: &Tensor, tau: f64) -> Result<Option<Self>> {
        let (d_in, d_out) = delta.dims2()?;
        let tau = T::from(tau).expect("a float converts");
        let delta: Vec<T> = values(delta)?;
        let count = delta.iter().filter(|v| v.abs() > tau).count();
        if count as f64 > SPARSE_MAX_DENSITY * delta.len() as f64 {
            return Ok(None);
        }
        let mut s = Self {
            d_in,
            d_out,
            row_ptr: Vec::with_capacity(d_in + 1),
            cols: Vec::with_capacity(count),
            values: Vec::with_capacity(count),
            factor: Vec::with_capacity(count),
            col_ptr: vec![0; d_out + 1],
            by_col: vec![(0, 0); count],
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
        for &j in &s.cols {
            s.col_ptr[j as usize + 1] += 1;
        }
        for j in 0..d_out {
            s.col_ptr[j + 1] += s.col_ptr[j];
        }
        let mut next = s.col_ptr.clone();
        for i in 0..d_in {
            for p in s.row(i) {
                let j = s.cols[p] as usize;
                s.by_col[next[j]] = (i as u32, p as u32);
                next[j] += 1;
            }
        }
        Ok(Some(s))
    }

    fn row(&self, i: usize) -> std::ops::Range<usize> {
        self.row_ptr[i]..self.row_ptr[i + 1]
    }

    /// `y = x ΔW_s` for x [T, d_in]. Computed transposed, `yᵀ[j, :] = Σ_i ΔW_s[i, j] xᵀ[i, :]`,
    /// so that every multiply-add runs along T in contiguous memory.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let t = x.dim(0)?;
        let xt = transposed(x)?;
        let mut yt = vec![T::zero(); self.d_out * t];
        yt.par_chunks_mut(t).enumerate().for_each(|(j, y_j)| {
            for &(i, p) in &self.by_col[self.col_ptr[j]..self.col_ptr[j + 1]] {
                let i = i as usize;
                axpy(y_j, self.values[p as usize], &xt[i * t..(i + 1) * t]);
            }
        });
        Ok(Tensor::from_vec(transpose(&yt, self.d_out, t), (t, self.d_out), &Device::Cpu)?)
    }

    /// `(dx, dIn, dOut)` for x [T, d_in], dy [T, d_out], the factors In [H, d_in, k] and Out
    /// [H, d_out, k] and the per-head distances D_h [d_in, d_out] of the dense path.
    pub fn backward(&self, x: &Tensor, dy: &Tensor, input: &Tensor, output: &Tensor, distances: &[Tensor], coefficients: &[f64]) -> Result<(Tensor, Tensor, Tensor)> {
        let (t, d_in) = x.dims2()?;
        let (heads, _, k) = input.dims3()?;
        let (d_out, nnz) = (self.d_out, self.cols.len());
        // dxᵀ[i, :] = Σ_j ΔW_s[i, j] dyᵀ[j, :], along T as the forward.
        let (xt, dyt) = (transposed(x)?, transposed(dy)?);
        let mut dxt = vec![T::zero(); d_in * t];
        dxt.par_chunks_mut(t).enumerate().for_each(|(i, dx_i)| {
            for p in self.row(i) {
                let j = self.cols[p] as usize;
                axpy(dx_i, self.values[p], &dyt[j * t..(j + 1) * t]);
            }
        });
        let dx = Tensor::from_vec(transpose(&dxt, d_in, t), (t, d_in), &Device::Cpu)?;
        // Ĝ at the survivors, times N, each sample one contiguous dot along T.
        let dyt = &dyt;
        let g: Vec<T> = (0..self.d_in)
            .into_par_iter()
            .flat_map_iter(|i| {
                let xi = &xt[i * t..(i + 1) * t];
                self.row(i).map(move |p| {
                    let j = self.cols[p] as usize;
                    dot(xi, &dyt[j * t..(j + 1) * t]) * self.factor[p]
                })
            })
            .collect();
        debug_assert_eq!(g.len(), nnz);
        let (input_v, output_v): (Vec<T>, Vec<T>) = (values(input)?, values(output)?);
        let mut d_input = vec![T::zero(); heads * self.d_in * k];
        let mut d_output = vec![T::zero(); heads * d_out * k];
        for (h, (dist, &c)) in distances.iter().zip(coefficients).enumerate() {
            let dist: Vec<T> = values(dist)?;
            let c = T::from(c).expect("a float converts");
            let in_h = &input_v[h * self.d_in * k..(h + 1) * self.d_in * k];
            let out_h = &output_v[h * d_out * k..(h + 1) * d_out * k];
            let din_h = &mut d_input[h * self.d_in * k..(h + 1) * self.d_in * k];
            let dout_h = &mut d_output[h * d_out * k..(h + 1) * d_out * k];
            let mut col_sum = vec![T::zero(); d_out];
            for i in 0..self.d_in {
                let (in_i, mut row_sum) = (&in_h[i * k..(i + 1) * k], T::zero());
                for p in self.row(i) {
                    let j = self.cols[p] as usize;
                    let d = dist[i * d_out + j];
                    // torch.cdist's gradient at a zero distance is 0.
                    let m = if d > T::zero() { c * g[p] / d } else { T::zero() };
                    row_sum += m;
                    col_sum[j] += m;
                    let out_j = &out_h[j * k..(j + 1) * k];
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
        Ok((
            dx,
            Tensor::from_vec(d_input, (heads, self.d_in, k), cpu)?,
            Tensor::from_vec(d_output, (heads, d_out, k), cpu)?,
        ))
    }
}

/// A [rows, cols] tensor's values transposed, [cols, rows].
fn transposed<T: Float + WithDType + Send + Sync>(m: &Tensor) -> Result<Vec<T>> {
    let (rows, cols) = m.dims2()?;
    Ok(transpose(&values::<T>(m)?, rows, cols))
}

/// `src` [rows, cols] row-major, transposed, in 32 × 32 blocks (a strided copy element by element
/// costs several times more on the cache).
fn transpose<T: Float + Send + Sync>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    const B: usize = 32;
    let mut dst = vec![T::zero(); rows * cols];
    dst.par_chunks_mut(B * rows).enumerate().for_each(|(cb, block)| {
        let c0 = cb * B;
        let width = block.len() / rows.max(1);
        for r0 in (0..rows).step_by(B) {
            for c in 0..width {
                for r in r0..(r0 + B).min(rows) {
                    block[c * rows + r] = src[r * cols + c0 + c];
                }
            }
        }
    });
    dst
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

//! Softmax over the last dimension with its own backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, D};
use num_traits::Float;

use super::*;

/// Softmax over the last dimension. Backward: `dx = y ⊙ (dy − Σ dy ⊙ y)`.
pub struct SoftmaxLastDim;

fn softmax_rows<T: Float>(x: &[T], cols: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(cols) {
        let max = row.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let start = out.len();
        let mut sum = T::zero();
        for &v in row {
            let e = (v - max).exp();
            sum = sum + e;
            out.push(e);
        }
        for e in &mut out[start..] {
            *e = *e / sum;
        }
    }
    out
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let cols = layout.shape().dims().last().copied().unwrap_or(1);
        let out = match storage {
            CpuStorage::F32(v) => {
                // Rows in parallel, each with the vectorized exp.
                use rayon::prelude::*;
                let mut out = contiguous(v, layout, self.name())?.to_vec();
                let rows_per_task = (16384 / cols.max(1)).max(1);
                out.par_chunks_mut(rows_per_task * cols.max(1)).for_each(|rows| crate::ops::exp::softmax_rows_in_place(rows, cols));
                CpuStorage::F32(out)
            }
            CpuStorage::F64(v) => CpuStorage::F64(softmax_rows(contiguous(v, layout, self.name())?, cols)),
            other => candle_core::bail!("{}: unsupported dtype {:?}", self.name(), other.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let y = &y.detach(); // no graph behind dx (see RmsNorm's bwd)
        let dot = (dy * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * dy.broadcast_sub(&dot)?)?))
    }
}

//! CPU custom ops with a hand-written backward, for the two places where candle's autograd keeps
//! the most: the attention softmax and the loss over the vocabulary. Built from generic ops, each
//! would keep every intermediate (shifted scores, exponentials, sums; for the loss, four copies of
//! the [tokens, vocab] logits). Here the softmax keeps its input and output, and the loss keeps
//! only the logits (its backward recomputes the softmax).
//!
//! Layout: row-major, contiguous, the reduced dimension last. f32 and f64 (the finite-difference
//! tests run in f64). The compositions in `ops.rs` are the reference these are tested against
//! (`tests/fused_ops.rs`), and the fallback on other devices and dtypes.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};
use num_traits::Float;

fn contiguous<'a, T>(v: &'a [T], layout: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("{what}: the input must be contiguous"),
    }
}

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
            CpuStorage::F32(v) => CpuStorage::F32(softmax_rows(contiguous(v, layout, self.name())?, cols)),
            CpuStorage::F64(v) => CpuStorage::F64(softmax_rows(contiguous(v, layout, self.name())?, cols)),
            other => candle_core::bail!("{}: unsupported dtype {:?}", self.name(), other.dtype()),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dot = (dy * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * dy.broadcast_sub(&dot)?)?))
    }
}

/// Per-row negative log-likelihood of `labels` (i64, -100 = ignored, giving 0) under
/// `logits` [n, vocab]. Backward for the logits: `(softmax(logits) − onehot(label)) · dloss`.
pub struct CrossEntropyRows;

fn nll_rows<T: Float>(logits: &[T], labels: &[i64], cols: usize) -> candle_core::Result<Vec<T>> {
    let mut out = Vec::with_capacity(labels.len());
    for (row, &label) in logits.chunks(cols).zip(labels) {
        if label < 0 {
            out.push(T::zero());
            continue;
        }
        if label as usize >= cols {
            candle_core::bail!("label {label} is outside the vocabulary of {cols}");
        }
        let max = row.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let lse = row.iter().fold(T::zero(), |s, &v| s + (v - max).exp()).ln() + max;
        out.push(lse - row[label as usize]);
    }
    Ok(out)
}

impl CustomOp2 for CrossEntropyRows {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cols) = l1.shape().dims2()?;
        let CpuStorage::I64(labels) = s2 else { candle_core::bail!("{}: labels must be i64", self.name()) };
        let labels = contiguous(labels, l2, self.name())?;
        if labels.len() != rows {
            candle_core::bail!("{}: {rows} rows of logits but {} labels", self.name(), labels.len());
        }
        let out = match s1 {
            CpuStorage::F32(v) => CpuStorage::F32(nll_rows(contiguous(v, l1, self.name())?, labels, cols)?),
            CpuStorage::F64(v) => CpuStorage::F64(nll_rows(contiguous(v, l1, self.name())?, labels, cols)?),
            other => candle_core::bail!("{}: unsupported dtype {:?}", self.name(), other.dtype()),
        };
        Ok((out, Shape::from(rows)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _nll: &Tensor,
        dnll: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let keep = labels.ge(0i64)?;
        let dnll = (dnll * keep.to_dtype(dnll.dtype())?)?;
        let safe = keep.where_cond(labels, &labels.zeros_like()?)?.to_dtype(DType::U32)?.unsqueeze(1)?;
        let p = logits.apply_op1_no_bwd(&SoftmaxLastDim)?;
        let grad = p.broadcast_mul(&dnll.unsqueeze(1)?)?;
        let grad = grad.scatter_add(&safe, &dnll.neg()?.unsqueeze(1)?, 1)?;
        Ok((Some(grad), None))
    }
}

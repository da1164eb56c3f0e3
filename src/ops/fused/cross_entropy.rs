//! The per-row negative log-likelihood whose backward recomputes the softmax.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use num_traits::Float;

use super::*;

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

/// [`nll_rows`] in f32: rows over the threads, each row's exponentials by the vectorized exp
/// (49k of them a row for SmolLM2's vocabulary).
fn nll_rows_f32(logits: &[f32], labels: &[i64], cols: usize) -> candle_core::Result<Vec<f32>> {
    use rayon::prelude::*;
    if let Some(&label) = labels.iter().find(|&&l| l >= cols as i64) {
        candle_core::bail!("label {label} is outside the vocabulary of {cols}");
    }
    Ok(logits
        .par_chunks(cols.max(1))
        .zip(labels.par_iter())
        .map_init(
            || vec![0f32; cols],
            |e, (row, &label)| {
                if label < 0 {
                    return 0.0;
                }
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                for (e, &v) in e.iter_mut().zip(row) {
                    *e = v - max;
                }
                crate::ops::exp::exp_in_place(e);
                let lse = e.iter().sum::<f32>().ln() + max;
                lse - row[label as usize]
            },
        )
        .collect())
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
            CpuStorage::F32(v) => CpuStorage::F32(nll_rows_f32(contiguous(v, l1, self.name())?, labels, cols)?),
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
        let logits = &logits.detach(); // no graph behind the gradient (see RmsNorm's bwd)
        let keep = labels.ge(0i64)?;
        let dnll = (dnll * keep.to_dtype(dnll.dtype())?)?;
        let safe = keep.where_cond(labels, &labels.zeros_like()?)?.to_dtype(DType::U32)?.unsqueeze(1)?;
        let p = logits.apply_op1_no_bwd(&SoftmaxLastDim)?;
        let grad = p.broadcast_mul(&dnll.unsqueeze(1)?)?;
        let grad = grad.scatter_add(&safe, &dnll.neg()?.unsqueeze(1)?, 1)?;
        Ok((Some(grad), None))
    }
}

// ---------------------------------------------------------------------------------------------
// Ops of the decoder layer. Each keeps, through candle's graph, only its inputs (which the
// surrounding graph keeps anyway) and its output; what the backward needs beyond that is a
// per-row statistic held in the op itself. The plain compositions in `ops.rs` would keep every
// intermediate (RMSNorm: x², the normalised x; SwiGLU: silu(g); RoPE: the head-major copy, four
// half-width products, their sums; attention: the GQA-expanded k and v, the scaled q, the scores,
// the biased scores and the probabilities, each [b, h, t, t]).

#[cfg(test)]
mod tests {
    use super::*;

    /// The f32 rows (threads, vectorized exp) against the generic code, ignored rows and a label
    /// out of the vocabulary included.
    #[test]
    fn f32_rows_match_the_generic_code() {
        let cols = 1001;
        let logits: Vec<f32> = (0..7 * cols).map(|i| ((i * 7919) % 1013) as f32 * 0.02 - 10.0).collect();
        let labels = [3, -100, 1000, 0, 17, -100, 512];
        let (got, want) = (nll_rows_f32(&logits, &labels, cols).unwrap(), nll_rows(&logits, &labels, cols).unwrap());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{g} against {w}");
        }
        assert_eq!((got[1], got[5]), (0.0, 0.0));
        assert!(nll_rows_f32(&logits, &[3, 0, 1001, 0, 0, 0, 0], cols).is_err());
    }
}

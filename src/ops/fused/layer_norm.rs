//! LayerNorm with the per-row mean and scale kept for backward (the ViT's norms, SynQT's).

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor, WithDType};
use num_traits::Float;

use super::*;

/// LayerNorm over the last dimension: `y = (x − μ) · r ⊙ w + b`, `μ` the row's mean,
/// `r = 1/√(mean((x − μ)²) + ε)`. Saves x, w, b (the graph's inputs) and, in the op, `μ` and `r`
/// per row ([rows, 1] each), where the composed ops keep five [rows, cols] intermediates.
/// Backward, with `n = (x − μ)·r` and `dn = dy ⊙ w`:
/// `dx = r · (dn − mean(dn) − n · mean(dn ⊙ n))`, `dw = Σ_rows dy ⊙ n`, `db = Σ_rows dy`
/// (dw and db only when w and b are trained: SynQT's norms are, the backbone's are not).
pub struct LayerNorm {
    eps: f64,
    stats: OnceLock<(Tensor, Tensor)>,
}

impl LayerNorm {
    pub fn new(eps: f64) -> Self {
        Self { eps, stats: OnceLock::new() }
    }
}

/// `y` and each row's mean and scale.
fn layer_norm_rows<T: Float + WithDType>(x: &[T], w: &[T], b: &[T], eps: f64) -> (Vec<T>, Vec<T>, Vec<T>) {
    let cols = w.len();
    let n = T::from(cols).expect("row length");
    let rows = x.len() / cols.max(1);
    let (mut out, mut mean, mut rstd) = (Vec::with_capacity(x.len()), Vec::with_capacity(rows), Vec::with_capacity(rows));
    for row in x.chunks(cols) {
        let mu = row.iter().fold(T::zero(), |s, &v| s + v) / n;
        let var = row.iter().fold(T::zero(), |s, &v| s + (v - mu) * (v - mu)) / n;
        let r = (var + T::from(eps).expect("eps")).sqrt().recip();
        mean.push(mu);
        rstd.push(r);
        out.extend(row.iter().zip(w).zip(b).map(|((&v, &g), &c)| (v - mu) * r * g + c));
    }
    (out, mean, rstd)
}

/// Each row's mean and scale as [rows, 1] tensors.
fn row_stats<T: WithDType>(mean: Vec<T>, rstd: Vec<T>, rows: usize) -> candle_core::Result<(Tensor, Tensor)> {
    Ok((Tensor::from_vec(mean, (rows, 1), &Device::Cpu)?, Tensor::from_vec(rstd, (rows, 1), &Device::Cpu)?))
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let cols = l1.shape().dims().last().copied().unwrap_or(1);
        if l2.shape().elem_count() != cols || l3.shape().elem_count() != cols {
            candle_core::bail!("{}: weight of {} and bias of {} for rows of {cols}", self.name(), l2.shape().elem_count(), l3.shape().elem_count());
        }
        let rows = l1.shape().elem_count() / cols.max(1);
        let name = self.name();
        let (out, kept) = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                let (o, m, r) = layer_norm_rows(contiguous(x, l1, name)?, contiguous(w, l2, name)?, contiguous(b, l3, name)?, self.eps);
                (CpuStorage::F32(o), row_stats(m, r, rows)?)
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                let (o, m, r) = layer_norm_rows(contiguous(x, l1, name)?, contiguous(w, l2, name)?, contiguous(b, l3, name)?, self.eps);
                (CpuStorage::F64(o), row_stats(m, r, rows)?)
            }
            _ => candle_core::bail!("{name}: x, weight and bias must all be f32 or all f64"),
        };
        if self.stats.set(kept).is_err() {
            candle_core::bail!("{name}: an op value is applied once");
        }
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some((mean, rstd)) = self.stats.get() else { candle_core::bail!("{}: backward before forward", self.name()) };
        let cols = w.elem_count();
        let rows = x.elem_count() / cols.max(1);
        let (w_trained, b_trained) = (w.track_op(), b.track_op());
        // Detached: gradients computed from the graph's tensors would carry a graph holding every
        // temporary below (see RmsNorm's bwd).
        let (x, w) = (&x.detach(), &w.detach());
        let dy = dy.reshape((rows, cols))?;
        let n = x.reshape((rows, cols))?.broadcast_sub(mean)?.broadcast_mul(rstd)?;
        let dw = if w_trained { Some((&dy * &n)?.sum(0)?.reshape(w.shape())?) } else { None };
        let db = if b_trained { Some(dy.sum(0)?.reshape(b.shape())?) } else { None };
        let dn = dy.broadcast_mul(&w.reshape((1, cols))?)?;
        let dot = (&dn * &n)?.mean_keepdim(1)?;
        let dx = dn.broadcast_sub(&dn.mean_keepdim(1)?)?.sub(&n.broadcast_mul(&dot)?)?;
        Ok((Some(dx.broadcast_mul(rstd)?.reshape(x.shape())?), dw, db))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    /// The op against the composed LayerNorm in f64: values and the gradients of x, w and b, on
    /// an odd width; a frozen w and b get no gradient.
    #[test]
    fn the_fused_layer_norm_matches_the_composed_ops() {
        let dev = Device::Cpu;
        let draw = |n: usize, k: usize| Tensor::from_vec((0..n).map(|i| ((i * k % 29) as f64 - 14.0) / 7.0).collect::<Vec<_>>(), n, &dev).unwrap();
        let (rows, cols) = (5, 13);
        let x = Var::from_tensor(&draw(rows * cols, 7).reshape((rows, cols)).unwrap()).unwrap();
        let (w, b) = (Var::from_tensor(&draw(cols, 3)).unwrap(), Var::from_tensor(&draw(cols, 5)).unwrap());
        let weights = draw(rows * cols, 11).reshape((rows, cols)).unwrap();
        let fused = crate::ops::nn::layer_norm(&x, &w, &b, 1e-6, true).unwrap();
        let composed = crate::ops::nn::layer_norm_reference(&x, &w, &b, 1e-6).unwrap();
        let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
        assert!(diff(&fused, &composed) < 1e-12);
        let (gf, gc) = ((fused * &weights).unwrap().sum_all().unwrap().backward().unwrap(), (composed * &weights).unwrap().sum_all().unwrap().backward().unwrap());
        for v in [&x, &w, &b] {
            let (a, c) = (gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
            assert!(diff(a, c) < 1e-12, "{a} against {c}");
        }
        let frozen = (Tensor::ones(cols, DType::F64, &dev).unwrap(), Tensor::zeros(cols, DType::F64, &dev).unwrap());
        let y = crate::ops::nn::layer_norm(&x, &frozen.0, &frozen.1, 1e-6, true).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&frozen.0).is_none() && g.get(&frozen.1).is_none() && g.get(x.as_tensor()).is_some());
    }
}

//! CPU custom ops with a hand-written backward, for the places where candle's autograd keeps the
//! most: the attention softmax and the loss over the vocabulary, and (below) the whole attention
//! core, RMSNorm, SwiGLU, the heads split with RoPE, and the frozen linears. Built from generic
//! ops, each would keep every intermediate (shifted scores, exponentials, sums; for the loss,
//! four copies of the [tokens, vocab] logits). Here the softmax keeps its input and output, and
//! the loss keeps only the logits (its backward recomputes the softmax).
//!
//! candle's graph also keeps every op's inputs until backward ends, so a tensor that only the next
//! op reads stays alive although no backward needs it. The ops that join neighbours release
//! those: the q, k, v projections split into heads inside their op (`ProjectedHeads`), the
//! frozen o_proj and down_proj add into the residual (`FrozenMatmulTAdd`), and SwiGLU goes into
//! a frozen down_proj (`SwiGluProjectAdd`).
//!
//! Layout: row-major, contiguous, the reduced dimension last. f32 and f64 (the finite-difference
//! tests run in f64). The compositions in `ops.rs` are the reference these are tested against
//! (`tests/fused_ops.rs`), and the fallback on other devices and dtypes. On CUDA (all dtypes the
//! kernels take): the attention core (`kernels/attention.cu`), RMSNorm (`kernels/rms_norm.cu`),
//! SwiGLU (`kernels/swiglu.cu`), the heads split (`kernels/rope.cu`) and the frozen matmuls
//! (cuBLAS); `selftest` checks each against this CPU op in f64.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor, WithDType, D};
use num_traits::Float;

use super::linear::BaseWeight;
use crate::kernels::{cpu_tensor, tensor_cpu_storage};

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
        let y = &y.detach(); // no graph behind dx (see RmsNorm's bwd)
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

/// RMSNorm over the last dimension: `y = x · r ⊙ w`, `r = 1/√(mean(x²) + ε)` per row.
/// Saves x (the graph's input) and, in the op, the per-row `r` [rows, 1].
/// Backward, with `n = x·r`: `dw = Σ_rows dy ⊙ n`, `dx = r · (dn − n · mean(dn ⊙ n))`, `dn = dy ⊙ w`.
pub struct RmsNorm {
    eps: f64,
    rstd: OnceLock<Tensor>,
}

impl RmsNorm {
    pub fn new(eps: f64) -> Self {
        Self { eps, rstd: OnceLock::new() }
    }

    fn keep_rstd(&self, rstd: Tensor) -> candle_core::Result<()> {
        // A second forward through the same op value would overwrite nothing: keep the first.
        if self.rstd.set(rstd).is_err() {
            candle_core::bail!("{}: an op value is applied once", self.name());
        }
        Ok(())
    }
}

fn rms_norm_rows<T: Float + WithDType>(x: &[T], w: &[T], eps: f64) -> (Vec<T>, Vec<T>) {
    let cols = w.len();
    let mut out = Vec::with_capacity(x.len());
    let mut rstd = Vec::with_capacity(x.len() / cols.max(1));
    let n = T::from(cols).expect("row length");
    for row in x.chunks(cols) {
        let ms = row.iter().fold(T::zero(), |s, &v| s + v * v) / n;
        let r = (ms + T::from(eps).expect("eps")).sqrt().recip();
        rstd.push(r);
        out.extend(row.iter().zip(w).map(|(&v, &g)| v * r * g));
    }
    (out, rstd)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let cols = l1.shape().dims().last().copied().unwrap_or(1);
        if l2.shape().elem_count() != cols {
            candle_core::bail!("{}: weight of {} for rows of {cols}", self.name(), l2.shape().elem_count());
        }
        let rows = l1.shape().elem_count() / cols.max(1);
        let (out, rstd) = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                let (o, r) = rms_norm_rows(contiguous(x, l1, self.name())?, contiguous(w, l2, self.name())?, self.eps);
                (CpuStorage::F32(o), Tensor::from_vec(r, (rows, 1), &Device::Cpu)?)
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                let (o, r) = rms_norm_rows(contiguous(x, l1, self.name())?, contiguous(w, l2, self.name())?, self.eps);
                (CpuStorage::F64(o), Tensor::from_vec(r, (rows, 1), &Device::Cpu)?)
            }
            _ => candle_core::bail!("{}: x and weight must both be f32 or f64", self.name()),
        };
        self.keep_rstd(rstd)?;
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (y, shape, rstd) = crate::kernels::cuda::rms_norm::forward((s1, l1), (s2, l2), self.eps)?;
        self.keep_rstd(rstd)?;
        Ok((y, shape))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(rstd) = self.rstd.get() else { candle_core::bail!("{}: backward before forward", self.name()) };
        let cols = w.elem_count();
        let rows = x.elem_count() / cols.max(1);
        // In f32 for bf16 / f16 (the row means of a 4096-wide row), as the forward normalises.
        let acc = super::ops::accumulate_dtype(x.dtype());
        // One [rows, cols] temporary per statement, each dropped as soon as it is used: on a
        // LLaMA-7B batch every one of them is 64 MiB in f32.
        let rstd = rstd.to_dtype(acc)?;
        let weight_trained = w.track_op();
        // x and w are the graph's tensors: computed from them as they are, dx and dw would carry
        // a graph holding every temporary below for as long as they wait in the gradient store.
        let (x, w) = (&x.detach(), &w.detach());
        let normed = || x.reshape((rows, cols))?.to_dtype(acc)?.broadcast_mul(&rstd);
        let dy2 = || dy.reshape((rows, cols))?.to_dtype(acc);
        let weight_gradient = |n: &Tensor, dy2: &Tensor| (dy2 * n)?.sum(0)?.reshape(w.shape())?.to_dtype(w.dtype());
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let dx = crate::kernels::cuda::rms_norm::backward(x, w, &rstd, dy)?;
            // Every adapter method freezes the norms; only full fine-tuning needs dw.
            let dw = if weight_trained { Some(weight_gradient(&normed()?, &dy2()?)?) } else { None };
            return Ok((Some(dx), dw));
        }
        let (n, dy2) = (normed()?, dy2()?);
        let dw = weight_trained.then(|| weight_gradient(&n, &dy2)).transpose()?;
        let dn = dy2.broadcast_mul(&w.reshape((1, cols))?.to_dtype(acc)?)?;
        drop(dy2);
        let dot = (&dn * &n)?.mean_keepdim(1)?;
        let projected = n.broadcast_mul(&dot)?;
        drop(n);
        let dx = (dn - projected)?;
        let dx = dx.broadcast_mul(&rstd)?.reshape(x.shape())?.to_dtype(x.dtype())?;
        Ok((Some(dx), dw))
    }
}

/// SwiGLU's gate `y = silu(g) ⊙ u = g·σ(g) ⊙ u`. Saves g and u only. On CUDA both passes are
/// the kernels of `kernels/swiglu.cu` (this op's CPU code is their reference).
/// Backward: `du = dy ⊙ silu(g)`, `dg = dy ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g)))`.
pub struct SwiGlu;

fn swiglu_values<T: Float>(g: &[T], u: &[T]) -> Vec<T> {
    g.iter().zip(u).map(|(&g, &u)| g / (T::one() + (-g).exp()) * u).collect()
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("{}: gate {:?} and up {:?} differ", self.name(), l1.shape(), l2.shape());
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => {
                CpuStorage::F32(swiglu_values(contiguous(g, l1, self.name())?, contiguous(u, l2, self.name())?))
            }
            (CpuStorage::F64(g), CpuStorage::F64(u)) => {
                CpuStorage::F64(swiglu_values(contiguous(g, l1, self.name())?, contiguous(u, l2, self.name())?))
            }
            _ => candle_core::bail!("{}: gate and up must both be f32 or f64", self.name()),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::kernels::cuda::swiglu::forward((s1, l1), (s2, l2))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if g.device().is_cuda() {
            let (dg, du) = crate::kernels::cuda::swiglu::backward(g, u, dy)?;
            return Ok((Some(dg), Some(du)));
        }
        let (g, u) = (&g.detach(), &u.detach());  // no graph behind dg, du (see RmsNorm's bwd)
        let sig = (g.neg()?.exp()? + 1.0)?.recip()?;
        let silu = (g * &sig)?;
        let du = (dy * &silu)?;
        // σ(g)(1 + g(1 − σ(g))) = σ(g) + silu(g)(1 − σ(g))
        let dsilu = (&sig + (silu * (1.0 - &sig)?)?)?;
        let dg = ((dy * u)? * dsilu)?;
        Ok((Some(dg), Some(du)))
    }
}

/// The heads split and rotary embedding of one projection: x [b, t, n·d] (the linear's output)
/// to y [b, n, t, d] with `y₁ = x₁ cos − x₂ sin`, `y₂ = x₂ cos + x₁ sin` (Hugging Face's
/// rotate-half layout, halves of d); without a rotation (v) the split alone. Saves nothing
/// (the graph holds x: see [`ProjectedHeads`] for the op that does not). Backward, the inverse
/// rotation moved back to [b, t, n·d]: `dx₁ = dy₁ cos + dy₂ sin`, `dx₂ = dy₂ cos − dy₁ sin`. On
/// CUDA both directions are `kernels/rope.cu`.
pub struct RopeHeads {
    pub heads: usize,
    /// (cos, sin), contiguous [b, 1, t, d/2] in x's dtype; None for the split alone.
    pub rotation: Option<(Tensor, Tensor)>,
}

/// The sizes of one heads split: batch, tokens, heads, head dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadsShape {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

fn rope_heads_values<T: Float + WithDType>(x: &[T], rotation: Option<(&[T], &[T])>, s: HeadsShape) -> Vec<T> {
    let (d, half) = (s.head_dim, s.head_dim / 2);
    let mut out = vec![T::zero(); x.len()];
    for bi in 0..s.batch {
        for ti in 0..s.tokens {
            let row = bi * s.tokens + ti;
            for h in 0..s.heads {
                let src = &x[(row * s.heads + h) * d..][..d];
                let dst = &mut out[((bi * s.heads + h) * s.tokens + ti) * d..][..d];
                match rotation {
                    Some((cos, sin)) => {
                        let (cs, sn) = (&cos[row * half..][..half], &sin[row * half..][..half]);
                        for i in 0..half {
                            let (x1, x2) = (src[i], src[i + half]);
                            dst[i] = x1 * cs[i] - x2 * sn[i];
                            dst[i + half] = x2 * cs[i] + x1 * sn[i];
                        }
                    }
                    None => dst.copy_from_slice(src),
                }
            }
        }
    }
    out
}

impl RopeHeads {
    /// The split of `width` columns over `batch · tokens` rows, checked against the heads and
    /// the tables.
    pub fn shape(&self, batch: usize, tokens: usize, width: usize) -> candle_core::Result<HeadsShape> {
        let n = self.heads;
        if n == 0 || !width.is_multiple_of(n) || !(width / n).is_multiple_of(2) {
            candle_core::bail!("fused-rope-heads: width {width} is not {n} heads of an even size");
        }
        let shape = HeadsShape { batch, tokens, heads: n, head_dim: width / n };
        if let Some((cos, sin)) = &self.rotation {
            let table = [batch, 1, tokens, shape.head_dim / 2];
            if cos.dims() != table || sin.dims() != table {
                candle_core::bail!("fused-rope-heads: cos {:?} / sin {:?} do not fit {table:?}", cos.dims(), sin.dims());
            }
        }
        Ok(shape)
    }

    fn shape_of(&self, layout: &Layout) -> candle_core::Result<HeadsShape> {
        let (b, t, width) = layout.shape().dims3()?;
        self.shape(b, t, width)
    }

    fn tables(&self) -> Option<(&Tensor, &Tensor)> {
        self.rotation.as_ref().map(|(c, s)| (c, s))
    }

    fn cpu_split(&self, storage: &CpuStorage, layout: &Layout, shape: HeadsShape) -> candle_core::Result<CpuStorage> {
        Ok(match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.split_values(contiguous(v, layout, "fused-rope-heads")?, shape)?),
            CpuStorage::F64(v) => CpuStorage::F64(self.split_values(contiguous(v, layout, "fused-rope-heads")?, shape)?),
            other => candle_core::bail!("fused-rope-heads: unsupported dtype {:?}", other.dtype()),
        })
    }

    fn split_values<T: Float + WithDType>(&self, x: &[T], shape: HeadsShape) -> candle_core::Result<Vec<T>> {
        let values = |t: &Tensor| t.flatten_all()?.to_vec1::<T>();
        let tables = self.tables().map(|(c, s)| Ok::<_, candle_core::Error>((values(c)?, values(s)?))).transpose()?;
        Ok(rope_heads_values(x, tables.as_ref().map(|(c, s)| (c.as_slice(), s.as_slice())), shape))
    }

    /// dx [b, t, n·d] from dy [b, n, t, d]: the inverse rotation, not tracked by autograd.
    pub fn input_gradient(&self, dy: &Tensor, shape: HeadsShape) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if dy.device().is_cuda() {
            return crate::kernels::cuda::rope::backward(dy, self.tables(), shape);
        }
        let dy = dy.detach();
        let back = match self.tables() {
            Some((cos, sin)) => {
                let half = shape.head_dim / 2;
                let d1 = dy.narrow(D::Minus1, 0, half)?;
                let d2 = dy.narrow(D::Minus1, half, half)?;
                let a = (d1.broadcast_mul(cos)? + d2.broadcast_mul(sin)?)?;
                let b = (d2.broadcast_mul(cos)? - d1.broadcast_mul(sin)?)?;
                Tensor::cat(&[a, b], D::Minus1)?
            }
            None => dy,
        };
        back.transpose(1, 2)?.reshape((shape.batch, shape.tokens, shape.heads * shape.head_dim))
    }
}

impl CustomOp1 for RopeHeads {
    fn name(&self) -> &'static str {
        "fused-rope-heads"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = self.shape_of(layout)?;
        Ok((self.cpu_split(storage, layout, s)?, Shape::from((s.batch, s.heads, s.tokens, s.head_dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &candle_core::CudaStorage, layout: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::kernels::cuda::rope::forward((storage, layout), self.tables(), self.shape_of(layout)?)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (b, t, width) = x.dims3()?;
        Ok(Some(self.input_gradient(dy, self.shape(b, t, width)?)?))
    }
}

/// A projection op whose backward does not read the op's output (only its inputs and what the
/// op saved), so [`ProjectedHeads`] may hand it the heads in that place.
pub trait OutputFreeBackward {}

impl OutputFreeBackward for FrozenMatmulT {}

/// A projection of x [b, t, in] (rows flattened or not) whose output goes straight into the
/// attention heads: the [b·t, n·d] product is a transient of the forward, moved into heads (and
/// rotated) by [`RopeHeads`] inside the op, so the graph holds the projection's inputs and the
/// heads (which attention holds anyway), not the product: for q, k and v a [tokens, hidden]
/// tensor each per layer. Backward: the heads' gradient moved back to [b·t, n·d], then the
/// projection's own backward.
pub struct ProjectedHeads<Op> {
    pub projection: Op,
    pub heads: RopeHeads,
    pub batch: usize,
}

impl<Op> ProjectedHeads<Op> {
    /// The split of the projection's output, of shape `product`.
    fn shape(&self, product: &Shape) -> candle_core::Result<HeadsShape> {
        let width = product.dims().last().copied().unwrap_or(1);
        let rows = product.elem_count() / width.max(1);
        if self.batch == 0 || !rows.is_multiple_of(self.batch) {
            candle_core::bail!("projected heads: {rows} rows are not a batch of {}", self.batch);
        }
        self.heads.shape(self.batch, rows / self.batch, width)
    }

    fn split_cpu(&self, (storage, product): (CpuStorage, Shape)) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = self.shape(&product)?;
        let layout = Layout::contiguous((s.batch, s.tokens, s.heads * s.head_dim));
        Ok((self.heads.cpu_split(&storage, &layout, s)?, Shape::from((s.batch, s.heads, s.tokens, s.head_dim))))
    }

    #[cfg(feature = "cuda")]
    fn split_cuda(&self, (storage, product): (candle_core::CudaStorage, Shape)) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let s = self.shape(&product)?;
        crate::kernels::cuda::rope::forward((&storage, &Layout::contiguous(product)), self.heads.tables(), s)
    }

    /// The gradient of the projection's output [b·t, n·d] from the heads'.
    fn product_gradient(&self, dy: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, t, d) = dy.dims4()?;
        let s = HeadsShape { batch: b, tokens: t, heads: n, head_dim: d };
        self.heads.input_gradient(dy, s)?.reshape((b * t, n * d))
    }
}

impl<Op: CustomOp1 + OutputFreeBackward> CustomOp1 for ProjectedHeads<Op> {
    fn name(&self) -> &'static str {
        self.projection.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.split_cpu(self.projection.cpu_fwd(s, l)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.split_cuda(self.projection.cuda_fwd(s, l)?)
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.projection.bwd(x, y, &self.product_gradient(dy)?)
    }
}

impl<Op: CustomOp3 + OutputFreeBackward> CustomOp3 for ProjectedHeads<Op> {
    fn name(&self) -> &'static str {
        self.projection.name()
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.split_cpu(self.projection.cpu_fwd(s1, l1, s2, l2, s3, l3)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.split_cuda(self.projection.cuda_fwd(s1, l1, s2, l2, s3, l3)?)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.projection.bwd(a, b, c, y, &self.product_gradient(dy)?)
    }
}

/// Each of the `n` groups of heads repeated: [b, h, t, d] to [b, h·n, t, d] (GQA).
pub fn repeat_heads(x: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, h, t, d) = x.dims4()?;
    x.unsqueeze(2)?.expand((b, h, n, t, d))?.reshape((b, h * n, t, d))
}

/// The attention core for training, flash-style: q [b, h, t, d], k and v [b, g, s, d] (h a
/// multiple of g: grouped-query attention, each key/value head serving h/g query heads), the
/// additive bias [b, 1, t, s] of `ops::attention_bias` (causal and padding) held by the op:
/// `o = softmax(q kᵀ · scale + bias) v`, returned with the heads merged, [b, t, h·d] (the
/// layout the output projection reads). Saves q, k, v, o (the graph's) and, in the op, the
/// per-row log-sum-exp `ℓ` [b, h, t, 1]; the [b, h, t, s] probabilities live only inside the
/// forward and are recomputed by the backward as `P = exp(q kᵀ · scale + bias − ℓ)`:
/// `dv = Pᵀ do`, `dP = do vᵀ`, `dS = P ⊙ (dP − rowsum(do ⊙ o))`, `dq = scale · dS k`,
/// `dk = scale · dSᵀ q` (dk and dv summed over each group).
pub struct Attention {
    pub bias: Tensor,
    pub scale: f64,
    /// The bias masks every key j > (s − t) + i of query row i: the flash kernels skip them.
    pub causal: bool,
    /// The CUDA kernels (`kernels::attention_kernel()` when built); heads over
    /// `attention::MAX_HEAD_DIM` take gemm whatever this says.
    pub kernel: crate::kernels::AttentionKernel,
    lse: OnceLock<Tensor>,
}

impl Attention {
    /// Any bias [b, 1, t, s].
    pub fn new(bias: Tensor, scale: f64) -> Self {
        Self { bias, scale, causal: false, kernel: crate::kernels::attention_kernel(), lse: OnceLock::new() }
    }

    /// The same op on the given CUDA kernels.
    pub fn on(self, kernel: crate::kernels::AttentionKernel) -> Self {
        Self { kernel, ..self }
    }

    /// The kernels that run heads of dimension `d`.
    #[cfg(feature = "cuda")]
    fn cuda_kernel(&self, d: usize) -> crate::kernels::AttentionKernel {
        if d > crate::kernels::cuda::attention::MAX_HEAD_DIM {
            crate::kernels::AttentionKernel::Gemm
        } else {
            self.kernel
        }
    }

    /// A bias that masks at least what `ops::attention_bias` masks (the keys after each row's
    /// own position).
    pub fn causal(bias: Tensor, scale: f64) -> Self {
        Self { causal: true, ..Self::new(bias, scale) }
    }

    /// The shapes of q, k, v and the bias checked against each other; returns q's dims.
    fn check(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (b, h, t, d) = l1.shape().dims4()?;
        let (bk, g, s, dk) = l2.shape().dims4()?;
        if bk != b || dk != d || g == 0 || !h.is_multiple_of(g) || l3.shape() != l2.shape() {
            candle_core::bail!("{}: q {:?}, k {:?}, v {:?} do not fit", self.name(), l1.shape(), l2.shape(), l3.shape());
        }
        if self.bias.dims() != [b, 1, t, s] {
            candle_core::bail!("{}: bias {:?} does not fit [{b}, 1, {t}, {s}]", self.name(), self.bias.dims());
        }
        Ok((b, h, t, d))
    }

    fn save_lse(&self, lse: Tensor) -> candle_core::Result<()> {
        if self.lse.set(lse).is_err() {
            candle_core::bail!("fused-attention: an op value is applied once");
        }
        Ok(())
    }

    fn scores(&self, q: &Tensor, k: &Tensor) -> candle_core::Result<Tensor> {
        (q * self.scale)?.matmul(&k.t()?)?.broadcast_add(&self.bias.to_dtype(q.dtype())?)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, t, d) = self.check(l1, l2, l3)?;
        let g = l2.dims()[1];
        let q = cpu_tensor(s1, l1, self.name())?;
        let k = repeat_heads(&cpu_tensor(s2, l2, self.name())?, h / g)?;
        let v = repeat_heads(&cpu_tensor(s3, l3, self.name())?, h / g)?;
        let scores = self.scores(&q, &k)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        drop(scores);
        let sum = e.sum_keepdim(D::Minus1)?;
        let o = e.broadcast_div(&sum)?.matmul(&v)?;
        drop(e);
        self.save_lse((max + sum.log()?)?)?;
        let o = o.transpose(1, 2)?.reshape((b, t, h * d))?;
        Ok((tensor_cpu_storage(&o)?, Shape::from((b, t, h * d))))
    }

    /// `kernels/attention.cu` (flash: the probabilities never leave the chip, head dim ≤ 128)
    /// or `kernels/attention_gemm.cu` (gemm: cuBLAS products around row kernels).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (_, _, _, d) = self.check(l1, l2, l3)?;
        let (o, lse) = match self.cuda_kernel(d) {
            crate::kernels::AttentionKernel::Flash => crate::kernels::cuda::attention::forward(&self.bias, self.scale, self.causal, (s1, l1), (s2, l2), (s3, l3))?,
            crate::kernels::AttentionKernel::Gemm => crate::kernels::cuda::attention_gemm::forward(&self.bias, self.scale, (s1, l1), (s2, l2), (s3, l3))?,
        };
        self.save_lse(lse)?;
        Ok(o)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.lse.get() else { candle_core::bail!("{}: backward before forward", self.name()) };
        let (q, k, v, o) = (q.detach(), k.detach(), v.detach(), o.detach());
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let dout = dout.detach();
            let (dq, dk, dv) = match self.cuda_kernel(q.dim(D::Minus1)?) {
                crate::kernels::AttentionKernel::Flash => crate::kernels::cuda::attention::backward(&self.bias, self.scale, self.causal, &q, &k, &v, &o, &dout, lse)?,
                crate::kernels::AttentionKernel::Gemm => crate::kernels::cuda::attention_gemm::backward(&self.bias, self.scale, &q, &k, &v, &o, &dout, lse)?,
            };
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let (b, h, t, d) = q.dims4()?;
        let (_, g, s, _) = k.dims4()?;
        let n = h / g;
        let heads = |x: &Tensor| x.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous();
        let (o, dout) = (heads(&o)?, heads(dout)?);
        let (kx, vx) = (repeat_heads(&k, n)?, repeat_heads(&v, n)?);
        let p = self.scores(&q, &kx)?.broadcast_sub(lse)?.exp()?;
        let dv = p.t()?.matmul(&dout)?;
        let dp = dout.matmul(&vx.t()?)?;
        let rowdot = (&dout * &o)?.sum_keepdim(D::Minus1)?;
        let ds = (p * dp.broadcast_sub(&rowdot)?)?;
        let dq = (ds.matmul(&kx)? * self.scale)?;
        let dk = (ds.t()?.matmul(&q)? * self.scale)?;
        let group = |x: Tensor| -> candle_core::Result<Tensor> {
            if n == 1 {
                Ok(x)
            } else {
                x.reshape((b, g, n, s, d))?.sum(2)
            }
        };
        Ok((Some(dq), Some(group(dk)?), Some(group(dv)?)))
    }
}

/// `x Wᵀ` with W a constant: x [..., in], W [out, in] held by the op as the layer holds it (an
/// NF4 base stays packed, dequantized in forward and again in backward). candle's matmul would
/// also compute and keep ∂L/∂W (an extra GEMM and an [in, out] tensor held until backward
/// ends); this op's backward gives only `dx = dy W`.
pub struct FrozenMatmulT {
    pub weight: BaseWeight,
}

/// `residual + x Wᵀ` with W constant: a frozen projection that only adds into the residual
/// stream (the attention's o_proj, the MLP's down_proj). As one node the graph holds x and the
/// residual, which it holds anyway, and not the projection's output, which no backward reads
/// (candle's add node would keep it: [tokens, hidden] a layer). Backward: `dx = dy W`, and dy
/// itself for the residual.
pub struct FrozenMatmulTAdd {
    pub projection: FrozenMatmulT,
}

impl CustomOp2 for FrozenMatmulTAdd {
    fn name(&self) -> &'static str {
        "frozen-matmul-t-add"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let product = self.projection.product(&cpu_tensor(s1, l1, self.name())?)?;
        let residual = cpu_tensor(s2, l2, self.name())?;
        if residual.shape() != product.shape() {
            candle_core::bail!("{}: residual {:?} for an output {:?}", self.name(), residual.dims(), product.dims());
        }
        let y = (residual + product)?;
        Ok((tensor_cpu_storage(&y)?, y.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::kernels::cuda::frozen_matmul_t_add(&*self.projection.dense()?, (s1, l1), (s2, l2))
    }

    fn bwd(&self, x: &Tensor, _residual: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = self.projection.bwd(x, y, dy)?;
        Ok((dx, Some(dy.detach())))
    }
}

/// `residual + (silu(g) ⊙ u) Wᵀ` with W constant: the MLP's SwiGLU and its frozen down_proj
/// adding into the residual, as one node. The graph holds g, u and the residual, which it holds
/// anyway (SwiGLU's backward reads g and u), and not the activation `silu(g) ⊙ u` [tokens,
/// intermediate] (86 MiB a LLaMA-7B layer at 4,096 tokens in bf16), a transient of the forward
/// that only the frozen projection read. Backward: `da = dy W`, then SwiGLU's backward of `da`,
/// and dy itself for the residual.
pub struct SwiGluProjectAdd {
    pub projection: FrozenMatmulTAdd,
}

/// The backward reads g, u and dy, never y.
impl OutputFreeBackward for SwiGluProjectAdd {}

impl CustomOp3 for SwiGluProjectAdd {
    fn name(&self) -> &'static str {
        "swiglu-frozen-matmul-t-add"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        u: &CpuStorage,
        lu: &Layout,
        residual: &CpuStorage,
        lr: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (activation, shape) = SwiGlu.cpu_fwd(g, lg, u, lu)?;
        self.projection.cpu_fwd(&activation, &Layout::contiguous(shape), residual, lr)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        lg: &Layout,
        u: &candle_core::CudaStorage,
        lu: &Layout,
        residual: &candle_core::CudaStorage,
        lr: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (activation, shape) = SwiGlu.cuda_fwd(g, lg, u, lu)?;
        self.projection.cuda_fwd(&activation, &Layout::contiguous(shape), residual, lr)
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _residual: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(da) = self.projection.projection.bwd(g, y, dy)? else {
            candle_core::bail!("{}: the projection gave no input gradient", self.name())
        };
        // SwiGLU's backward reads g, u and the gradient only (its output stands in unread).
        let (dg, du) = SwiGlu.bwd(g, u, y, &da.reshape(g.shape())?)?;
        Ok((dg, du, Some(dy.detach())))
    }
}

impl FrozenMatmulT {
    fn dense(&self) -> candle_core::Result<std::borrow::Cow<'_, Tensor>> {
        self.weight.dense().map_err(candle_core::Error::wrap)
    }

    /// `x Wᵀ` on the CPU, x [..., in].
    fn product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.dense()?;
        let (out, inp) = w.dims2()?;
        let dims = x.dims().to_vec();
        if dims.last() != Some(&inp) {
            candle_core::bail!("{}: x {:?} against W [{out}, {inp}]", self.name(), dims);
        }
        let rows = x.elem_count() / inp.max(1);
        let y = x.reshape((rows, inp))?.matmul(&w.to_dtype(x.dtype())?.t()?)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("x has a last dim") = out;
        y.reshape(out_dims)
    }
}

impl CustomOp1 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.product(&cpu_tensor(storage, layout, self.name())?)?;
        Ok((tensor_cpu_storage(&y)?, y.shape().clone()))
    }

    /// cuBLAS on the CUDA storage (f32 accumulation), W in x's dtype.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &candle_core::CudaStorage, layout: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::kernels::cuda::frozen_matmul_t(&*self.dense()?, storage, layout)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let w = self.dense()?;
        let out = w.dim(0)?;
        let rows = dy.elem_count() / out.max(1);
        let dx = dy.reshape((rows, out))?.matmul(&w.to_dtype(dy.dtype())?)?.reshape(x.shape())?;
        Ok(Some(dx))
    }
}

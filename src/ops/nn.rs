//! Differentiable building blocks of the LLaMA forward pass.
//!
//! candle-nn's fast `rms_norm`, `softmax_last_dim` and `rope` are custom ops without a backward
//! pass, so gradients would silently stop at them. Training goes through the formulations below,
//! made of ops that candle can differentiate; inference may take the fused ops (`train == false`).
//! Training on the CPU in f32/f64 takes the custom ops of `fused.rs` instead, which keep only what
//! their backward needs; the compositions here are their reference and the other devices' path.

use candle_core::{DType, Device, Tensor, D};

use crate::quant::BaseWeight;
use crate::Result;

/// The dtype reductions run in: f32 for half types, f64 kept as f64 (finite-difference tests).
pub(crate) fn accumulate_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Whether training takes the fused CPU ops of `fused.rs` (CPU, f32 or f64, the tensors given),
/// unless `--unfused` asks for the plain candle ops.
fn fused_cpu(train: bool, tensors: &[&Tensor]) -> bool {
    let Some(first) = tensors.first() else { return false };
    train && crate::ops::fused_for(first) && tensors.iter().all(|t| t.device().is_cpu() && t.dtype() == first.dtype())
}

/// RMSNorm as transformers computes it: normalise in f32, cast back, then scale.
/// Training takes the fused op (CPU: f32, f64; CUDA: `kernels/rms_norm.cu`), which keeps only
/// its input and a statistic per row.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64, train: bool) -> Result<Tensor> {
    if !train {
        return Ok(candle_nn::ops::rms_norm(x, weight, eps as f32)?);
    }
    if fused_cpu(train, &[x, weight]) || fused_cuda(train, &[x, weight]) {
        return Ok(x.contiguous()?.apply_op2(&weight.contiguous()?, super::fused::RmsNorm::new(eps))?);
    }
    rms_norm_reference(x, weight, eps)
}

/// LayerNorm over the last dimension, `(x − μ)/√(var + ε) ⊙ w + b`: candle-nn's fused op at
/// inference (it has no backward); in training the fused op on the CPU (f32, f64), which keeps
/// x and two statistics per row, else the composed ops.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64, train: bool) -> Result<Tensor> {
    if !train {
        return Ok(candle_nn::ops::layer_norm(&x.contiguous()?, weight, bias, eps as f32)?);
    }
    if fused_cpu(train, &[x, weight, bias]) {
        return Ok(x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, super::fused::LayerNorm::new(eps))?);
    }
    layer_norm_reference(x, weight, bias, eps)
}

/// The exact (erf) GELU, `x·Φ(x)`: in training on the CPU (f32, f64) the fused op, whose erf is
/// a polynomial within 1.5e-7 and whose backward is one pass; else candle's `gelu_erf`.
pub fn gelu_erf(x: &Tensor, train: bool) -> Result<Tensor> {
    if fused_cpu(train, &[x]) {
        return Ok(x.contiguous()?.apply_op1(super::fused::Gelu)?);
    }
    Ok(x.gelu_erf()?)
}

/// `residual + γ ⊙ (GELU(a) Wᵀ + b)` for a frozen dense W (the ViT's MLP after fc1): in training
/// on the CPU one op ([`super::fused::GeluProjectAdd`]) that keeps a and not GELU(a); else the
/// separate ops.
pub fn gelu_frozen_matmul_t_add(a: &Tensor, w: &BaseWeight, bias: &Tensor, scale: Option<&Tensor>, residual: &Tensor, train: bool) -> Result<Tensor> {
    let constants: Vec<&Tensor> = [Some(bias), scale].into_iter().flatten().collect();
    if fused_cpu(train, &[a, residual]) && matches!(w, BaseWeight::Dense(_)) && weight_fits(a, w) && constants.iter().all(|t| t.dtype() == a.dtype() && !t.track_op()) {
        let op = super::fused::GeluProjectAdd { projection: super::fused::FrozenMatmulT { weight: w.clone() }, bias: bias.clone(), scale: scale.cloned() };
        return Ok(a.contiguous()?.apply_op2(&residual.contiguous()?, op)?);
    }
    let branch = frozen_matmul_t(&gelu_erf(a, train)?, w)?.broadcast_add(bias)?;
    let branch = match scale {
        Some(g) => branch.broadcast_mul(g)?,
        None => branch,
    };
    Ok((residual + branch)?)
}

/// The differentiable LayerNorm as plain candle ops: the reference for the fused op.
pub fn layer_norm_reference(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(centred.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(weight)?.broadcast_add(bias)?)
}

/// Whether training on CUDA takes the ops of `fused.rs` (their kernels: `kernels/rms_norm.cu`,
/// `kernels/swiglu.cu`, cuBLAS): the graph then keeps what the CPU op keeps.
fn fused_cuda(train: bool, tensors: &[&Tensor]) -> bool {
    let Some(first) = tensors.first() else { return false };
    train && first.device().is_cuda() && crate::ops::fused_for(first) && tensors.iter().all(|t| t.device().same_device(first.device()) && t.dtype() == first.dtype())
}

/// The differentiable RMSNorm as plain candle ops: the reference for the fused op.
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(accumulate_dtype(dtype))?;
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?.to_dtype(dtype)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// Softmax over the last dimension, computed in f32 (f64 kept) and cast back to the input dtype.
/// Training on the CPU takes the fused op, which keeps only its input and output for backward.
pub fn softmax_last_dim(x: &Tensor, train: bool) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(accumulate_dtype(dtype))?;
    let p = match (train, xf.device()) {
        // The fused op's f32 rows take the vectorized exp (`ops::exp`).
        (_, Device::Cpu) if xf.dtype() == DType::F32 || train => xf.contiguous()?.apply_op1(super::fused::SoftmaxLastDim)?,
        (false, _) => candle_nn::ops::softmax_last_dim(&xf)?,
        (true, _) => softmax_last_dim_reference(&xf)?,
    };
    Ok(p.to_dtype(dtype)?)
}

/// The softmax as plain differentiable candle ops: the reference for the fused op.
pub fn softmax_last_dim_reference(x: &Tensor) -> Result<Tensor> {
    // The max is a constant shift: detaching it keeps the gradient exact and skips a backward op.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// SwiGLU's gate `silu(g) ⊙ u`. Training on the CPU (f32, f64) and on CUDA takes the fused op,
/// which keeps g and u only; so does inference in f32 on the CPU, for its vectorized exp.
pub fn swiglu(g: &Tensor, u: &Tensor, train: bool) -> Result<Tensor> {
    let cpu_f32 = !train && [g, u].iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32);
    if (cpu_f32 || fused_cpu(train, &[g, u]) || fused_cuda(train, &[g, u])) && g.shape() == u.shape() {
        return Ok(g.contiguous()?.apply_op2(&u.contiguous()?, super::fused::SwiGlu)?);
    }
    swiglu_reference(g, u)
}

/// The reference for the fused SwiGLU.
pub fn swiglu_reference(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    Ok((candle_nn::ops::silu(g)? * u)?)
}

/// How a projection's output enters attention: `count` heads [b, n, t, d], rotated by RoPE for
/// q and k (`rotation`: the cos and sin tables [b, 1, t, d/2] in the projection's dtype), not for v.
#[derive(Debug, Clone, Copy)]
pub struct AttentionHeads<'a> {
    pub count: usize,
    pub rotation: Option<(&'a Tensor, &'a Tensor)>,
}

impl<'a> AttentionHeads<'a> {
    pub fn rotated(count: usize, cos: &'a Tensor, sin: &'a Tensor) -> Self {
        Self { count, rotation: Some((cos, sin)) }
    }

    pub fn plain(count: usize) -> Self {
        Self { count, rotation: None }
    }

    /// Whether training takes the fused op for a projection output (or input) like `y`: on the
    /// CPU in f32 / f64, on CUDA (`kernels/rope.cu`), unless `--unfused`.
    pub fn fused(&self, y: &Tensor, train: bool) -> bool {
        let tensors = match self.rotation {
            Some((cos, sin)) => vec![y, cos, sin],
            None => vec![y],
        };
        fused_cpu(train, &tensors) || fused_cuda(train, &tensors)
    }

    fn op(&self) -> Result<super::fused::RopeHeads> {
        let rotation = self.rotation.map(|(c, s)| Ok::<_, crate::Error>((c.contiguous()?, s.contiguous()?))).transpose()?;
        Ok(super::fused::RopeHeads { heads: self.count, rotation })
    }

    /// y [b, t, n·d] as the heads, by an op of its own (the graph then holds y as its input).
    pub fn split(&self, y: &Tensor, train: bool) -> Result<Tensor> {
        if self.fused(y, train) {
            return Ok(y.contiguous()?.apply_op1(self.op()?)?);
        }
        self.split_reference(y)
    }

    /// The reference for the fused split: plain candle ops.
    pub fn split_reference(&self, y: &Tensor) -> Result<Tensor> {
        let (b, t, nd) = y.dims3()?;
        let n = self.count;
        let heads = y.reshape((b, t, n, nd / n))?.transpose(1, 2)?.contiguous()?;
        match self.rotation {
            Some((cos, sin)) => rope(&heads, cos, sin),
            None => Ok(heads),
        }
    }

    /// `projection`, an op on x [b, t, in] (rows flattened or not), followed by the split inside
    /// the same op ([`super::fused::ProjectedHeads`]): the graph never holds the projection's
    /// output. For the ops taken when [`AttentionHeads::fused`] holds.
    pub fn project<Op>(&self, x: &Tensor, projection: Op) -> Result<super::fused::ProjectedHeads<Op>> {
        let (batch, _, _) = x.dims3()?;
        Ok(super::fused::ProjectedHeads { projection, heads: self.op()?, batch })
    }
}

/// Causal attention `softmax(q kᵀ / √d + bias) v` with the heads merged: q [b, h, t, d], k and v
/// [b, g, s, d] (grouped-query: h a multiple of g), bias [b, 1, t, s] from `attention_bias`, or
/// any bias that masks every key j > (s − t) + i of query row i (the CUDA kernels skip those);
/// returns [b, t, h·d]. Training on the CPU (f32, f64) and on CUDA takes the fused op, which
/// keeps q, k, v, the output and a log-sum-exp per row, never the [b, h, t, s] probabilities.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, train: bool) -> Result<Tensor> {
    attention_scaled(q, k, v, bias, 1.0 / (q.dim(D::Minus1)? as f64).sqrt(), train)
}

/// `softmax(q kᵀ · scale + bias) v`, as `attention` (causal) but with the scale given (the nonlinear
/// controller mixes tokens with unscaled logits).
pub fn attention_scaled(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64, train: bool) -> Result<Tensor> {
    // Decoding on the CPU: a row at a time, masked keys skipped (`ops::attention_cpu`).
    if !train && !crate::ops::unfused() && super::attention_cpu::takes(q, k, v, bias) && q.dim(2)? <= super::attention_cpu::QUERIES_MAX {
        return super::attention_cpu::attention(q, k, v, bias, scale);
    }
    // Keys and values from a cache kept in another dtype than the queries (`set_kv_dtype`).
    let (k, v) = (&k.to_dtype(q.dtype())?, &v.to_dtype(q.dtype())?);
    // Prompts on the CPU in f32 take the training op's forward too: its blocks of query rows
    // skip the causally masked keys (`fused::attention_blocks`).
    let prompt = !train && q.dtype() == DType::F32 && fused_cpu(true, &[q, k, v, bias]);
    if prompt || fused_cpu(train, &[q, k, v, bias]) || fused_cuda_attention(train, q, k, v) {
        let op = super::fused::Attention::causal(bias.contiguous()?, scale);
        return Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?);
    }
    attention_composed(q, k, v, bias, scale, train)
}

/// Whether training takes the fused attention's CUDA kernels (one dtype for q, k, v), unless
/// `--unfused`; which kernels, flash or gemm, is `--attention-kernel`'s choice.
fn fused_cuda_attention(train: bool, q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    {
        train && q.device().is_cuda() && crate::ops::fused_for(q) && k.dtype() == q.dtype() && v.dtype() == q.dtype()
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (train, q, k, v);
        false
    }
}

/// The reference for the fused attention: plain candle ops (the softmax too).
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    attention_with(q, k, v, bias, scale, softmax_last_dim_reference)
}

/// Attention for inference, other devices and dtypes (the softmax in f32, fused where it can).
fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64, train: bool) -> Result<Tensor> {
    attention_with(q, k, v, bias, scale, |s| softmax_last_dim(s, train))
}

/// The attention composition with the given softmax.
fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
    softmax: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let n = h / k.dim(1)?;
    let (k, v) = (super::fused::repeat_heads(k, n)?, super::fused::repeat_heads(v, n)?);
    // Scaling q (t x hd) rather than the scores (t x t) saves a score-sized copy in training.
    let scores = (q * scale)?.matmul(&k.t()?)?.broadcast_add(bias)?;
    Ok(softmax(&scores)?.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h * d))?)
}

/// Whether the frozen ops take W with x: the same dtype and device, or a bf16 W under f32
/// activations on the CPU (`--dtype bf16` training's mixed precision, `ops::gemm_bf16`).
fn weight_fits(x: &Tensor, w: &BaseWeight) -> bool {
    let mixed = x.dtype() == DType::F32 && w.dtype() == DType::BF16 && x.device().is_cpu();
    (w.dtype() == x.dtype() || mixed) && w.device().same_device(x.device())
}

/// `x Wᵀ` for a frozen W [out, in] (the LM head, every frozen linear): when x is tracked, an op
/// whose backward computes only dx, where candle's matmul would also compute and keep an unused
/// ∂L/∂W (an extra GEMM and an [out, in] gradient per layer until backward ends), and which holds
/// W as given (an NF4 base stays packed between forward and backward, dequantized in each). On
/// the CPU in f32 / f64, and on CUDA through cuBLAS (unless `--unfused`).
pub fn frozen_matmul_t(x: &Tensor, w: &BaseWeight) -> Result<Tensor> {
    let fits = weight_fits(x, w);
    // A bf16 base under f32 activations takes the op untracked too: it holds the mixed product.
    if (x.track_op() || w.dtype() != x.dtype()) && fits && crate::ops::fused_for(x) {
        return Ok(x.contiguous()?.apply_op1(super::fused::FrozenMatmulT { weight: w.clone() })?);
    }
    if let BaseWeight::Dense(dense) = w {
        if super::matmul_bf16::takes(x, dense) {
            return super::matmul_bf16::matmul_tensor(x, dense);
        }
    }
    // W in x's dtype: a bf16 base under f32 x with `--unfused` comes here.
    matmul_t(x, &w.dense()?.to_dtype(x.dtype())?)
}

/// `x Wᵀ` for a frozen W, split into attention heads: in training one op (the frozen matmul with
/// the split inside, [`super::fused::ProjectedHeads`]) whose node holds x and the heads, not the
/// [b, t, out] product that a separate split would keep as its input.
pub fn frozen_matmul_t_heads(x: &Tensor, w: &BaseWeight, heads: AttentionHeads, train: bool) -> Result<Tensor> {
    let fits = weight_fits(x, w);
    if fits && heads.fused(x, train) {
        let op = heads.project(x, super::fused::FrozenMatmulT { weight: w.clone() })?;
        return Ok(x.contiguous()?.apply_op1(op)?);
    }
    heads.split(&frozen_matmul_t(x, w)?, train)
}

/// `residual + x Wᵀ` for a frozen W: the projections that only add into the residual stream.
/// In training, one op ([`super::fused::FrozenMatmulTAdd`]) whose graph node holds x and the
/// residual but not the [.., out] product, which candle's add node would keep until backward.
pub fn frozen_matmul_t_add(x: &Tensor, w: &BaseWeight, residual: &Tensor) -> Result<Tensor> {
    let fits = weight_fits(x, w) && residual.dtype() == x.dtype();
    if (x.track_op() || residual.track_op()) && fits && crate::ops::fused_for(x) {
        let op = super::fused::FrozenMatmulTAdd { projection: super::fused::FrozenMatmulT { weight: w.clone() } };
        return Ok(x.contiguous()?.apply_op2(&residual.contiguous()?, op)?);
    }
    Ok((residual + frozen_matmul_t(x, w)?)?)
}

/// `residual + (silu(g) ⊙ u) Wᵀ` for a frozen W: the MLP's gate and its frozen down_proj. In
/// training one op ([`super::fused::SwiGluProjectAdd`]) that does not keep the activation
/// [.., intermediate] for backward, where the separate ops would (as the projection's input).
pub fn swiglu_frozen_matmul_t_add(g: &Tensor, u: &Tensor, w: &BaseWeight, residual: &Tensor, train: bool) -> Result<Tensor> {
    if swiglu_project_add_fuses(g, u, w, residual, train) {
        return Ok(g.contiguous()?.apply_op3(&u.contiguous()?, &residual.contiguous()?, swiglu_project_add(w))?);
    }
    frozen_matmul_t_add(&swiglu(g, u, train)?, w, residual)
}

/// [`swiglu_frozen_matmul_t_add`] in a graph that is only backpropagated through, never read:
/// the same gradients, but the forward runs neither the GEMM nor an NF4 base's dequantization,
/// and the output is zeros ([`crate::ops::BackwardOnly`]). Where the fused op does not
/// apply, the whole computation.
pub fn swiglu_frozen_matmul_t_add_backward_only(g: &Tensor, u: &Tensor, w: &BaseWeight, residual: &Tensor, train: bool) -> Result<Tensor> {
    if swiglu_project_add_fuses(g, u, w, residual, train) {
        let op = crate::ops::BackwardOnly::new(swiglu_project_add(w), residual.dims(), g)?;
        return Ok(g.contiguous()?.apply_op3(&u.contiguous()?, &residual.contiguous()?, op)?);
    }
    swiglu_frozen_matmul_t_add(g, u, w, residual, train)
}

fn swiglu_project_add_fuses(g: &Tensor, u: &Tensor, w: &BaseWeight, residual: &Tensor, train: bool) -> bool {
    let fits = weight_fits(g, w) && g.shape() == u.shape();
    fits && (fused_cpu(train, &[g, u, residual]) || fused_cuda(train, &[g, u, residual]))
}

fn swiglu_project_add(w: &BaseWeight) -> super::fused::SwiGluProjectAdd {
    super::fused::SwiGluProjectAdd { projection: super::fused::FrozenMatmulTAdd { projection: super::fused::FrozenMatmulT { weight: w.clone() } } }
}

/// Rotary embedding in the Hugging Face ("rotate half") layout.
/// `x`: [b, heads, t, head_dim]; `cos`, `sin`: [b, 1, t, head_dim / 2] in x's dtype.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Ok(Tensor::cat(&[a, b], D::Minus1)?)
}

/// Additive attention bias [b, 1, t, past + t]: 0 where query i may attend key j (causal and not
/// padding), a large negative number elsewhere. `mask` is [b, past + t] with 1 for real tokens.
/// A padding query attends to itself only: with every key masked its softmax would be a uniform
/// average over the whole row, which leaks later tokens into the loss term that the last pad
/// position carries (it predicts the first real token) and whose gradient disagrees with the
/// forward, since the scores vanish against the mask value.
pub fn attention_bias(mask: &[Vec<u32>], t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let b = mask.len();
    let total = mask.first().map_or(t, Vec::len);
    let past = total - t;
    let neg = match dtype {
        DType::F16 => -65504.0f32,
        _ => -1e30f32,
    };
    let mut data = vec![0f32; b * t * total];
    for (row, m) in mask.iter().enumerate() {
        for i in 0..t {
            for (j, &keep) in m.iter().enumerate() {
                let own = j == past + i;
                let pad_query = m[past + i] == 0;
                if j > past + i || (keep == 0 && !(own && pad_query)) {
                    data[(row * t + i) * total + j] = neg;
                }
            }
        }
    }
    Ok(Tensor::from_vec(data, (b, 1, t, total), device)?.to_dtype(dtype)?)
}

/// Positions of the last `t` tokens of each row, counting only real tokens (as `generate` does
/// for left-padded batches), so that a padded row sees the positions it would see alone.
pub fn positions(mask: &[Vec<u32>], t: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(mask.len() * t);
    for m in mask {
        // Number of real tokens strictly before each position; pads get 0.
        let pos: Vec<u32> = m
            .iter()
            .scan(0u32, |seen, &keep| {
                let p = if keep == 0 { 0 } else { *seen };
                *seen += keep.min(1);
                Some(p)
            })
            .collect();
        out.extend_from_slice(&pos[m.len() - t..]);
    }
    out
}

/// Mean cross-entropy over the labels that are not -100. `logits`: [n, vocab]; `labels`: [n] i64.
/// On the CPU the fused op (unless `--unfused`) keeps only the logits for backward.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    // Counted on the host: one small copy, where the device count would also wait for the device.
    let count = labelled_count(&labels.flatten_all()?.to_vec1::<i64>()?)?;
    let logits = logits.to_dtype(accumulate_dtype(logits.dtype()))?;
    let total = if logits.device().is_cpu() && crate::ops::fused_for(&logits) {
        logits.contiguous()?.apply_op2(&labels.contiguous()?, super::fused::CrossEntropyRows)?.sum_all()?
    } else {
        cross_entropy_sum_reference(&logits, labels)?
    };
    Ok((total / count as f64)?)
}

/// How many labels carry a loss (are not -100); an error when none does.
pub(crate) fn labelled_count(labels: &[i64]) -> Result<usize> {
    match labels.iter().filter(|&&l| l >= 0).count() {
        0 => Err(crate::Error::Training("every label of the batch is -100: nothing to learn from".into())),
        count => Ok(count),
    }
}

/// The summed cross-entropy as plain differentiable candle ops: the reference for the fused op.
pub fn cross_entropy_sum_reference(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let keep = labels.ge(0i64)?;
    let safe = keep.where_cond(labels, &labels.zeros_like()?)?.to_dtype(DType::U32)?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = logp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok((picked * keep.to_dtype(logits.dtype())?)?.sum_all()?.neg()?)
}

/// `x Mᵀ` for x [..., in] and M [out, in], flattening the leading dims into one GEMM.
pub fn matmul_t(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner.max(1);
    let y = x.reshape((rows, inner))?.matmul(&m.t()?)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("matmul_t needs at least one dim") = m.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

/// A trainable tensor drawn from U(-bound, bound), f32, from a seeded generator.
pub fn uniform_var(shape: &[usize], bound: f64, rng: &mut rand::rngs::StdRng, device: &Device) -> Result<candle_core::Var> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rand::Rng::random_range(rng, -bound..bound) as f32).collect();
    Ok(candle_core::Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(device)?)?)
}

/// `x Wᵀ` for a frozen W as training runs it when x is tracked: the op whose backward computes
/// dx only (the bench's frozen linear, whatever `--unfused` says).
pub fn frozen_matmul_t_op(x: &Tensor, w: &BaseWeight) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(super::fused::FrozenMatmulT { weight: w.clone() })?)
}

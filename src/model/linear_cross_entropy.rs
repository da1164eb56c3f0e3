//! The causal-LM loss straight from the final hidden states, a block of rows at a time:
//!
//! `loss = (1/n_kept) Σ_i keep_i · (lse(z_i) − z_{i,y_i})`, `z = h Wᵀ` (h [n, hidden], W the
//! frozen LM head [vocab, hidden], keep_i = 1 where y_i ≠ -100).
//!
//! Why: built as logits then a loss, autograd holds the [n, vocab] logits several times over (at
//! LLaMA-2-7B, batch 16 x 256: 4,080 x 32,000 in f32 is 498 MiB a copy; the CUDA emulator counted
//! eleven of them at the step's peak, 5.4 GiB, more than the NF4 model itself). W is frozen, so
//! the only gradient is the one of h, `dh = ((softmax(z) − onehot(y)) ⊙ keep / n_kept) W`, and it
//! is computed in the same pass, block by block, as Liger Kernel's fused linear cross-entropy
//! does (Hsu et al., "Liger Kernel", 2024, arXiv:2410.10989). What lives past the forward is dh
//! ([n, hidden], in h's dtype); backward only scales it by the incoming gradient. Each block's
//! logits hold at most `BLOCK_LOGITS` values. The math per block is the one of `ops::nn::cross_entropy`
//! (logits in f32 for bf16 / f16 models, the max subtracted before exp), which the tests compare
//! it with, values and gradients.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};

use crate::ops::fused::{CrossEntropyRows, SoftmaxLastDim};
use crate::ops::nn::{accumulate_dtype, labelled_count};
use crate::error::{Error, Result};

/// Logits per block: 16 M values, 64 MiB in f32 (LLaMA-2's vocabulary: 524 rows a block).
const BLOCK_LOGITS: usize = 1 << 24;

/// The mean cross-entropy of `labels` ([n] i64, -100 = no loss) under `hidden` [n, hidden]
/// projected by the frozen `head` [vocab, hidden]; a scalar in f32 (f64 for f64 models).
pub fn linear_cross_entropy(hidden: &Tensor, head: &Tensor, labels: &Tensor) -> Result<Tensor> {
    linear_cross_entropy_in_blocks(hidden, head, labels, BLOCK_LOGITS)
}

/// [`linear_cross_entropy`] with blocks of at most `block_logits` logits (tests use small ones).
pub fn linear_cross_entropy_in_blocks(hidden: &Tensor, head: &Tensor, labels: &Tensor, block_logits: usize) -> Result<Tensor> {
    let (n, width) = hidden.dims2()?;
    let (vocab, head_width) = head.dims2()?;
    if head_width != width {
        return Err(Error::msg(format!("linear_cross_entropy: hidden states of width {width}, LM head of width {head_width}")));
    }
    // Read on the host: the count is needed before any block, and a bad label is an error
    // that names its row rather than an out-of-bounds gather on the device.
    let host_labels = labels.flatten_all()?.to_vec1::<i64>()?;
    if host_labels.len() != n {
        return Err(Error::msg(format!("linear_cross_entropy: {n} rows of hidden states but {} labels", host_labels.len())));
    }
    if let Some((row, &label)) = host_labels.iter().enumerate().find(|&(_, &l)| l >= vocab as i64 || (l < 0 && l != -100)) {
        return Err(Error::Training(format!("label {label} at row {row} is outside the vocabulary of {vocab} (and is not -100)")));
    }
    let count = labelled_count(&host_labels)?;
    let acc = accumulate_dtype(hidden.dtype());
    let needs_grad = hidden.track_op();
    let x = hidden.detach();
    let rows_per_block = (block_logits / vocab.max(1)).clamp(1, n.max(1));
    let mut loss_sum: Option<Tensor> = None;
    let mut grads = Vec::new();
    for start in (0..n).step_by(rows_per_block) {
        let len = rows_per_block.min(n - start);
        let y = labels.narrow(0, start, len)?.contiguous()?;
        // A bf16 head under f32 hidden states (mixed precision) takes the bf16 kernel.
        let logits = crate::ops::frozen_x_wt(&x.narrow(0, start, len)?.contiguous()?, head)?.to_dtype(acc)?;
        let (nll_sum, dlogits) = block_loss_and_grad(&logits, &y, 1.0 / count as f64, needs_grad)?;
        loss_sum = Some(match loss_sum {
            Some(s) => (s + nll_sum)?,
            None => nll_sum,
        });
        if let Some(dz) = dlogits {
            grads.push(crate::ops::frozen_dy_w(&dz.to_dtype(hidden.dtype())?, head)?);
        }
    }
    let loss = (loss_sum.expect("n > 0: at least one block") / count as f64)?;
    if !needs_grad {
        return Ok(loss);
    }
    let grad = Tensor::cat(&grads, 0)?;
    Ok(hidden.apply_op2(&loss, PrecomputedGradient { grad })?)
}

/// One block: the summed negative log-likelihood of the kept rows (a scalar) and, when asked,
/// `dz = (softmax(z) − onehot(y)) ⊙ keep · scale`.
fn block_loss_and_grad(logits: &Tensor, labels: &Tensor, scale: f64, with_grad: bool) -> Result<(Tensor, Option<Tensor>)> {
    let keep = labels.ge(0i64)?;
    let safe = keep.where_cond(labels, &labels.zeros_like()?)?.to_dtype(DType::U32)?.unsqueeze(1)?;
    let keep = keep.to_dtype(logits.dtype())?;
    // On the CPU (f32, f64) the fused row ops of `fused.rs`, elsewhere the same math in candle ops.
    let cpu_fused = logits.device().is_cpu() && crate::ops::fused_for(logits);
    let (nll_sum, probabilities) = if cpu_fused {
        let nll = logits.apply_op2_no_bwd(labels, &CrossEntropyRows)?;
        (nll.sum_all()?, with_grad.then(|| logits.apply_op1_no_bwd(&SoftmaxLastDim)).transpose()?)
    } else {
        let shifted = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
        let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        let nll = (log_sum.broadcast_sub(&shifted.gather(&safe, 1)?)?.squeeze(1)? * &keep)?;
        (nll.sum_all()?, with_grad.then(|| shifted.broadcast_sub(&log_sum)?.exp()).transpose()?)
    };
    let Some(p) = probabilities else { return Ok((nll_sum, None)) };
    let weight = (keep * scale)?.unsqueeze(1)?;
    let dz = p.broadcast_mul(&weight)?.scatter_add(&safe, &weight.neg()?, 1)?;
    Ok((nll_sum, Some(dz)))
}

/// Returns its second input (the loss) and sends `grad` · dloss to its first (the hidden states).
struct PrecomputedGradient {
    grad: Tensor,
}

impl CustomOp2 for PrecomputedGradient {
    fn name(&self) -> &'static str {
        "linear-cross-entropy"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, loss: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((loss.try_clone(layout)?, layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        loss: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        Ok((loss.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor, dloss: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.grad.broadcast_mul(&dloss.to_dtype(self.grad.dtype())?)?), None))
    }
}

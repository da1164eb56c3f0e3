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
//! tests run in f64). The compositions in `ops::nn` are the reference these are tested against
//! (`tests/fused_ops.rs`), and the fallback on other devices and dtypes. On CUDA (all dtypes the
//! kernels take): the attention core (`kernels/attention.cu`), RMSNorm (`kernels/rms_norm.cu`),
//! SwiGLU (`kernels/swiglu.cu`), the heads split (`kernels/rope.cu`) and the frozen matmuls
//! (cuBLAS); `selftest` checks each against this CPU op in f64.
//!
//! One file an op: `softmax`, `cross_entropy`, `rms_norm`, `layer_norm` and `gelu` (CPU only), `swiglu`, `heads`, `attention` (on the CPU in f32 by
//! `attention_blocks`), `frozen_matmul`.

mod softmax;
mod cross_entropy;
pub mod rms_norm;
pub mod layer_norm;
pub mod gelu;
pub mod swiglu;
pub mod heads;
pub mod attention;
pub mod attention_blocks;
pub mod frozen_matmul;

pub use attention::{repeat_heads, Attention};
pub use cross_entropy::CrossEntropyRows;
pub use frozen_matmul::{FrozenMatmulT, FrozenMatmulTAdd, GeluProjectAdd, SwiGluProjectAdd};
pub use heads::{HeadsShape, OutputFreeBackward, ProjectedHeads, RopeHeads};
pub use rms_norm::RmsNorm;
pub use layer_norm::LayerNorm;
pub use gelu::Gelu;
pub use softmax::SoftmaxLastDim;
pub use swiglu::SwiGlu;

use candle_core::Layout;

pub(crate) fn contiguous<'a, T>(v: &'a [T], layout: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("{what}: the input must be contiguous"),
    }
}

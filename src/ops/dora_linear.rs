//! The DoRA linear (Liu et al., ICML 2024; PEFT ≥ 0.12 semantics, see `adapters::lora::dora`) as one
//! op with its own backward. With `k = m / ‖W + s·B A‖` per output row (the norm detached):
//!
//! ```text
//! forward    b  = x Wᵀ,  b_d = drop(x) Wᵀ (b itself without dropout)      [T, out]
//!            u  = drop(x) Aᵀ                                             [T, r]   kept
//!            q  = b_d + s · u Bᵀ                                         [T, out] kept
//!            y  = b + (k − 1) ⊙ b_d + k ⊙ s · u Bᵀ                       (PEFT's order of terms)
//! backward   dq = k ⊙ dy,  g = dq B                                      [T, r]
//!            dk = Σ_t dy ⊙ q                                             [out]
//!            dx = dq W + s · g A                                         (no dropout)
//!            dx = dy W + mask ⊙ ((dq − dy) W + s · g A)                  (dropout: b_d gets (k − 1) ⊙ dy)
//!            dA = s · gᵀ drop(x),  dB = s · dqᵀ u
//! ```
//!
//! What it keeps for backward: its inputs (x, A and B packed in one vector, k), the dropout
//! mask's seed (the mask is drawn again in backward), u and q: one [T, out] tensor. The same
//! math in plain candle ops keeps about six (every node of candle's graph holds its inputs: the
//! base output, the dropped base output, the branch before and after scaling, both products with
//! k and the sums). The forward and backward are candle ops on whatever device x lives on
//! (cuBLAS on CUDA); the op only decides what outlives the forward.
//!
//! Layout: x [T, in], W [out, in], A [r, in], B [out, r], k [out], mask [T, in]; row-major, one
//! dtype (A, B and k cast to x's dtype by the caller, as autocast would).

use std::sync::Mutex;

use candle_core::{CustomOp3, Tensor};

use super::{join_factors, split_factors, Precomputed};
use crate::ops::dropout::DropoutMask;
use crate::quant::BaseWeight;
use crate::ops::fused::OutputFreeBackward;
use crate::ops::nn::{accumulate_dtype, AttentionHeads};
use crate::Result;
use crate::selftest::Case;

/// `x Wᵀ + (k − 1) ⊙ (drop(x) Wᵀ) + k ⊙ s · (drop(x) Aᵀ) Bᵀ` for x [..., in], as one op with
/// its own backward; gradients reach x, A, B and k.
pub fn dora_linear(x: &Tensor, w: &BaseWeight, a: &Tensor, b: &Tensor, k: &Tensor, scale: f64, mask: Option<DropoutMask>) -> Result<Tensor> {
    let (x2, ab, op) = dora_linear_op(x, w, a, b, k, scale, mask)?;
    let y = x2.apply_op3(&ab, &k.contiguous()?, op)?;
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("checked by dora_linear_op") = y.dim(1)?;
    Ok(y.reshape(out_dims)?)
}

/// [`dora_linear`] of x [b, t, in] with its output split into attention `heads` inside the op
/// ([`crate::ops::fused::ProjectedHeads`]): the [b, t, out] output is not kept for backward.
pub fn dora_linear_heads(
    x: &Tensor,
    w: &BaseWeight,
    (a, b, k): (&Tensor, &Tensor, &Tensor),
    scale: f64,
    mask: Option<DropoutMask>,
    heads: AttentionHeads,
) -> Result<Tensor> {
    let (x2, ab, op) = dora_linear_op(x, w, a, b, k, scale, mask)?;
    Ok(x2.apply_op3(&ab, &k.contiguous()?, heads.project(x, op)?)?)
}

/// x as [T, in], A and B as the op's one argument, and the op with its output computed.
fn dora_linear_op(
    x: &Tensor,
    w: &BaseWeight,
    a: &Tensor,
    b: &Tensor,
    k: &Tensor,
    scale: f64,
    mask: Option<DropoutMask>,
) -> Result<(Tensor, Tensor, DoraLinearOp)> {
    let d_in = *x.dims().last().ok_or_else(|| crate::Error::msg("dora_linear: x is a scalar"))?;
    let &[d_out, w_in] = w.dims() else {
        return Err(crate::Error::msg(format!("dora_linear: W {:?} is not a matrix", w.dims())));
    };
    let (r, a_in) = a.dims2()?;
    if w_in != d_in || a_in != d_in || b.dims() != [d_out, r] || k.dims() != [d_out] {
        return Err(crate::Error::msg(format!(
            "dora_linear: x {:?}, W {:?}, A {:?}, B {:?}, k {:?} do not fit together",
            x.dims(),
            w.dims(),
            a.dims(),
            b.dims(),
            k.dims()
        )));
    }
    let x2 = x.contiguous()?.reshape(((), d_in))?;
    let w = match w {
        BaseWeight::Dense(t) => BaseWeight::Dense(t.contiguous()?.detach()),
        nf4 => nf4.clone(),
    };
    let op = DoraLinearOp { w, scale, rank: r, mask, saved: Mutex::new(None), y: Precomputed::new(None) };
    let y = op.forward(&x2.detach(), &a.detach(), &b.detach(), &k.detach())?;
    op.y.set(y);
    // A and B travel as one argument (a custom op takes three); candle's cat routes dA and dB back.
    let ab = join_factors(a, b)?;
    Ok((x2, ab, op))
}

struct DoraLinearOp {
    w: BaseWeight,
    scale: f64,
    rank: usize,
    mask: Option<DropoutMask>,
    /// (u, q), written by the forward for the backward, in x's dtype.
    saved: Mutex<Option<(Tensor, Tensor)>>,
    /// The output, computed before the op is applied; the op's forward hands it to candle and
    /// lets it go (the op lives as long as the graph).
    y: Precomputed,
}

impl DoraLinearOp {
    /// W as stored (a bf16 W under f32 x stays bf16: the products take it as it is,
    /// `ops::frozen_x_wt` / `frozen_dy_w`).
    fn dense_w(&self) -> candle_core::Result<Tensor> {
        Ok(self.w.dense().map_err(candle_core::Error::wrap)?.into_owned())
    }

    /// y, saving u and q; x [T, in], a [r, in], b [out, r], k [out], on any device.
    fn forward(&self, x: &Tensor, a: &Tensor, b: &Tensor, k: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let acc = accumulate_dtype(dtype);
        let w = self.dense_w()?;
        let mask = self.mask_like(x)?;
        let (x, a, b, k) = (x.to_dtype(acc)?, a.to_dtype(acc)?, b.to_dtype(acc)?, k.to_dtype(acc)?.unsqueeze(0)?);
        let base = super::frozen_x_wt(&x, &w)?;
        let (xd, base_d) = match mask {
            Some(m) => {
                let xd = (&x * m.to_dtype(acc)?)?;
                let bd = super::frozen_x_wt(&xd, &w)?;
                (xd, bd)
            }
            None => (x, base.clone()),
        };
        let u = xd.matmul(&a.t()?)?;
        let branch = (u.matmul(&b.t()?)? * self.scale)?;
        let y = ((&base + base_d.broadcast_mul(&(&k - 1.0)?)?)? + branch.broadcast_mul(&k)?)?;
        let q = (base_d + branch)?;
        *self.saved.lock().expect("saved lock") = Some((u.to_dtype(dtype)?, q.to_dtype(dtype)?));
        y.to_dtype(dtype)?.contiguous()
    }

    /// The dropout mask for x, in x's dtype (as the unfused path multiplies by it).
    fn mask_like(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.mask.map(|m| m.tensor(x)).transpose().map_err(candle_core::Error::wrap)
    }
}

/// The backward reads x, A, B, k and the saved (u, q), never y.
impl OutputFreeBackward for DoraLinearOp {}

impl CustomOp3 for DoraLinearOp {
    fn name(&self) -> &'static str {
        "fused-dora-linear"
    }

    precomputed_forward3!(y);

    fn bwd(&self, x: &Tensor, ab: &Tensor, k: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().expect("saved lock").clone();
        let Some((u, q)) = saved else { candle_core::bail!("fused-dora-linear: backward before forward") };
        let dtype = x.dtype();
        let acc = accumulate_dtype(dtype);
        let mask = self.mask_like(x)?;
        // Detached: gradients that carry a graph would keep this step's tensors alive.
        let (x, ab, k, dy) = (x.detach().to_dtype(acc)?, ab.detach().to_dtype(acc)?, k.detach().to_dtype(acc)?, dy.detach().to_dtype(acc)?);
        let (u, q) = (u.to_dtype(acc)?, q.to_dtype(acc)?);
        let (d_in, d_out, r) = (x.dim(1)?, q.dim(1)?, self.rank);
        let (a, b) = split_factors(&ab, r, d_in, d_out)?;
        let w = self.dense_w()?;
        let dq = dy.broadcast_mul(&k.unsqueeze(0)?)?;
        let dk = (&dy * &q)?.sum(0)?;
        let g = dq.matmul(&b)?;
        let lowrank = (g.matmul(&a)? * self.scale)?;
        let (dx, xd) = match mask {
            None => ((super::frozen_dy_w(&dq, &w)? + lowrank)?, x),
            Some(m) => {
                let m = m.to_dtype(acc)?;
                let dropped = (super::frozen_dy_w(&(&dq - &dy)?, &w)? + lowrank)?;
                ((super::frozen_dy_w(&dy, &w)? + (dropped * &m)?)?, (x * m)?)
            }
        };
        let da = (g.t()?.matmul(&xd)? * self.scale)?;
        let db = (dq.t()?.matmul(&u)? * self.scale)?;
        let dab = join_factors(&da, &db)?;
        Ok((Some(dx.to_dtype(dtype)?), Some(dab.to_dtype(dtype)?), Some(dk.to_dtype(dtype)?)))
    }
}

// The op on a device against its CPU reference (`candle-peft selftest`).

/// The DoRA linear (its row scale k a fourth input), without and with dropout.
pub fn selftest(c: &mut Case) -> Result<()> {
    super::lora_linear::linear_case(c, true, false)?;
    super::lora_linear::linear_case(c, true, true)
}

#[cfg(test)]
mod selftest_tests {
    use super::*;

    /// The checks run and pass with the CPU on both sides, so a failure on a GPU is the kernel's.
    #[test]
    fn the_selftest_checks_pass_on_the_cpu_reference() {
        crate::selftest::passes_on_the_cpu(selftest, 5 + 5);
    }
}

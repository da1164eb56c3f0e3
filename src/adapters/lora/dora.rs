//! DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024), with the
//! semantics of PEFT ≥ 0.12 (docs/METHODS.md §2.7 b).
//!
//! `V = W + s·B A`, `n = ‖V‖` per output row, detached (not differentiated), magnitude `m` [out]
//! initialised to `‖W‖` (B = 0 at init, so `‖V‖ = ‖W‖`):
//! `y = x Wᵀ + (m/n − 1) ⊙ (drop(x) Wᵀ) + (m/n) ⊙ s·(drop(x) Aᵀ) Bᵀ`.
//! Merged: `W' = (m/n) ⊙ V`. PEFT's key for m: `lora_magnitude_vector`.

use std::sync::Mutex;

use candle_core::{DType, Tensor, Var, D};
use rand::rngs::StdRng;

use crate::adapters::lora::{LoraConfig, LoraLinear};
use crate::ops;
use crate::ops::nn::AttentionHeads;
use crate::model::{FrozenLinear, LinearAdapter};
use crate::Result;

pub struct DoraLinear {
    lora: LoraLinear,
    pub magnitude: Var,
    /// The row norms used by the last merge, needed to undo it.
    merged_norm: Mutex<Option<Tensor>>,
}

impl DoraLinear {
    pub fn new(base: &FrozenLinear, cfg: &LoraConfig, rng: &mut StdRng) -> Result<Self> {
        let lora = LoraLinear::new(base, cfg, rng)?;
        let magnitude = Var::from_tensor(&row_norm(&base.weight()?.to_dtype(DType::F32)?)?)?;
        Ok(Self { lora, magnitude, merged_norm: Mutex::new(None) })
    }

    /// `‖W + s·B A‖` per output row, in f32, detached. On CUDA a kernel computes it without
    /// forming `W + s·B A` (src/ops/row_norms.rs).
    fn weight_norm(&self, w: &Tensor) -> Result<Tensor> {
        if w.device().is_cuda() && ops::fused_for(w) {
            return ops::row_norms(w, &self.lora.b.as_tensor().detach(), &self.lora.a.as_tensor().detach(), self.lora.scale);
        }
        let v = (w.to_dtype(DType::F32)? + self.lora.delta_weight(DType::F32)?.detach())?;
        Ok(row_norm(&v)?.detach())
    }
}

fn row_norm(w: &Tensor) -> Result<Tensor> {
    Ok(w.sqr()?.sum(D::Minus1)?.sqrt()?)
}

impl LinearAdapter for DoraLinear {
    /// One op (src/ops/dora_linear.rs) on CUDA and in CPU training, which keeps one [T, out]
    /// tensor for backward; plain candle ops otherwise (and with `--unfused`).
    fn forward(&self, x: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor> {
        let scale = (self.magnitude.as_tensor() / self.weight_norm(&*base.weight()?)?)?.to_dtype(x.dtype())?;
        if ops::fused_forward(x, train) {
            let a = self.lora.a.as_tensor().to_dtype(x.dtype())?;
            let b = self.lora.b.as_tensor().to_dtype(x.dtype())?;
            return ops::dora_linear(x, base.base_weight(), &a, &b, &scale, self.lora.scale, self.lora.dropout_mask(train));
        }
        let base_out = base.forward(x)?;
        let dropped = self.lora.dropout(x, train)?;
        // Without active dropout, drop(x) Wᵀ is the base output itself.
        let dropped_base = if train && self.lora.dropout_active() { base.forward(&dropped)? } else { base_out.clone() };
        let ones = scale.ones_like()?;
        let correction = dropped_base.broadcast_mul(&(scale.clone() - ones)?)?;
        let lora = self.lora.branch(&dropped)?.broadcast_mul(&scale)?;
        Ok(((base_out + correction)? + lora)?)
    }

    fn forward_heads(&self, x: &Tensor, base: &FrozenLinear, heads: AttentionHeads, train: bool) -> Result<Tensor> {
        if ops::fused_forward(x, train) && heads.fused(x, train) {
            let scale = (self.magnitude.as_tensor() / self.weight_norm(&*base.weight()?)?)?.to_dtype(x.dtype())?;
            let a = self.lora.a.as_tensor().to_dtype(x.dtype())?;
            let b = self.lora.b.as_tensor().to_dtype(x.dtype())?;
            let mask = self.lora.dropout_mask(train);
            return ops::dora_linear_heads(x, base.base_weight(), (&a, &b, &scale), self.lora.scale, mask, heads);
        }
        heads.split(&self.forward(x, base, train)?, train)
    }

    fn merged_weight(&self, w: &Tensor) -> Result<Tensor> {
        let norm = self.weight_norm(w)?;
        let v = (w.to_dtype(DType::F32)? + self.lora.delta_weight(DType::F32)?)?;
        let k = (self.magnitude.as_tensor() / &norm)?;
        *self.merged_norm.lock().expect("merged_norm lock") = Some(norm);
        Ok(v.broadcast_mul(&k.unsqueeze(1)?)?.to_dtype(w.dtype())?)
    }

    fn unmerged_weight(&self, merged: &Tensor) -> Result<Tensor> {
        let norm = self.merged_norm.lock().expect("merged_norm lock").take().ok_or_else(|| {
            crate::Error::Adapter("DoRA unmerge without a previous merge: the row norms are unknown".into())
        })?;
        let k = (self.magnitude.as_tensor() / norm)?;
        let v = merged.to_dtype(DType::F32)?.broadcast_div(&k.unsqueeze(1)?)?;
        Ok((v - self.lora.delta_weight(DType::F32)?)?.to_dtype(merged.dtype())?)
    }

    fn params(&self) -> Vec<(String, Var)> {
        let mut p = self.lora.params();
        p.push(("lora_magnitude_vector".into(), self.magnitude.clone()));
        p
    }
}

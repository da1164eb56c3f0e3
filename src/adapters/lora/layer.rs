//! LoRA's layer: the pair (A, B) of one adapted weight, its fused forward and its merge.

use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;

use crate::adapters::uniform_var;
use crate::ops::dropout::{Dropout, DropoutMask};
use crate::ops;
use crate::ops::nn::AttentionHeads;
use crate::ops::nn::matmul_t;
use crate::model::{FrozenLinear, LinearAdapter};
use crate::Result;
use super::LoraConfig;

/// The low-rank pair of one adapted linear layer.
pub struct LoraLinear {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    dropout: Dropout,
}

impl LoraLinear {
    pub fn new(base: &FrozenLinear, cfg: &LoraConfig, rng: &mut StdRng) -> Result<Self> {
        let (out, inp) = (base.out_features(), base.in_features());
        let device = base.device();
        let bound = 1.0 / (inp as f64).sqrt();
        Ok(Self {
            a: uniform_var(&[cfg.r, inp], bound, rng, device)?,
            b: Var::zeros((out, cfg.r), DType::F32, device)?,
            scale: cfg.scale(),
            dropout: Dropout::new(cfg.lora_dropout, rng),
        })
    }

    /// A pair with given values (PiSSA, OLoRA, EVA and the rank-2r conversion set A and B).
    pub fn from_parts(a: &Tensor, b: &Tensor, scale: f64, dropout: f64, rng: &mut StdRng) -> Result<Self> {
        Ok(Self {
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
            scale,
            dropout: Dropout::new(dropout, rng),
        })
    }

    /// Keep A and B in `dtype` for inference (`--adapter-dtype`): a half type halves the bytes
    /// that a batch of many adapters reads a step (`ops::lora_rows` reads them as stored); the
    /// term is computed in f32 all the same. Not for training: AdamW keeps f32 variables.
    pub fn cast_factors(&mut self, dtype: DType) -> Result<()> {
        if self.a.dtype() != dtype || self.b.dtype() != dtype {
            self.a = Var::from_tensor(&self.a.as_tensor().to_dtype(dtype)?)?;
            self.b = Var::from_tensor(&self.b.as_tensor().to_dtype(dtype)?)?;
        }
        Ok(())
    }

    /// `s · B A` in the base weight's dtype.
    pub fn delta_weight(&self, dtype: DType) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?.to_dtype(dtype)?)
    }

    /// `s · (x Aᵀ) Bᵀ`, with the adapter weights cast to x's dtype as autocast would.
    pub fn branch(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.a.as_tensor().to_dtype(x.dtype())?;
        let b = self.b.as_tensor().to_dtype(x.dtype())?;
        Ok((matmul_t(&matmul_t(x, &a)?, &b)? * self.scale)?)
    }

    pub fn dropout(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.dropout.apply(x, train)
    }

    /// This forward pass's dropout mask (None when dropout is off or not training).
    pub fn dropout_mask(&self, train: bool) -> Option<DropoutMask> {
        self.dropout.mask(train)
    }

    pub fn dropout_active(&self) -> bool {
        self.dropout.p > 0.0
    }

    /// A and B in g's dtype when training takes the fused SwiGLU + LoRA op for `silu(g) ⊙ u`.
    fn swiglu_fused_factors(&self, g: &Tensor, u: &Tensor, train: bool) -> Result<Option<(Tensor, Tensor)>> {
        let fits = g.shape() == u.shape() && g.dtype() == u.dtype() && g.device().same_device(u.device());
        if !(train && fits && ops::fused_forward(g, train)) {
            return Ok(None);
        }
        Ok(Some((self.a.as_tensor().to_dtype(g.dtype())?, self.b.as_tensor().to_dtype(g.dtype())?)))
    }
}

impl LinearAdapter for LoraLinear {
    /// One fused op (src/ops/lora_linear.rs) on CUDA, and in CPU training; plain candle ops
    /// otherwise (and with `--unfused`).
    fn forward(&self, x: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor> {
        if ops::fused_forward(x, train) {
            let a = self.a.as_tensor().to_dtype(x.dtype())?;
            let b = self.b.as_tensor().to_dtype(x.dtype())?;
            return ops::lora_linear(x, base.base_weight(), &a, &b, self.scale, self.dropout_mask(train));
        }
        if !train && ops::fused_for(x) && ops::lora_rows::takes(x) {
            // Inference: the term added in place, as a mixed batch adds it (`--unfused` keeps
            // the plain composition below).
            let factors = [(self.a.as_tensor().clone(), self.b.as_tensor().clone(), self.scale)];
            let rows = ops::lora_rows::rows_of(x)?;
            return ops::lora_rows::add_tensor(x, base.forward(x)?, &vec![Some(0); rows], &factors, false);
        }
        Ok((base.forward(x)? + self.branch(&self.dropout(x, train)?)?)?)
    }

    fn forward_heads(&self, x: &Tensor, base: &FrozenLinear, heads: AttentionHeads, train: bool) -> Result<Tensor> {
        if ops::fused_forward(x, train) && heads.fused(x, train) {
            let a = self.a.as_tensor().to_dtype(x.dtype())?;
            let b = self.b.as_tensor().to_dtype(x.dtype())?;
            return ops::lora_linear_heads(x, base.base_weight(), (&a, &b), self.scale, self.dropout_mask(train), heads);
        }
        heads.split(&self.forward(x, base, train)?, train)
    }

    fn forward_swiglu(&self, g: &Tensor, u: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor> {
        if let Some((a, b)) = self.swiglu_fused_factors(g, u, train)? {
            return ops::swiglu_lora_linear(g, u, base.base_weight(), (&a, &b), self.scale, self.dropout_mask(train));
        }
        self.forward(&crate::ops::nn::swiglu(g, u, train)?, base, train)
    }

    fn forward_swiglu_backward_only(&self, g: &Tensor, u: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor> {
        if let Some((a, b)) = self.swiglu_fused_factors(g, u, train)? {
            return ops::swiglu_lora_linear_backward_only(g, u, base.base_weight(), (&a, &b), self.scale, self.dropout_mask(train));
        }
        self.forward_swiglu(g, u, base, train)
    }

    fn low_rank_factors(&self) -> Option<(Tensor, Tensor, f64)> {
        Some((self.a.as_tensor().clone(), self.b.as_tensor().clone(), self.scale))
    }

    fn merged_weight(&self, w: &Tensor) -> Result<Tensor> {
        Ok((w.to_dtype(DType::F32)? + self.delta_weight(DType::F32)?)?.to_dtype(w.dtype())?)
    }

    fn unmerged_weight(&self, w: &Tensor) -> Result<Tensor> {
        Ok((w.to_dtype(DType::F32)? - self.delta_weight(DType::F32)?)?.to_dtype(w.dtype())?)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("lora_A.weight".into(), self.a.clone()), ("lora_B.weight".into(), self.b.clone())]
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}

/// [`LoraLinear::cast_factors`] for every LoRA layer of `model` (LoRA and rsLoRA; the methods
/// that change the product itself keep their dtypes).
pub fn cast_factors(model: &mut crate::model::Llama, dtype: DType) -> Result<()> {
    for (_, linear) in model.named_linears_mut() {
        if let Some(lora) = linear.adapter_mut().and_then(|a| a.as_any_mut()).and_then(|a| a.downcast_mut::<LoraLinear>()) {
            lora.cast_factors(dtype)?;
        }
    }
    Ok(())
}

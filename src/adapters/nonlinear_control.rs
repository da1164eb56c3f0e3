//! Control with a parameter-free attention controller (Zhang, Cheng, Xu, Li, "Parameter-Efficient
//! Fine-Tuning with Controls", ICML 2024; code: czhang024/ICML-ANC, `models/controller.py`),
//! ported from the ViT of the paper to the LLaMA decoder.
//!
//! In every decoder layer, with h2 the residual stream after attention (pre-norm):
//!
//! ```text
//! s   = h2                     (default)  |  RMSNorm_post(h2)  (stable_mode: the layer's own
//!                                            post_attention_layernorm, the seed's LN2)
//! U   = up(down(s))            down: [r, d] + bias, up: [d, r] + bias            U: [b, t, d]
//! C   = softmax(U Uᵀ + M) U + U   over the tokens of each sequence, one head, no 1/√d scaling
//! out = h2 + MLP(RMSNorm_post(h2)) + C
//! ```
//!
//! down is kaiming-uniform (a = √5, U(±1/√d)) with a zero bias, up and its bias are zero, so
//! U = 0 and C = 0 at init. Rank r = `control_rank` (64, hard-coded in the seed).
//!
//! Computed in rank space, exactly: with `D' = [down(s), 1]` [t, r + 1] and `P = [W_up | b_up]`
//! [d, r + 1], `U = D' Pᵀ`, so `U Uᵀ = D' (Pᵀ P) D'ᵀ` and `C = (softmax(U Uᵀ + M) D' + D') Pᵀ`.
//! The scores cost t²·(r + 1) multiply-adds instead of t²·d (d = 4096 on LLaMA-7B, r + 1 = 65),
//! and backward keeps [t, r + 1] tensors where the direct form keeps several [t, d] ones.
//!
//! Departure from the seed: the ViT has no causality, but a causal LM must not let token i see
//! tokens j > i (training would leak the next token into the prediction of it). M is therefore
//! the model's attention mask: causal, padding keys masked, and a padding query sees itself only
//! (as in the attention). The mixing (scores, softmax, weighted sum) runs in f32 for half types,
//! since the unscaled logits ‖U‖² overflow f16 easily. With a KV cache, the control gets the
//! block inputs of the cached tokens and recomputes their U (rank-r, cheap), so cached generation
//! gives the same logits as a full forward.
//!
//! Adapter file: `peft_type` "NONLINEAR_CONTROL" (not a PEFT type: PEFT cannot load it), keys
//! `base_model.model.model.layers.N.mlp_control.{down_proj,up_proj}.{weight,bias}` (the seed's
//! `down_proj`/`up_proj`).

use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use std::path::Path;

use serde_json::{json, Value};

use super::config::{parse, ReadConfig};
use super::method::AdapterMethod;
use super::{uniform_var, Targets};
use crate::error::{Error, Result};
use crate::ops::nn::matmul_t;
use crate::ops::nn as ops;
use crate::model::{BlockControl, ControlContext, Llama};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NonlinearControlConfig {
    #[serde(default = "default_rank")]
    pub control_rank: usize,
    /// Normalise the controller's input with the layer's post-attention RMSNorm.
    #[serde(default)]
    pub stable_mode: bool,
}

fn default_rank() -> usize {
    64
}

impl Default for NonlinearControlConfig {
    fn default() -> Self {
        Self { control_rank: 64, stable_mode: false }
    }
}

impl AdapterMethod for NonlinearControlConfig {
    fn peft_type(&self) -> &'static str {
        "NONLINEAR_CONTROL"
    }

    fn targets(&self) -> Option<&Targets> {
        None
    }

    fn peft_json(&self) -> Value {
        json!(self)
    }

    fn inject(&self, model: &mut Llama, rng: &mut StdRng) -> Result<usize> {
        attach(model, self, rng)
    }
}

/// The engine's own `peft_type: "NONLINEAR_CONTROL"`.
pub fn read_nonlinear_control(v: &Value, path: &Path) -> Result<ReadConfig> {
    Ok((parse::<NonlinearControlConfig>(v, path, "nonlinear Control")?.into(), &["control_rank", "stable_mode"]))
}

/// The controller of one layer, added in parallel with its MLP block.
pub struct NonlinearControl {
    pub down_w: Var,
    pub down_b: Var,
    pub up_w: Var,
    pub up_b: Var,
    /// The RMSNorm weight and eps applied to the input in stable mode.
    norm: Option<(Tensor, f64)>,
}

impl NonlinearControl {
    pub fn new(hidden: usize, rank: usize, norm: Option<(Tensor, f64)>, rng: &mut StdRng, device: &Device) -> Result<Self> {
        Ok(Self {
            down_w: uniform_var(&[rank, hidden], 1.0 / (hidden as f64).sqrt(), rng, device)?,
            down_b: Var::zeros(rank, DType::F32, device)?,
            up_w: Var::zeros((hidden, rank), DType::F32, device)?,
            up_b: Var::zeros(hidden, DType::F32, device)?,
            norm,
        })
    }

    /// `D' = [down(s), 1]` [b, t, r + 1] in the accumulation dtype: U = D' Pᵀ.
    fn lowrank(&self, x: &Tensor, acc: DType, train: bool) -> Result<Tensor> {
        let s = match &self.norm {
            Some((w, eps)) => ops::rms_norm(x, w, *eps, train)?,
            None => x.clone(),
        };
        let cast = |v: &Var| v.as_tensor().to_dtype(x.dtype());
        let d = matmul_t(&s, &cast(&self.down_w)?)?.broadcast_add(&cast(&self.down_b)?)?.to_dtype(acc)?;
        let mut ones_shape = d.dims().to_vec();
        *ones_shape.last_mut().expect("[b, t, r]") = 1;
        Ok(Tensor::cat(&[&d, &Tensor::ones(ones_shape, acc, d.device())?], D::Minus1)?)
    }
}

impl BlockControl for NonlinearControl {
    /// In rank space (see the module doc): the token mixing costs t²·(r + 1) instead of t²·d,
    /// and what backward keeps is [b, t, r + 1], not [b, t, d].
    fn forward(&self, x: &Tensor, ctx: &ControlContext, train: bool) -> Result<Tensor> {
        let acc = ops::accumulate_dtype(x.dtype());
        let dq = self.lowrank(x, acc, train)?;
        let dk = match ctx.past_input {
            Some(past) => Tensor::cat(&[&self.lowrank(past, acc, train)?, &dq], 1)?,
            None => dq.clone(),
        };
        // P = [W_up | b_up] [d, r + 1] and G = Pᵀ P, so that U Uᵀ = D' G D'ᵀ.
        let p = Tensor::cat(&[self.up_w.as_tensor(), &self.up_b.as_tensor().unsqueeze(1)?], 1)?.to_dtype(acc)?;
        let g = p.t()?.matmul(&p)?;
        // The attention bias as a 0 / -1e30 mask in the accumulation dtype ([b, 1, t, past + t]): the
        // model's bias is -65504 in f16, too weak against unscaled logits.
        let mask = (ctx.bias.lt(0f64)?.to_dtype(acc)? * -1e30)?;
        // The mixing is an attention with one head, q = D' G, k = v = D' and scale 1, so training
        // takes the flash-style op, which keeps no [t, t] matrix for backward.
        let q = dq.broadcast_matmul(&g)?.unsqueeze(1)?;
        let kv = dk.unsqueeze(1)?;
        let mixed = ops::attention_scaled(&q, &kv, &kv, &mask, 1.0, train)?;
        // C = softmax(U Uᵀ) U + U = (mixed + D') Pᵀ, the product in x's dtype.
        let sum = (mixed + dq)?.to_dtype(x.dtype())?;
        matmul_t(&sum, &p.to_dtype(x.dtype())?)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![
            ("down_proj.weight".into(), self.down_w.clone()),
            ("down_proj.bias".into(), self.down_b.clone()),
            ("up_proj.weight".into(), self.up_w.clone()),
            ("up_proj.bias".into(), self.up_b.clone()),
        ]
    }

    fn mixes_tokens(&self) -> bool {
        true
    }
}

/// Attach a controller across the MLP block of every decoder layer; returns how many.
pub fn attach(model: &mut Llama, cfg: &NonlinearControlConfig, rng: &mut StdRng) -> Result<usize> {
    if cfg.control_rank == 0 {
        return Err(Error::Adapter("control_rank must be at least 1".into()));
    }
    let (hidden, eps, device) = (model.config.hidden_size, model.config.rms_norm_eps, model.device().clone());
    if cfg.control_rank > hidden {
        return Err(Error::Adapter(format!("control_rank = {} is larger than the model's hidden size {hidden}", cfg.control_rank)));
    }
    for layer in &mut model.layers {
        let norm = cfg.stable_mode.then(|| (layer.post_attention_layernorm.clone(), eps));
        layer.mlp_control = Some(Box::new(NonlinearControl::new(hidden, cfg.control_rank, norm, rng, &device)?));
    }
    Ok(model.layers.len())
}

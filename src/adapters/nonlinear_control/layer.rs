//! The nonlinear controller across one MLP block, and its attachment to every layer.

use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::StdRng;

use crate::adapters::uniform_var;
use crate::error::{Error, Result};
use crate::ops::nn::matmul_t;
use crate::ops::nn as ops;
use crate::model::{BlockControl, ControlContext, ControlSlots, Llama};
use super::NonlinearControlConfig;

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

/// The rank against the model's width, checked before anything is allocated from it.
fn check_rank(cfg: &NonlinearControlConfig, hidden: usize) -> Result<()> {
    if cfg.control_rank == 0 {
        return Err(Error::Adapter("control_rank must be at least 1".into()));
    }
    if cfg.control_rank > hidden {
        return Err(Error::Adapter(format!("control_rank = {} is larger than the model's hidden size {hidden}", cfg.control_rank)));
    }
    Ok(())
}

/// Attach a controller across the MLP block of every decoder layer; returns how many.
pub fn attach(model: &mut Llama, cfg: &NonlinearControlConfig, rng: &mut StdRng) -> Result<usize> {
    let (hidden, eps, device) = (model.config.hidden_size, model.config.rms_norm_eps, model.device().clone());
    check_rank(cfg, hidden)?;
    for layer in &mut model.layers {
        let norm = cfg.stable_mode.then(|| (layer.post_attention_layernorm.clone(), eps));
        layer.mlp_control = Some(Box::new(NonlinearControl::new(hidden, cfg.control_rank, norm, rng, &device)?));
    }
    Ok(model.layers.len())
}

/// Attach a controller across the MLP block of every layer of a model that lists its control
/// slots (the ViT: the seed's own placement, its attention unmasked); returns how many. Stable
/// mode normalises by the layer's RMSNorm, which only LLaMA has: on another model it is an error.
pub fn attach_to<'a>(layers: impl Iterator<Item = ControlSlots<'a>>, hidden: usize, device: &Device, cfg: &NonlinearControlConfig, rng: &mut StdRng) -> Result<usize> {
    check_rank(cfg, hidden)?;
    if cfg.stable_mode {
        return Err(Error::Adapter("nonlinear Control's stable mode normalises by LLaMA's RMSNorm; on this model it is not implemented".into()));
    }
    let mut count = 0;
    for layer in layers {
        *layer.mlp = Some(Box::new(NonlinearControl::new(hidden, cfg.control_rank, None, rng, device)?));
        count += 1;
    }
    Ok(count)
}

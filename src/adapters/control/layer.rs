//! Parallel Control's controller across one residual block, and its attachment to every layer.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;

use crate::adapters::uniform_var;
use crate::ops::dropout::Dropout;
use crate::error::{Error, Result};
use crate::ops;
use crate::ops::nn::matmul_t;
use crate::model::{BlockControl, ControlContext, ControlSlots, Llama};
use super::ControlConfig;

/// `α·B(drop(A x))` across one residual block.
pub struct ParallelControl {
    pub a: Var,
    pub b: Var,
    pub alpha: f64,
    dropout: Dropout,
}

impl ParallelControl {
    pub fn new(hidden: usize, rank: usize, alpha: f64, dropout: f64, rng: &mut StdRng, device: &Device) -> Result<Self> {
        Ok(Self {
            a: uniform_var(&[rank, hidden], 1.0 / (hidden as f64).sqrt(), rng, device)?,
            b: Var::zeros((hidden, rank), DType::F32, device)?,
            alpha,
            dropout: Dropout::new(dropout, rng),
        })
    }
}

impl BlockControl for ParallelControl {
    fn forward(&self, x: &Tensor, _ctx: &ControlContext, train: bool) -> Result<Tensor> {
        let a = self.a.as_tensor().to_dtype(x.dtype())?;
        let b = self.b.as_tensor().to_dtype(x.dtype())?;
        let z = self.dropout.apply(&matmul_t(x, &a)?, train)?;
        Ok((matmul_t(&z, &b)? * self.alpha)?)
    }

    /// On CUDA, and in CPU training, the rank-r branch is accumulated into the residual sum in
    /// one op (src/ops/control_branch.rs) that keeps only z and B for backward.
    fn add_to(&self, block_output: &Tensor, x: &Tensor, ctx: &ControlContext, train: bool) -> Result<Tensor> {
        if !ops::fused_forward(x, train) {
            return Ok((block_output + self.forward(x, ctx, train)?)?);
        }
        let a = self.a.as_tensor().to_dtype(x.dtype())?;
        let b = self.b.as_tensor().to_dtype(x.dtype())?;
        let z = self.dropout.apply(&matmul_t(x, &a)?, train)?;
        ops::control_branch(block_output, &z, &b, self.alpha)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("lora_A.weight".into(), self.a.clone()), ("lora_B.weight".into(), self.b.clone())]
    }
}

/// Attach the controls of `cfg` to every decoder layer (the LoRA part is injected by the
/// caller); returns how many controls.
pub fn attach(model: &mut Llama, cfg: &ControlConfig, rng: &mut StdRng) -> Result<usize> {
    let (hidden, device) = (model.config.hidden_size, model.device().clone());
    let slots = model.layers.iter_mut().map(|l| ControlSlots { attn: &mut l.attn_control, mlp: &mut l.mlp_control });
    attach_to(slots, hidden, &device, cfg, rng)
}

/// The controls of `cfg` in the slots of every layer of a model of width `hidden` (a LLaMA
/// decoder's, a ViT's); returns how many controls.
pub fn attach_to<'a>(layers: impl Iterator<Item = ControlSlots<'a>>, hidden: usize, device: &Device, cfg: &ControlConfig, rng: &mut StdRng) -> Result<usize> {
    if cfg.control_rank == 0 || (cfg.double_control && cfg.double_control_rank == 0) {
        return Err(Error::Adapter("control ranks must be at least 1".into()));
    }
    // Checked before anything is allocated from them: a rank read from a file could be any size.
    for (name, rank) in [("control_rank", cfg.control_rank), ("double_control_rank", cfg.double_control_rank)] {
        if rank > hidden && (name == "control_rank" || cfg.double_control) {
            return Err(Error::Adapter(format!("{name} = {rank} is larger than the model's hidden size {hidden}")));
        }
    }
    let mut count = 0;
    for layer in layers {
        if cfg.double_control {
            let c = ParallelControl::new(hidden, cfg.double_control_rank, cfg.control_alpha, cfg.control_dropout, rng, device)?;
            *layer.attn = Some(Box::new(c));
            count += 1;
        }
        let c = ParallelControl::new(hidden, cfg.control_rank, cfg.control_alpha, cfg.control_dropout, rng, device)?;
        *layer.mlp = Some(Box::new(c));
        count += 1;
    }
    Ok(count)
}

//! Parallel Control, Double Control and Control + LoRA (Zhang, Ren, Cheng, Li, "From Weight-Based
//! to State-Based Fine-Tuning: Further Memory Reduction on LoRA with Parallel Control", ICML 2025;
//! code: czhang024/ParallelControl, `LlaMA/peft/src/peft/tuners/control.py`).
//!
//! In every decoder layer, with h the layer input and h2 = h + Attn(RMSNorm(h)) the residual
//! stream after attention (pre-norm):
//!
//! ```text
//! Parallel Control:  out = h2 + MLP(RMSNorm(h2)) + α·B(drop(A h2))
//! Double Control:    h2  = h + Attn(RMSNorm(h)) + α·B'(drop(A' h)), then as above
//! Control + LoRA:    Parallel Control, plus LoRA on the linear layers the `lora` config targets
//!                    (the paper's recipe: q_proj, k_proj, v_proj)
//! ```
//!
//! A [r, d] is kaiming-uniform (a = √5, i.e. U(±1/√d)) and B [d, r] zero, so the model is
//! unchanged at init; both are f32 masters, cast to the activation dtype in the forward (as the
//! fork's fp32 `nn.Linear` under autocast). α = `control_alpha` (1.0), r = `control_rank` (64),
//! r' = `double_control_rank` (64), dropout `control_dropout` (0).
//!
//! Adapter file: `adapter_config.json` with `peft_type` "CONTROL", which is not a PEFT type (the
//! fork's own peft has it, upstream PEFT cannot load these adapters), and the keys
//! `base_model.model.model.layers.N.mlp_control.lora_A.weight` / `.lora_B.weight` (the fork's
//! `lora_A`/`lora_B` of the layer) and `...layers.N.attn_control.lora_A.weight` / `.lora_B.weight`
//! (the fork's `lora_A_attn`/`lora_B_attn`); LoRA tensors keep PEFT's names
//! (`...layers.N.self_attn.q_proj.lora_A.weight`). The LoRA part is stored as a nested `lora`
//! object of the config.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use std::path::Path;

use serde_json::{json, Value};

use super::config::{parse, ReadConfig};
use super::method::{inject_linears, AdapterMethod};
use super::{uniform_var, LoraConfig, Targets};
use crate::ops::dropout::Dropout;
use crate::error::{Error, Result};
use crate::ops;
use crate::ops::nn::matmul_t;
use crate::model::{BlockControl, ControlContext, Llama};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlConfig {
    #[serde(default = "default_rank")]
    pub control_rank: usize,
    #[serde(default = "default_alpha")]
    pub control_alpha: f64,
    #[serde(default)]
    pub control_dropout: f64,
    /// Also control the attention block (Double Control).
    #[serde(default)]
    pub double_control: bool,
    #[serde(default = "default_rank")]
    pub double_control_rank: usize,
    /// LoRA injected alongside (Control + LoRA).
    #[serde(default)]
    pub lora: Option<LoraConfig>,
}

fn default_rank() -> usize {
    64
}

fn default_alpha() -> f64 {
    1.0
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            control_rank: 64,
            control_alpha: 1.0,
            control_dropout: 0.0,
            double_control: false,
            double_control_rank: 64,
            lora: None,
        }
    }
}

impl AdapterMethod for ControlConfig {
    fn peft_type(&self) -> &'static str {
        "CONTROL"
    }

    fn targets(&self) -> Option<&Targets> {
        self.lora.as_ref().map(|l| &l.target_modules)
    }

    fn peft_json(&self) -> Value {
        json!(self)
    }

    fn inject(&self, model: &mut Llama, rng: &mut StdRng) -> Result<usize> {
        let controls = attach(model, self, rng)?;
        match &self.lora {
            Some(lora) => Ok(controls + inject_linears(lora, model, rng)?),
            None => Ok(controls),
        }
    }
}

/// The engine's own `peft_type: "CONTROL"`.
pub fn read_control(v: &Value, path: &Path) -> Result<ReadConfig> {
    const KEYS: &[&str] = &["control_rank", "control_alpha", "control_dropout", "double_control", "double_control_rank", "lora"];
    Ok((parse::<ControlConfig>(v, path, "Control")?.into(), KEYS))
}

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
    if cfg.control_rank == 0 || (cfg.double_control && cfg.double_control_rank == 0) {
        return Err(Error::Adapter("control ranks must be at least 1".into()));
    }
    let (hidden, device) = (model.config.hidden_size, model.device().clone());
    // Checked before anything is allocated from them: a rank read from a file could be any size.
    for (name, rank) in [("control_rank", cfg.control_rank), ("double_control_rank", cfg.double_control_rank)] {
        if rank > hidden && (name == "control_rank" || cfg.double_control) {
            return Err(Error::Adapter(format!("{name} = {rank} is larger than the model's hidden size {hidden}")));
        }
    }
    let mut count = 0;
    for layer in &mut model.layers {
        if cfg.double_control {
            let c = ParallelControl::new(hidden, cfg.double_control_rank, cfg.control_alpha, cfg.control_dropout, rng, &device)?;
            layer.attn_control = Some(Box::new(c));
            count += 1;
        }
        let c = ParallelControl::new(hidden, cfg.control_rank, cfg.control_alpha, cfg.control_dropout, rng, &device)?;
        layer.mlp_control = Some(Box::new(c));
        count += 1;
    }
    Ok(count)
}

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

use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use std::path::Path;

use serde_json::{json, Value};

use crate::adapters::flags::{FlagGroup, Flags, MethodFlags, TargetFlags, MAX_RANK};
use crate::adapters::lora::LoraFlags;
use crate::validate::{dropout, int_in, real_in};
use crate::adapters::config::{parse, ReadConfig};
use crate::adapters::method::{inject_linears, AdapterMethod};
use crate::adapters::{LoraConfig, Targets};
use crate::error::Result;
use crate::model::Llama;

mod layer;
pub use layer::*;

/// The Control methods' flags.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Control")]
pub struct ControlFlags {
    /// Rank of the control across the MLP block.
    #[arg(long, default_value_t = 64)]
    pub control_rank: usize,
    /// α, the control's scale.
    #[arg(long, default_value_t = 1.0)]
    pub control_alpha: f64,
    /// Dropout on the control's input.
    #[arg(long, default_value_t = 0.0)]
    pub control_dropout: f64,
    /// Double Control: rank of the control across the attention block.
    #[arg(long, default_value_t = 64)]
    pub double_control_rank: usize,
}

impl MethodFlags for ControlFlags {
    fn validate(&self) -> Result<()> {
        int_in("control-rank", self.control_rank, 1, MAX_RANK)?;
        real_in("control-alpha", self.control_alpha, (-1e6, true), (1e6, true))?;
        dropout("control-dropout", self.control_dropout)?;
        int_in("double-control-rank", self.double_control_rank, 1, MAX_RANK)
    }
}

pub const FLAGS: &[FlagGroup] = &[<ControlFlags as clap::Args>::augment_args];
/// Control + LoRA's: the Control flags and LoRA's.
pub const WITH_LORA_FLAGS: &[FlagGroup] = &[<ControlFlags as clap::Args>::augment_args, <TargetFlags as clap::Args>::augment_args, <LoraFlags as clap::Args>::augment_args];

impl ControlConfig {
    /// Parallel Control, across the attention block too when `double_control`, with LoRA on
    /// the targets when `with_lora`.
    pub fn from_flags(f: &Flags, double_control: bool, with_lora: bool) -> Result<Self> {
        let c = f.read::<ControlFlags>()?;
        Ok(Self {
            control_rank: c.control_rank,
            control_alpha: c.control_alpha,
            control_dropout: c.control_dropout,
            double_control,
            double_control_rank: c.double_control_rank,
            lora: if with_lora { Some(LoraConfig::from_flags(f, false, false)?) } else { None },
        })
    }
}

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


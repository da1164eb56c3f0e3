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

use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use std::path::Path;

use serde_json::{json, Value};

use crate::adapters::control::ControlFlags;
use crate::adapters::flags::{FlagGroup, Flags, MethodFlags};
use crate::adapters::config::{parse, ReadConfig};
use crate::adapters::method::AdapterMethod;
use crate::adapters::Targets;
use crate::error::Result;
use crate::model::Llama;

mod layer;
pub use layer::*;

/// The nonlinear controller's flag (its rank is the Control methods' `--control-rank`).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Nonlinear Control")]
pub struct NonlinearControlFlags {
    /// Normalise the controller's input with the layer's post-attention RMSNorm.
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub stable_mode: bool,
}

impl MethodFlags for NonlinearControlFlags {}

pub const FLAGS: &[FlagGroup] = &[<ControlFlags as clap::Args>::augment_args, <NonlinearControlFlags as clap::Args>::augment_args];

impl NonlinearControlConfig {
    pub fn from_flags(f: &Flags) -> Result<Self> {
        Ok(Self { control_rank: f.read::<ControlFlags>()?.control_rank, stable_mode: f.read::<NonlinearControlFlags>()?.stable_mode })
    }
}

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


//! AdaLoRA (Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
//! ICLR 2023), with PEFT's semantics (`tuners/adalora`, docs/METHODS.md §4.2).
//!
//! SVD-form update `ΔW = B (A ⊙ E)`: `lora_A` [r, in], `lora_B` [out, r] ~ N(0, 0.02²),
//! `lora_E` [r, 1] zero, r = `init_r`; forward
//! `y = x Wᵀ + (drop(x) (A ⊙ E)ᵀ) Bᵀ · α / (ranknum + 1e-5)` with ranknum = r (PEFT's scaling is
//! `lora_alpha`, not α/r). PEFT's keys: `lora_A`, `lora_B`, `lora_E` (ParameterDicts: no `.weight`).
//!
//! Training adds PEFT's orthogonal regulariser to the loss,
//! `orth_reg_weight · mean over {A, B} of ‖A Aᵀ − I‖_F, ‖Bᵀ B − I‖_F` (PEFT takes the Frobenius
//! norm, not its square, and averages over the matrices), and runs PEFT's `RankAllocator` after
//! every optimizer step ([`AdaLoraHook`], `update_and_allocate(global_step)` with the 0-based step):
//! - sensitivity `I = |p · ∇p|` of every A, B, E entry, smoothed `Ī ← β₁Ī + (1−β₁)I` and the
//!   uncertainty `Ū ← β₂Ū + (1−β₂)|I − Ī|` (β₁ = β₂ = 0.85), score `Ī·Ū`;
//! - the importance of triplet i of a layer is `s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)`;
//! - budget (total kept ranks): `init_r·n` while `step ≤ tinit`; then
//!   `⌊(init_r·n − target_r·n)(1 − (step−tinit)/(T−tfinal−tinit))³ + target_r·n⌋` with masking
//!   every `deltaT` steps; at `step = T − tfinal` the final mask to `target_r·n` is fixed (the
//!   rank pattern) and re-applied after every later step;
//! - masking zeroes the E entries whose importance is ≤ the (init_bgt − budget)-th smallest.
//!
//! `total_step` (T) must be set (PEFT raises without it; the seed's script crashed on that).
//! The saved file keeps every rank (masked E entries are zero), and `rank_pattern` is null.
//! The allocator's state (the EMAs, the final rank pattern) is part of the training checkpoint
//! ([`StepHook::state_tensors`]), so a resumed run allocates exactly as an uninterrupted one.

use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use std::path::Path;

use serde_json::{json, Value};

use crate::adapters::flags::{FlagGroup, Flags, MethodFlags, TargetFlags, MAX_RANK};
use crate::adapters::lora::LoraFlags;
use crate::validate::int_in;
use crate::adapters::config::{parse, ReadConfig};
use crate::adapters::method::{check_rank, AdapterMethod, BuiltLinear, TrainingExtras};
use crate::adapters::Targets;
use crate::model::{FrozenLinear, Llama};
use crate::{Error, Result};

mod layer;
pub use layer::*;

/// AdaLoRA's flags (with LoRA's r, α and dropout).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "AdaLoRA")]
pub struct AdaLoraFlags {
    /// Initial rank per layer (default 3·r, as EfficientFT).
    #[arg(long)]
    pub adalora_init_r: Option<usize>,
    /// Final average rank per layer (default r).
    #[arg(long)]
    pub adalora_target_r: Option<usize>,
}

impl MethodFlags for AdaLoraFlags {
    fn validate(&self) -> Result<()> {
        for (flag, r) in [("adalora-init-r", self.adalora_init_r), ("adalora-target-r", self.adalora_target_r)] {
            if let Some(r) = r {
                int_in(flag, r, 1, MAX_RANK)?;
            }
        }
        Ok(())
    }
}

pub const FLAGS: &[FlagGroup] = &[<TargetFlags as clap::Args>::augment_args, <LoraFlags as clap::Args>::augment_args, <AdaLoraFlags as clap::Args>::augment_args];

impl AdaLoraConfig {
    /// The number of steps is left to the trainer (`training::configure_trainer` fills it in).
    pub fn from_flags(f: &Flags) -> Result<Self> {
        let (lora, ada, targets) = (f.read::<LoraFlags>()?, f.read::<AdaLoraFlags>()?, f.read::<TargetFlags>()?);
        let mut c = Self::new(targets.targets(), ada.adalora_init_r.unwrap_or(3 * lora.r), ada.adalora_target_r.unwrap_or(lora.r), 0);
        c.total_step = None;
        c.lora_alpha = lora.lora_alpha;
        c.lora_dropout = lora.lora_dropout;
        Ok(c)
    }
}
mod allocator;
pub use allocator::*;

fn d8() -> usize {
    8
}
fn d12() -> usize {
    12
}
fn d1() -> usize {
    1
}
fn d085() -> f64 {
    0.85
}
fn d05() -> f64 {
    0.5
}
fn d8f() -> f64 {
    8.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaLoraConfig {
    pub target_modules: Targets,
    #[serde(default = "d8f")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default = "d8")]
    pub target_r: usize,
    #[serde(default = "d12")]
    pub init_r: usize,
    #[serde(default)]
    pub tinit: usize,
    #[serde(default)]
    pub tfinal: usize,
    #[serde(rename = "deltaT", default = "d1")]
    pub delta_t: usize,
    #[serde(default = "d085")]
    pub beta1: f64,
    #[serde(default = "d085")]
    pub beta2: f64,
    #[serde(default = "d05")]
    pub orth_reg_weight: f64,
    #[serde(default)]
    pub total_step: Option<usize>,
}

impl AdaLoraConfig {
    pub fn new(target_modules: Targets, init_r: usize, target_r: usize, total_step: usize) -> Self {
        Self {
            target_modules,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_r,
            init_r,
            tinit: 0,
            tfinal: 0,
            delta_t: 1,
            beta1: 0.85,
            beta2: 0.85,
            orth_reg_weight: 0.5,
            total_step: Some(total_step),
        }
    }

    /// PEFT's `AdaLoraConfig.__post_init__` checks.
    pub fn validate(&self) -> Result<usize> {
        let total = self.total_step.filter(|&t| t > 0).ok_or_else(|| {
            Error::Adapter("AdaLoRA needs `total_step` (the number of optimizer steps) for its budget schedule".into())
        })?;
        if self.tinit >= total.saturating_sub(self.tfinal) {
            return Err(Error::Adapter(format!(
                "AdaLoRA: tinit {} must be below total_step {total} - tfinal {}: no budgeting phase left",
                self.tinit, self.tfinal
            )));
        }
        if self.init_r == 0 || self.target_r > self.init_r {
            return Err(Error::Adapter(format!("AdaLoRA: need 0 < target_r {} <= init_r {}", self.target_r, self.init_r)));
        }
        Ok(total)
    }
}

impl AdapterMethod for AdaLoraConfig {
    fn peft_type(&self) -> &'static str {
        "ADALORA"
    }

    fn targets(&self) -> Option<&Targets> {
        Some(&self.target_modules)
    }

    fn peft_json(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("AdaLoraConfig serialises");
        v["r"] = json!(self.target_r);
        v["bias"] = json!("none");
        v["fan_in_fan_out"] = json!(false);
        v["init_lora_weights"] = json!(true);
        v["rank_pattern"] = Value::Null;
        v["modules_to_save"] = Value::Null;
        v
    }

    fn build_linear(&self, path: &str, base: &FrozenLinear, rng: &mut StdRng) -> Result<Option<BuiltLinear>> {
        check_rank(path, "init_r", self.init_r, base)?;
        Ok(Some((Box::new(AdaLoraLinear::new(base, self, rng)?), None)))
    }

    /// The regulariser and rank allocator; PEFT needs the number of steps as `total_step`.
    fn training_extras(&self, model: &Llama, total_steps: usize) -> Result<TrainingExtras> {
        let mut c = self.clone();
        c.total_step.get_or_insert(total_steps);
        Ok(TrainingExtras { hooks: vec![Box::new(AdaLoraHook::new(model, &c)?)], ..Default::default() })
    }
}

/// AdaLoRA inherits LoRA's `r`, which PEFT ignores for AdaLoRA (the rank is `init_r`).
const ADALORA_KEYS: &[&str] = &[
    "r", "lora_alpha", "lora_dropout", "target_modules", "target_r", "init_r", "tinit", "tfinal", "deltaT",
    "beta1", "beta2", "orth_reg_weight", "total_step",
];

/// PEFT's `peft_type: "ADALORA"`.
pub fn read_peft_adalora(v: &Value, path: &Path) -> Result<ReadConfig> {
    Ok((parse::<AdaLoraConfig>(v, path, "AdaLoRA")?.into(), ADALORA_KEYS))
}


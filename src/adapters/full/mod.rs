//! Full fine-tuning of chosen modules (EfficientFT's `use_lora False` path, docs/METHODS.md §4.2): the
//! targeted linears' weights become trainable, `y = x Wᵀ` with W an f32 `Var` initialised from
//! the base weight. Optionally trained with GaLore (Zhao et al., "GaLore: Memory-Efficient LLM
//! Training by Gradient Low-Rank Projection", ICML 2024; see `adapters::full::galore`).
//!
//! Not a PEFT type: the engine writes `peft_type: "FULL"` and the full weights under
//! `base_model.model.<module>.weight`. The frozen base weight stays in place (so memory for the
//! targeted modules is base + f32 copy); merge writes W into the base, unmerge restores it.

use serde::{Deserialize, Serialize};

use std::path::Path;

use rand::rngs::StdRng;
use serde_json::Value;

use crate::adapters::flags::{FlagGroup, Flags, TargetFlags};
use crate::adapters::lora::LoraFlags;
use crate::adapters::config::{parse, ReadConfig};
use crate::adapters::full::galore::GaloreConfig;
use crate::adapters::method::{AdapterMethod, BuiltLinear, TrainingExtras};
use crate::adapters::Targets;
use crate::model::{FrozenLinear, Llama};
use crate::Result;

pub mod galore;
mod layer;
pub use layer::*;

pub const FLAGS: &[FlagGroup] = &[<TargetFlags as clap::Args>::augment_args];
/// GaLore's: full fine-tuning's, its own and LoRA's r (its default rank).
pub const GALORE_FLAGS: &[FlagGroup] = &[<TargetFlags as clap::Args>::augment_args, <LoraFlags as clap::Args>::augment_args, <galore::GaloreFlags as clap::Args>::augment_args];

impl FullConfig {
    /// Full fine-tuning, with GaLore's projection when `galore`.
    pub fn from_flags(f: &Flags, galore: bool) -> Result<Self> {
        Ok(Self { target_modules: f.read::<TargetFlags>()?.targets(), galore: if galore { Some(GaloreConfig::from_flags(f)?) } else { None } })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FullConfig {
    pub target_modules: Targets,
    /// Train the targeted weights with GaLore instead of plain AdamW.
    #[serde(default)]
    pub galore: Option<GaloreConfig>,
}

impl AdapterMethod for FullConfig {
    fn peft_type(&self) -> &'static str {
        "FULL"
    }

    fn targets(&self) -> Option<&Targets> {
        Some(&self.target_modules)
    }

    fn peft_json(&self) -> Value {
        serde_json::to_value(self).expect("FullConfig serialises")
    }

    fn build_linear(&self, _path: &str, base: &FrozenLinear, _rng: &mut StdRng) -> Result<Option<BuiltLinear>> {
        Ok(Some((Box::new(FullLinear::new(base)?), None)))
    }

    fn training_extras(&self, _model: &Llama, _total_steps: usize) -> Result<TrainingExtras> {
        Ok(TrainingExtras { galore: self.galore, ..Default::default() })
    }
}

/// The engine's own `peft_type: "FULL"`.
pub fn read_full(v: &Value, path: &Path) -> Result<ReadConfig> {
    Ok((parse::<FullConfig>(v, path, "FULL")?.into(), &["target_modules", "galore"]))
}


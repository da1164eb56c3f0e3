//! IA3 (Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
//! Learning", NeurIPS 2022), as PEFT implements it.
//!
//! A learned vector `l`, initialised to 1. On an ordinary target it scales the output,
//! `y = (x Wᵀ) ⊙ l` with `l` [out, 1]; on a feed-forward target (`feedforward_modules`) it scales
//! the input, `y = (x ⊙ l) Wᵀ` with `l` [1, in]. PEFT's key: `ia3_l`. Merge: `W ← W ⊙ l`.

use serde::{Deserialize, Serialize};

use std::path::Path;

use rand::rngs::StdRng;
use serde_json::{json, Value};

use crate::adapters::flags::{FlagGroup, Flags, MethodFlags, TargetFlags};
use crate::adapters::config::{parse, ReadConfig};
use crate::adapters::method::{AdapterMethod, BuiltLinear};
use crate::adapters::Targets;
use crate::model::FrozenLinear;
use crate::Result;

mod layer;
pub use layer::*;

/// IA3's flags.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "IA3")]
pub struct Ia3Flags {
    /// The targets whose input (not output) is scaled.
    #[arg(long, value_delimiter = ',', default_value = "down_proj")]
    pub feedforward_modules: Vec<String>,
}

impl MethodFlags for Ia3Flags {}

pub const FLAGS: &[FlagGroup] = &[<TargetFlags as clap::Args>::augment_args, <Ia3Flags as clap::Args>::augment_args];

impl Ia3Config {
    pub fn from_flags(f: &Flags) -> Result<Self> {
        let (ia3, targets) = (f.read::<Ia3Flags>()?, f.read::<TargetFlags>()?);
        Ok(Self { target_modules: targets.targets(), feedforward_modules: Some(Targets::List(ia3.feedforward_modules)) })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ia3Config {
    pub target_modules: Targets,
    #[serde(default)]
    pub feedforward_modules: Option<Targets>,
}

impl AdapterMethod for Ia3Config {
    fn peft_type(&self) -> &'static str {
        "IA3"
    }

    fn targets(&self) -> Option<&Targets> {
        Some(&self.target_modules)
    }

    fn peft_json(&self) -> Value {
        json!({
            "target_modules": self.target_modules, "feedforward_modules": self.feedforward_modules,
            "fan_in_fan_out": false, "init_ia3_weights": true, "modules_to_save": null,
        })
    }

    fn build_linear(&self, path: &str, base: &FrozenLinear, _rng: &mut StdRng) -> Result<Option<BuiltLinear>> {
        let feedforward = match &self.feedforward_modules {
            Some(t) => t.matches(path)?,
            None => false,
        };
        Ok(Some((Box::new(Ia3Linear::new(base, feedforward)?), None)))
    }
}

/// PEFT's `peft_type: "IA3"`.
pub fn read_peft_ia3(v: &Value, path: &Path) -> Result<ReadConfig> {
    Ok((parse::<Ia3Config>(v, path, "IA3")?.into(), &["target_modules", "feedforward_modules"]))
}


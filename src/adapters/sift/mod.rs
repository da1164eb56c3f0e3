//! SIFT (Song et al., "Sparse is Enough in Fine-tuning Pre-trained Large Language Models",
//! ICML 2024; song-wx/SIFT `sift.py`, `use_lora=False` path, docs/METHODS.md §4.2).
//!
//! Per targeted weight W [out, in], `k = int(sparse_rate · numel) + 1` entries are trainable
//! (sparse_rate 0.2 in EfficientFT). The entries are chosen on the FIRST backward as the top-k of
//! |∂L/∂W|: until then the layer computes `y = x (W + P)ᵀ` with a dense zero probe P whose
//! gradient is ∂L/∂W; [`SiftHook`] accumulates it over the micro-batches, picks the indices
//! (stored in ascending order), and gives the first update the dense gradient gathered at them
//! (SIFT's backward hook moves the same sparse gradient into its vector). From then on
//! `y = x Wᵀ + x Δᵀ`, `Δ = scatter(indices, values)` with `values` [k] (zero-init) the only
//! trainable tensor, so only those k entries of the effective weight ever change.
//!
//! Not a PEFT type: the engine writes `peft_type: "SIFT"`, `<module>.sift_values` (f32 [k]) and
//! `<module>.sift_indices` (u32 [k], row-major positions in W).

use serde::{Deserialize, Serialize};

use std::path::Path;

use rand::rngs::StdRng;
use serde_json::Value;

use crate::adapters::flags::{FlagGroup, Flags, MethodFlags, TargetFlags};
use crate::validate::real_in;
use crate::adapters::config::{parse, ReadConfig};
use crate::adapters::method::{AdapterMethod, BuiltLinear, TrainingExtras};
use crate::adapters::Targets;
use crate::model::{FrozenLinear, Llama};
use crate::Result;

mod layer;
pub use layer::*;

/// SIFT's flags.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "SIFT")]
pub struct SiftFlags {
    /// Fraction of each targeted weight's entries that is trained.
    #[arg(long, default_value_t = 0.2)]
    pub sparse_rate: f64,
}

impl MethodFlags for SiftFlags {
    fn validate(&self) -> Result<()> {
        real_in("sparse-rate", self.sparse_rate, (0.0, false), (1.0, true))
    }
}

pub const FLAGS: &[FlagGroup] = &[<TargetFlags as clap::Args>::augment_args, <SiftFlags as clap::Args>::augment_args];

impl SiftConfig {
    pub fn from_flags(f: &Flags) -> Result<Self> {
        Ok(Self { target_modules: f.read::<TargetFlags>()?.targets(), sparse_rate: f.read::<SiftFlags>()?.sparse_rate })
    }
}
mod hook;
pub use hook::*;

fn default_rate() -> f64 {
    0.2
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiftConfig {
    pub target_modules: Targets,
    #[serde(default = "default_rate")]
    pub sparse_rate: f64,
}

impl AdapterMethod for SiftConfig {
    fn peft_type(&self) -> &'static str {
        "SIFT"
    }

    fn targets(&self) -> Option<&Targets> {
        Some(&self.target_modules)
    }

    fn peft_json(&self) -> Value {
        serde_json::to_value(self).expect("SiftConfig serialises")
    }

    fn build_linear(&self, _path: &str, base: &FrozenLinear, _rng: &mut StdRng) -> Result<Option<BuiltLinear>> {
        Ok(Some((Box::new(SiftLinear::new(base, self)?), None)))
    }

    fn training_extras(&self, model: &Llama, _total_steps: usize) -> Result<TrainingExtras> {
        Ok(TrainingExtras { hooks: vec![Box::new(SiftHook::new(model))], ..Default::default() })
    }
}

/// The engine's own `peft_type: "SIFT"`.
pub fn read_sift(v: &Value, path: &Path) -> Result<ReadConfig> {
    Ok((parse::<SiftConfig>(v, path, "SIFT")?.into(), &["target_modules", "sparse_rate"]))
}


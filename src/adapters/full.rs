//! Full fine-tuning of chosen modules (EfficientFT's `use_lora False` path, docs/METHODS.md §4.2): the
//! targeted linears' weights become trainable, `y = x Wᵀ` with W an f32 `Var` initialised from
//! the base weight. Optionally trained with GaLore (Zhao et al., "GaLore: Memory-Efficient LLM
//! Training by Gradient Low-Rank Projection", ICML 2024; see `adapters::galore`).
//!
//! Not a PEFT type: the engine writes `peft_type: "FULL"` and the full weights under
//! `base_model.model.<module>.weight`. The frozen base weight stays in place (so memory for the
//! targeted modules is base + f32 copy); merge writes W into the base, unmerge restores it.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use std::path::Path;

use rand::rngs::StdRng;
use serde_json::Value;

use super::config::{parse, ReadConfig};
use super::galore::GaloreConfig;
use super::method::{AdapterMethod, BuiltLinear, TrainingExtras};
use super::Targets;
use crate::model::{FrozenLinear, LinearAdapter, Llama};
use crate::ops::nn::matmul_t;
use crate::Result;

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

pub struct FullLinear {
    pub weight: Var,
    /// The base weight (shares its storage: no copy) for `unmerge`.
    original: Tensor,
}

impl FullLinear {
    pub fn new(base: &FrozenLinear) -> Result<Self> {
        Ok(Self { weight: Var::from_tensor(&base.weight()?.to_dtype(DType::F32)?)?, original: base.weight()?.into_owned() })
    }
}

impl LinearAdapter for FullLinear {
    fn forward(&self, x: &Tensor, _base: &FrozenLinear, _train: bool) -> Result<Tensor> {
        matmul_t(x, &self.weight.as_tensor().to_dtype(x.dtype())?)
    }

    fn merged_weight(&self, w: &Tensor) -> Result<Tensor> {
        Ok(self.weight.as_tensor().to_dtype(w.dtype())?)
    }

    fn unmerged_weight(&self, _merged: &Tensor) -> Result<Tensor> {
        Ok(self.original.clone())
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("weight".into(), self.weight.clone())]
    }
}

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

use super::Targets;
use crate::ops::nn::matmul_t;
use crate::model::{FrozenLinear, LinearAdapter};
use super::galore::GaloreConfig;
use crate::Result;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FullConfig {
    pub target_modules: Targets,
    /// Train the targeted weights with GaLore instead of plain AdamW.
    #[serde(default)]
    pub galore: Option<GaloreConfig>,
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

//! IA3 (Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
//! Learning", NeurIPS 2022), as PEFT implements it.
//!
//! A learned vector `l`, initialised to 1. On an ordinary target it scales the output,
//! `y = (x Wᵀ) ⊙ l` with `l` [out, 1]; on a feed-forward target (`feedforward_modules`) it scales
//! the input, `y = (x ⊙ l) Wᵀ` with `l` [1, in]. PEFT's key: `ia3_l`. Merge: `W ← W ⊙ l`.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use std::path::Path;

use rand::rngs::StdRng;
use serde_json::{json, Value};

use super::config::{parse, ReadConfig};
use super::method::{AdapterMethod, BuiltLinear};
use super::Targets;
use crate::model::{FrozenLinear, LinearAdapter};
use crate::Result;

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

pub struct Ia3Linear {
    pub l: Var,
    feedforward: bool,
}

impl Ia3Linear {
    pub fn new(base: &FrozenLinear, feedforward: bool) -> Result<Self> {
        let shape = if feedforward { (1, base.in_features()) } else { (base.out_features(), 1) };
        Ok(Self { l: Var::ones(shape, DType::F32, base.device())?, feedforward })
    }

    /// The scaling as a row vector in `dtype`, to broadcast over the last dim of activations.
    fn scaling(&self, dtype: DType) -> Result<Tensor> {
        Ok(self.l.as_tensor().flatten_all()?.to_dtype(dtype)?)
    }

    /// The scaling shaped to multiply W [out, in]: a column for outputs, a row for inputs.
    fn weight_scaling(&self) -> &Tensor {
        self.l.as_tensor()
    }
}

impl LinearAdapter for Ia3Linear {
    fn forward(&self, x: &Tensor, base: &FrozenLinear, _train: bool) -> Result<Tensor> {
        let l = self.scaling(x.dtype())?;
        if self.feedforward {
            base.forward(&x.broadcast_mul(&l)?)
        } else {
            Ok(base.forward(x)?.broadcast_mul(&l)?)
        }
    }

    fn merged_weight(&self, w: &Tensor) -> Result<Tensor> {
        Ok(w.to_dtype(DType::F32)?.broadcast_mul(self.weight_scaling())?.to_dtype(w.dtype())?)
    }

    fn unmerged_weight(&self, w: &Tensor) -> Result<Tensor> {
        Ok(w.to_dtype(DType::F32)?.broadcast_div(self.weight_scaling())?.to_dtype(w.dtype())?)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("ia3_l".into(), self.l.clone())]
    }
}

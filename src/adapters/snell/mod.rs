//! SNELL (Shen, Sun, Ji, Huang, Wang, "Expanding Sparse Tuning for Low Memory Usage", NeurIPS 2024;
//! ssfgunner/SNELL `model/vision_transformer_timm.py`, classes `KLoRA` and `SNELL`, docs/METHODS.md §3).
//!
//! Per adapted weight W [d_out, d_in], rank r and H heads (2 in the paper), two trainable tensors
//! `In` [H, d_in, r/H] and `Out` [H, d_out, r/H], both kaiming-uniform (a = √5) with the fan-in
//! torch computes for a 3-D tensor (`size(1)·size(2)`), i.e. U(±1/√(d·r/H)); the update is NOT
//! zero at start. The kernelized low-rank merge is a signed sum of Euclidean distance kernels:
//!
//! `ΔW[i, j] = Σ_h c_h · ‖In[h, i, :] − Out[h, j, :]‖₂`   (ΔW is d_in × d_out, `torch.cdist` summed over h)
//!
//! with `c = 0.1·(+1, −1)` (for other H, `c_h = 0.1·(−1)^h`). With sparsity s > 0 the weights compete
//! by magnitude, the threshold being recomputed every forward from the current ΔW:
//!
//! `τ = quantile(|ΔW|, s)` (torch.quantile, linear interpolation at position s·(n−1)),
//! `ΔW_s = ΔW ⊙ |ΔW| ⊙ 1[|ΔW| > τ]`, where the `|ΔW| ⊙ 1[…]` factor is detached (a constant in
//! backward: not a straight-through estimator, and no gradient through τ or the mask). With
//! s = 0 it is KLoRA: `ΔW_s = ΔW`, no sparsification and no |ΔW| factor.
//!
//! `y = x Wᵀ + x ΔW_s` (x [..., d_in]). Merge: `W ← W + ΔW_sᵀ` (in f32).
//!
//! Distances use `‖a‖² + ‖b‖² − 2 a·b` (one GEMM per head, torch.cdist's mm path), clamped at 0,
//! and a square root whose gradient at a zero distance is 0 (torch's convention).
//!
//! Not a PEFT type: the engine writes `peft_type: "SNELL"` with `r`, `heads`, `sparsity`,
//! `target_modules`, and the tensors `<module>.snell_in` (f32 [H, d_in, r/H]) and
//! `<module>.snell_out` (f32 [H, d_out, r/H]), e.g.
//! `base_model.model.model.layers.0.self_attn.q_proj.snell_in`.

use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use std::path::Path;

use serde_json::Value;

use crate::adapters::flags::{FlagGroup, Flags, MethodFlags, TargetFlags, MAX_RANK};
use crate::adapters::lora::LoraFlags;
use crate::validate::{int_in, real_in};
use crate::adapters::config::{parse, ReadConfig};
use crate::adapters::method::{check_rank, AdapterMethod, BuiltLinear};
use crate::adapters::Targets;
use crate::ops::snell_merge::check_sparsity;
use crate::model::FrozenLinear;
use crate::{Error, Result};

mod layer;
pub use layer::*;

/// SNELL's flags (with LoRA's r).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "SNELL")]
pub struct SnellFlags {
    /// Number of distance-kernel heads (must divide r).
    #[arg(long, default_value_t = 2)]
    pub snell_heads: usize,
    /// Quantile of |ΔW| under which entries are dropped, in [0, 1) (0: KLoRA).
    #[arg(long, default_value_t = 0.5)]
    pub sparsity: f64,
}

impl MethodFlags for SnellFlags {
    fn validate(&self) -> Result<()> {
        int_in("snell-heads", self.snell_heads, 1, MAX_RANK)?;
        real_in("sparsity", self.sparsity, (0.0, true), (1.0, false))
    }
}

pub const FLAGS: &[FlagGroup] = &[<TargetFlags as clap::Args>::augment_args, <LoraFlags as clap::Args>::augment_args, <SnellFlags as clap::Args>::augment_args];

impl SnellConfig {
    pub fn from_flags(f: &Flags) -> Result<Self> {
        let snell = f.read::<SnellFlags>()?;
        let c = Self { r: f.read::<LoraFlags>()?.r, heads: snell.snell_heads, sparsity: snell.sparsity, target_modules: f.read::<TargetFlags>()?.targets() };
        c.validate("--method snell")?;
        Ok(c)
    }
}

fn default_heads() -> usize {
    2
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnellConfig {
    /// Total rank r, split evenly over the heads (r/H per head).
    pub r: usize,
    #[serde(default = "default_heads")]
    pub heads: usize,
    /// The quantile s of |ΔW| below which entries are dropped, in [0, 1); 0 is KLoRA.
    #[serde(default)]
    pub sparsity: f64,
    pub target_modules: Targets,
}

impl SnellConfig {
    /// Checks r, heads and sparsity; errors start with `what` (the module being adapted).
    pub fn validate(&self, what: &str) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Adapter(format!("SNELL on `{what}`: rank r must be at least 1")));
        }
        if self.heads == 0 || !self.r.is_multiple_of(self.heads) {
            return Err(Error::Adapter(format!(
                "SNELL on `{what}`: heads = {} must be at least 1 and divide r = {}",
                self.heads, self.r
            )));
        }
        check_sparsity(self.sparsity, what)
    }
}

impl AdapterMethod for SnellConfig {
    fn peft_type(&self) -> &'static str {
        "SNELL"
    }

    fn targets(&self) -> Option<&Targets> {
        Some(&self.target_modules)
    }

    fn peft_json(&self) -> Value {
        serde_json::to_value(self).expect("SnellConfig serialises")
    }

    fn build_linear(&self, path: &str, base: &FrozenLinear, rng: &mut StdRng) -> Result<Option<BuiltLinear>> {
        check_rank(path, "r", self.r, base)?;
        self.validate(path)?;
        Ok(Some((Box::new(SnellLinear::new(base, self, rng)?), None)))
    }
}

/// The engine's own `peft_type: "SNELL"`.
pub fn read_snell(v: &Value, path: &Path) -> Result<ReadConfig> {
    Ok((parse::<SnellConfig>(v, path, "SNELL")?.into(), &["r", "heads", "sparsity", "target_modules"]))
}


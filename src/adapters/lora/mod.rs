//! LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) and its
//! rsLoRA scaling (Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023).
//!
//! `y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ`, with A [r, in] kaiming-uniform (a = √5, i.e. U(±1/√in)),
//! B [out, r] zero, and `s = α / r` (rsLoRA: `s = α / √r`). PEFT's keys: `lora_A.weight`,
//! `lora_B.weight`. Merge: `W ← W + s·B A`.

use std::path::Path;

use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::adapters::flags::{FlagGroup, Flags, MethodFlags, TargetFlags, MAX_RANK};
use crate::validate::{dropout, int_in, positive};
use crate::adapters::config::{parse, ReadConfig};
use crate::adapters::method::{check_rank, AdapterMethod, BuiltLinear};
use crate::adapters::{AdapterConfig, DoraLinear, EvaConfig, InitKind, LoraInitConfig, Targets};
use crate::error::Error;
use crate::model::FrozenLinear;
use crate::Result;

pub mod dora;
pub mod eva;
pub mod init;
mod layer;
pub use layer::*;

/// LoRA's flags; r is also the rank of SNELL, AdaLoRA's default and GaLore's.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "LoRA")]
pub struct LoraFlags {
    /// The rank r.
    #[arg(long, default_value_t = 8)]
    pub r: usize,
    /// α: the update is scaled by α / r (rsLoRA: α / √r).
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input.
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f64,
}

impl MethodFlags for LoraFlags {
    fn validate(&self) -> Result<()> {
        int_in("r", self.r, 1, MAX_RANK)?;
        positive("lora-alpha", self.lora_alpha, 1e6)?;
        dropout("lora-dropout", self.lora_dropout)
    }
}

/// The flag groups of every method of the LoRA family.
pub const FLAGS: &[FlagGroup] = &[<TargetFlags as clap::Args>::augment_args, <LoraFlags as clap::Args>::augment_args];

impl LoraConfig {
    /// LoRA from its flags; rsLoRA and DoRA are LoRA with `use_rslora` / `use_dora`.
    pub fn from_flags(f: &Flags, use_rslora: bool, use_dora: bool) -> Result<Self> {
        let (lora, targets) = (f.read::<LoraFlags>()?, f.read::<TargetFlags>()?);
        Ok(Self { r: lora.r, lora_alpha: lora.lora_alpha, lora_dropout: lora.lora_dropout, target_modules: targets.targets(), use_rslora, use_dora })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    pub target_modules: Targets,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

/// The keys of PEFT's `LoraConfig` that the engine reads or that do not change the computation.
const LORA_KEYS: &[&str] = &["r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora"];
const EVA_KEYS: &[&str] = &[
    "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora", "eva_config", "rank_pattern",
    "alpha_pattern",
];

impl AdapterMethod for LoraConfig {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn targets(&self) -> Option<&Targets> {
        Some(&self.target_modules)
    }

    fn peft_json(&self) -> Value {
        self.peft_json_with_init(json!(true))
    }

    fn build_linear(&self, path: &str, base: &FrozenLinear, rng: &mut StdRng) -> Result<Option<BuiltLinear>> {
        self.check(path, base)?;
        Ok(Some(if self.use_dora {
            (Box::new(DoraLinear::new(base, self, rng)?), None)
        } else {
            (Box::new(LoraLinear::new(base, self, rng)?), None)
        }))
    }
}

impl LoraConfig {
    /// The rank, checked before anything is allocated from it.
    pub fn check(&self, path: &str, base: &FrozenLinear) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Adapter("LoRA rank r must be at least 1".into()));
        }
        check_rank(path, "r", self.r, base)
    }

    /// PEFT's `adapter_config.json` for a LoRA whose `init_lora_weights` is `init`.
    pub fn peft_json_with_init(&self, init: Value) -> Value {
        json!({
            "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules, "use_rslora": self.use_rslora, "use_dora": self.use_dora,
            "bias": "none", "fan_in_fan_out": false, "init_lora_weights": init,
            "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": null,
            "layers_to_transform": null, "layers_pattern": null,
        })
    }
}

/// PEFT's `peft_type: "LORA"`: plain LoRA, rsLoRA and DoRA, or by `init_lora_weights` PiSSA,
/// OLoRA and EVA.
pub fn read_peft_lora(v: &Value, path: &Path) -> Result<ReadConfig> {
    let bad = |msg: String| Error::BadFile { path: path.to_path_buf(), msg };
    let cfg: LoraConfig = parse(v, path, "LoRA")?;
    let init = v.get("init_lora_weights").and_then(Value::as_str).unwrap_or("");
    if init == "eva" {
        if cfg.use_dora {
            return Err(bad("EVA with use_dora is not implemented".into()));
        }
        let rho = v.get("eva_config").and_then(|e| e.get("rho")).and_then(Value::as_f64).unwrap_or(2.0);
        let pattern = |key: &str| v.get(key).cloned().filter(|p| !p.is_null()).unwrap_or(json!({}));
        let rank_pattern = serde_json::from_value(pattern("rank_pattern")).map_err(|e| bad(format!("rank_pattern: {e}")))?;
        let alpha_pattern = serde_json::from_value(pattern("alpha_pattern")).map_err(|e| bad(format!("alpha_pattern: {e}")))?;
        return Ok((EvaConfig { lora: cfg, rho, rank_pattern, alpha_pattern }.into(), EVA_KEYS));
    }
    // pissa_niter_K is PEFT's randomised SVD: read as PiSSA with the exact SVD.
    let kind = match init {
        "pissa" => Some(InitKind::Pissa),
        s if s.starts_with("pissa_niter_") => Some(InitKind::Pissa),
        "olora" => Some(InitKind::Olora),
        _ => None,
    };
    let cfg: AdapterConfig = match kind {
        Some(_) if cfg.use_dora => return Err(bad(format!("init_lora_weights `{init}` with use_dora is not implemented"))),
        Some(kind) => LoraInitConfig { lora: cfg, kind }.into(),
        None => cfg.into(),
    };
    Ok((cfg, LORA_KEYS))
}


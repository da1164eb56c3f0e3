//! LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) and its
//! rsLoRA scaling (Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", 2023).
//!
//! `y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ`, with A [r, in] kaiming-uniform (a = √5, i.e. U(±1/√in)),
//! B [out, r] zero, and `s = α / r` (rsLoRA: `s = α / √r`). PEFT's keys: `lora_A.weight`,
//! `lora_B.weight`. Merge: `W ← W + s·B A`.

use std::path::Path;

use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::config::{parse, ReadConfig};
use super::method::{check_rank, AdapterMethod, BuiltLinear};
use super::{uniform_var, AdapterConfig, DoraLinear, EvaConfig, InitKind, LoraInitConfig, Targets};
use crate::error::Error;
use crate::ops::dropout::{Dropout, DropoutMask};
use crate::ops;
use crate::ops::nn::AttentionHeads;
use crate::ops::nn::matmul_t;
use crate::model::{FrozenLinear, LinearAdapter};
use crate::Result;

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

/// The low-rank pair of one adapted linear layer.
pub struct LoraLinear {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    dropout: Dropout,
}

impl LoraLinear {
    pub fn new(base: &FrozenLinear, cfg: &LoraConfig, rng: &mut StdRng) -> Result<Self> {
        let (out, inp) = (base.out_features(), base.in_features());
        let device = base.device();
        let bound = 1.0 / (inp as f64).sqrt();
        Ok(Self {
            a: uniform_var(&[cfg.r, inp], bound, rng, device)?,
            b: Var::zeros((out, cfg.r), DType::F32, device)?,
            scale: cfg.scale(),
            dropout: Dropout::new(cfg.lora_dropout, rng),
        })
    }

    /// A pair with given values (PiSSA, OLoRA, EVA and the rank-2r conversion set A and B).
    pub fn from_parts(a: &Tensor, b: &Tensor, scale: f64, dropout: f64, rng: &mut StdRng) -> Result<Self> {
        Ok(Self {
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
            scale,
            dropout: Dropout::new(dropout, rng),
        })
    }

    /// `s · B A` in the base weight's dtype.
    pub fn delta_weight(&self, dtype: DType) -> Result<Tensor> {
        Ok((self.b.as_tensor().matmul(self.a.as_tensor())? * self.scale)?.to_dtype(dtype)?)
    }

    /// `s · (x Aᵀ) Bᵀ`, with the adapter weights cast to x's dtype as autocast would.
    pub fn branch(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.a.as_tensor().to_dtype(x.dtype())?;
        let b = self.b.as_tensor().to_dtype(x.dtype())?;
        Ok((matmul_t(&matmul_t(x, &a)?, &b)? * self.scale)?)
    }

    pub fn dropout(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.dropout.apply(x, train)
    }

    /// This forward pass's dropout mask (None when dropout is off or not training).
    pub fn dropout_mask(&self, train: bool) -> Option<DropoutMask> {
        self.dropout.mask(train)
    }

    pub fn dropout_active(&self) -> bool {
        self.dropout.p > 0.0
    }

    /// A and B in g's dtype when training takes the fused SwiGLU + LoRA op for `silu(g) ⊙ u`.
    fn swiglu_fused_factors(&self, g: &Tensor, u: &Tensor, train: bool) -> Result<Option<(Tensor, Tensor)>> {
        let fits = g.shape() == u.shape() && g.dtype() == u.dtype() && g.device().same_device(u.device());
        if !(train && fits && ops::fused_forward(g, train)) {
            return Ok(None);
        }
        Ok(Some((self.a.as_tensor().to_dtype(g.dtype())?, self.b.as_tensor().to_dtype(g.dtype())?)))
    }
}

impl LinearAdapter for LoraLinear {
    /// One fused op (src/ops/lora_linear.rs) on CUDA, and in CPU training; plain candle ops
    /// otherwise (and with `--unfused`).
    fn forward(&self, x: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor> {
        if ops::fused_forward(x, train) {
            let a = self.a.as_tensor().to_dtype(x.dtype())?;
            let b = self.b.as_tensor().to_dtype(x.dtype())?;
            return ops::lora_linear(x, base.base_weight(), &a, &b, self.scale, self.dropout_mask(train));
        }
        Ok((base.forward(x)? + self.branch(&self.dropout(x, train)?)?)?)
    }

    fn forward_heads(&self, x: &Tensor, base: &FrozenLinear, heads: AttentionHeads, train: bool) -> Result<Tensor> {
        if ops::fused_forward(x, train) && heads.fused(x, train) {
            let a = self.a.as_tensor().to_dtype(x.dtype())?;
            let b = self.b.as_tensor().to_dtype(x.dtype())?;
            return ops::lora_linear_heads(x, base.base_weight(), (&a, &b), self.scale, self.dropout_mask(train), heads);
        }
        heads.split(&self.forward(x, base, train)?, train)
    }

    fn forward_swiglu(&self, g: &Tensor, u: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor> {
        if let Some((a, b)) = self.swiglu_fused_factors(g, u, train)? {
            return ops::swiglu_lora_linear(g, u, base.base_weight(), (&a, &b), self.scale, self.dropout_mask(train));
        }
        self.forward(&crate::ops::nn::swiglu(g, u, train)?, base, train)
    }

    fn forward_swiglu_backward_only(&self, g: &Tensor, u: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor> {
        if let Some((a, b)) = self.swiglu_fused_factors(g, u, train)? {
            return ops::swiglu_lora_linear_backward_only(g, u, base.base_weight(), (&a, &b), self.scale, self.dropout_mask(train));
        }
        self.forward_swiglu(g, u, base, train)
    }

    fn merged_weight(&self, w: &Tensor) -> Result<Tensor> {
        Ok((w.to_dtype(DType::F32)? + self.delta_weight(DType::F32)?)?.to_dtype(w.dtype())?)
    }

    fn unmerged_weight(&self, w: &Tensor) -> Result<Tensor> {
        Ok((w.to_dtype(DType::F32)? - self.delta_weight(DType::F32)?)?.to_dtype(w.dtype())?)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("lora_A.weight".into(), self.a.clone()), ("lora_B.weight".into(), self.b.clone())]
    }
}

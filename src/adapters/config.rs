//! Which method, with which options, on which modules: the config of every method, read from and
//! written to PEFT's `adapter_config.json` (the engine's own `peft_type` for the methods PEFT
//! does not have).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{AdaLoraConfig, ControlConfig, EvaConfig, FullConfig, Ia3Config, InitKind, LoraConfig, NonlinearControlConfig, SiftConfig, SnellConfig};
use crate::error::{Error, Result};

/// Which modules to adapt: a list of names matched against the end of the module path, or
/// (PEFT's other form) one regular expression that must match the whole path. `all-linear`
/// selects every linear layer of the decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    List(Vec<String>),
    Pattern(String),
}

impl Targets {
    pub fn matches(&self, path: &str) -> Result<bool> {
        Ok(match self {
            Targets::List(names) => names.iter().any(|n| path == n || path.ends_with(&format!(".{n}"))),
            Targets::Pattern(p) if p == "all-linear" => true,
            Targets::Pattern(p) => regex::Regex::new(&format!("^(?:{p})$"))
                .map_err(|e| Error::Adapter(format!("target_modules pattern `{p}`: {e}")))?
                .is_match(path),
        })
    }
}

/// The methods the engine implements, each with its own config.
#[derive(Debug, Clone, PartialEq)]
pub enum AdapterConfig {
    /// LoRA, rsLoRA (`use_rslora`) and DoRA (`use_dora`), as PEFT's `LoraConfig`.
    Lora(LoraConfig),
    /// LoRA initialised from W (PiSSA, OLoRA): PEFT's LoRA with `init_lora_weights` "pissa"/"olora".
    LoraInit(LoraConfig, InitKind),
    /// EVA: PEFT's LoRA with `init_lora_weights: "eva"`; the data-driven init is `initialize_eva`.
    Eva(EvaConfig),
    Ia3(Ia3Config),
    /// PEFT's `AdaLoraConfig`.
    AdaLora(AdaLoraConfig),
    /// Sparse increment fine-tuning (engine format, `peft_type: "SIFT"`).
    Sift(SiftConfig),
    /// SNELL, kernelized LoRA with competition-based sparsification (engine format, `"SNELL"`).
    Snell(SnellConfig),
    /// Full fine-tuning of the targeted weights, optionally with GaLore (engine format, `"FULL"`).
    Full(FullConfig),
    /// Parallel Control, Double Control and Control + LoRA (not a PEFT type: "CONTROL").
    Control(ControlConfig),
    /// Control with the parameter-free attention controller (not a PEFT type: "NONLINEAR_CONTROL").
    NonlinearControl(NonlinearControlConfig),
}

/// Keys of PEFT's configs that the engine reads or that do not change the computation.
const LORA_KEYS: &[&str] = &["r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora"];
const IA3_KEYS: &[&str] = &["target_modules", "feedforward_modules"];
/// AdaLoRA inherits LoRA's `r`, which PEFT ignores for AdaLoRA (the rank is `init_r`).
const ADALORA_KEYS: &[&str] = &[
    "r", "lora_alpha", "lora_dropout", "target_modules", "target_r", "init_r", "tinit", "tfinal", "deltaT",
    "beta1", "beta2", "orth_reg_weight", "total_step",
];
const EVA_KEYS: &[&str] = &[
    "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora", "eva_config", "rank_pattern",
    "alpha_pattern",
];
const SIFT_KEYS: &[&str] = &["target_modules", "sparse_rate"];
const SNELL_KEYS: &[&str] = &["r", "heads", "sparsity", "target_modules"];
const FULL_KEYS: &[&str] = &["target_modules", "galore"];
const CONTROL_KEYS: &[&str] =
    &["control_rank", "control_alpha", "control_dropout", "double_control", "double_control_rank", "lora"];
const NONLINEAR_CONTROL_KEYS: &[&str] = &["control_rank", "stable_mode"];
const COMMON_KEYS: &[&str] = &[
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "init_lora_weights", "init_ia3_weights",
];
/// PEFT options (up to 0.21) that change what the adapter computes, or which weights it holds,
/// and that the engine does not implement. Each is accepted only at its inert value (null,
/// false, empty, PEFT's default); anything else is an error naming the option, because reading
/// the adapter without it would silently compute something else. Keys in none of these lists
/// are ignored: PEFT adds options every release, nearly all of them inert at their default, and
/// refusing every adapter saved by a newer PEFT would be worse than a warning.
const UNIMPLEMENTED_KEYS: &[&str] = &[
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "bias", "corda_config",
    "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out", "kasa_config",
    "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_bias",
    "lora_ga_config", "megatron_config", "megatron_core", "modules_to_save", "monteclora_config",
    "qalora_group_size", "rank_pattern", "target_parameters", "trainable_token_indices", "use_bdlora",
    "use_qalora", "velora_config",
];

impl AdapterConfig {
    pub fn peft_type(&self) -> &'static str {
        match self {
            AdapterConfig::Lora(_) | AdapterConfig::LoraInit(..) | AdapterConfig::Eva(_) => "LORA",
            AdapterConfig::Ia3(_) => "IA3",
            AdapterConfig::AdaLora(_) => "ADALORA",
            AdapterConfig::Sift(_) => "SIFT",
            AdapterConfig::Snell(_) => "SNELL",
            AdapterConfig::Full(_) => "FULL",
            AdapterConfig::Control(_) => "CONTROL",
            AdapterConfig::NonlinearControl(_) => "NONLINEAR_CONTROL",
        }
    }

    /// The linear layers the method adapts (None: it only attaches block controls).
    pub fn targets(&self) -> Option<&Targets> {
        match self {
            AdapterConfig::Lora(c) | AdapterConfig::LoraInit(c, _) => Some(&c.target_modules),
            AdapterConfig::Eva(c) => Some(&c.lora.target_modules),
            AdapterConfig::Ia3(c) => Some(&c.target_modules),
            AdapterConfig::AdaLora(c) => Some(&c.target_modules),
            AdapterConfig::Sift(c) => Some(&c.target_modules),
            AdapterConfig::Snell(c) => Some(&c.target_modules),
            AdapterConfig::Full(c) => Some(&c.target_modules),
            AdapterConfig::Control(c) => c.lora.as_ref().map(|l| &l.target_modules),
            AdapterConfig::NonlinearControl(_) => None,
        }
    }

    /// Parse PEFT's `adapter_config.json`. Keys the engine does not know are ignored (PEFT adds
    /// some every release); an option that changes the computation and is not implemented is an error.
    pub fn from_peft_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::BadFile { path: path.to_path_buf(), msg };
        fn parse<T: serde::de::DeserializeOwned>(v: &Value, path: &Path, what: &str) -> Result<T> {
            serde_json::from_value(v.clone()).map_err(|e| Error::BadFile { path: path.to_path_buf(), msg: format!("{what} config: {e}") })
        }
        let peft_type = v.get("peft_type").and_then(Value::as_str).ok_or_else(|| bad("no `peft_type`".into()))?;
        let (known, cfg): (&[&str], AdapterConfig) = match peft_type {
            "LORA" => {
                let cfg: LoraConfig = parse(v, path, "LoRA")?;
                let init = v.get("init_lora_weights").and_then(Value::as_str).unwrap_or("");
                // pissa_niter_K is PEFT's randomised SVD: read as PiSSA with the exact SVD.
                let kind = match init {
                    "pissa" => Some(InitKind::Pissa),
                    s if s.starts_with("pissa_niter_") => Some(InitKind::Pissa),
                    "olora" => Some(InitKind::Olora),
                    _ => None,
                };
                if init == "eva" {
                    if cfg.use_dora {
                        return Err(bad("EVA with use_dora is not implemented".into()));
                    }
                    let rho = v.get("eva_config").and_then(|e| e.get("rho")).and_then(Value::as_f64).unwrap_or(2.0);
                    let pattern = |key: &str| -> Result<Value> { Ok(v.get(key).cloned().filter(|p| !p.is_null()).unwrap_or(json!({}))) };
                    let rank_pattern = serde_json::from_value(pattern("rank_pattern")?).map_err(|e| bad(format!("rank_pattern: {e}")))?;
                    let alpha_pattern = serde_json::from_value(pattern("alpha_pattern")?).map_err(|e| bad(format!("alpha_pattern: {e}")))?;
                    let eva = EvaConfig { lora: cfg, rho, rank_pattern, alpha_pattern };
                    (EVA_KEYS, AdapterConfig::Eva(eva))
                } else { match kind {
                    Some(_) if cfg.use_dora => return Err(bad(format!("init_lora_weights `{init}` with use_dora is not implemented"))),
                    Some(kind) => (LORA_KEYS, AdapterConfig::LoraInit(cfg, kind)),
                    None => (LORA_KEYS, AdapterConfig::Lora(cfg)),
                } }
            }
            "ADALORA" => (ADALORA_KEYS, AdapterConfig::AdaLora(parse(v, path, "AdaLoRA")?)),
            "SIFT" => (SIFT_KEYS, AdapterConfig::Sift(parse(v, path, "SIFT")?)),
            "SNELL" => (SNELL_KEYS, AdapterConfig::Snell(parse(v, path, "SNELL")?)),
            "FULL" => (FULL_KEYS, AdapterConfig::Full(parse(v, path, "FULL")?)),
            "IA3" => (IA3_KEYS, AdapterConfig::Ia3(parse(v, path, "IA3")?)),
            "CONTROL" => (CONTROL_KEYS, AdapterConfig::Control(parse(v, path, "Control")?)),
            "NONLINEAR_CONTROL" => (NONLINEAR_CONTROL_KEYS, AdapterConfig::NonlinearControl(parse(v, path, "nonlinear Control")?)),
            other => {
                return Err(bad(format!(
                    "peft_type `{other}` is not implemented by this engine (LORA, IA3, ADALORA, SIFT, SNELL, FULL, CONTROL, NONLINEAR_CONTROL)"
                )))
            }
        };
        let obj = v.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        for (key, value) in obj {
            if known.contains(&key.as_str()) || COMMON_KEYS.contains(&key.as_str()) {
                continue;
            }
            if !UNIMPLEMENTED_KEYS.contains(&key.as_str()) {
                tracing::warn!("{}: ignoring unknown option `{key}` = {value}", path.display());
                continue;
            }
            let inert = match value {
                Value::Null => true,
                Value::Bool(b) => !b,
                Value::Object(m) => m.is_empty(),
                Value::Array(a) => a.is_empty(),
                Value::String(s) => key == "bias" && s == "none" || key == "megatron_core",
                Value::Number(_) => key == "qalora_group_size",
            };
            if inert {
                tracing::debug!("{}: ignoring `{key}` = {value}", path.display());
            } else {
                return Err(bad(format!("option `{key}` = {value} is not implemented by this engine")));
            }
        }
        Ok(cfg)
    }

    /// The `adapter_config.json` PEFT would write for this adapter.
    pub fn to_peft_json(&self, base_model: Option<&str>) -> Value {
        let lora = |c: &LoraConfig, init: Value| {
            json!({
                "r": c.r, "lora_alpha": c.lora_alpha, "lora_dropout": c.lora_dropout,
                "target_modules": c.target_modules, "use_rslora": c.use_rslora, "use_dora": c.use_dora,
                "bias": "none", "fan_in_fan_out": false, "init_lora_weights": init,
                "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": null,
                "layers_to_transform": null, "layers_pattern": null,
            })
        };
        let mut v = match self {
            AdapterConfig::Lora(c) => lora(c, json!(true)),
            AdapterConfig::LoraInit(c, kind) => lora(c, json!(kind.peft_name())),
            AdapterConfig::Eva(c) => {
                let mut v = lora(&c.lora, json!("eva"));
                v["eva_config"] = json!({
                    "rho": c.rho, "tau": 0.99, "use_label_mask": true, "label_mask_value": -100,
                    "whiten": false, "adjust_scaling_factors": true,
                });
                v["rank_pattern"] = json!(c.rank_pattern);
                v["alpha_pattern"] = json!(c.alpha_pattern);
                v
            }
            AdapterConfig::AdaLora(c) => {
                let mut v = serde_json::to_value(c).expect("AdaLoraConfig serialises");
                v["r"] = json!(c.target_r);
                v["bias"] = json!("none");
                v["fan_in_fan_out"] = json!(false);
                v["init_lora_weights"] = json!(true);
                v["rank_pattern"] = Value::Null;
                v["modules_to_save"] = Value::Null;
                v
            }
            AdapterConfig::Sift(c) => serde_json::to_value(c).expect("SiftConfig serialises"),
            AdapterConfig::Snell(c) => serde_json::to_value(c).expect("SnellConfig serialises"),
            AdapterConfig::Full(c) => serde_json::to_value(c).expect("FullConfig serialises"),
            AdapterConfig::Ia3(c) => json!({
                "target_modules": c.target_modules, "feedforward_modules": c.feedforward_modules,
                "fan_in_fan_out": false, "init_ia3_weights": true, "modules_to_save": null,
            }),
            AdapterConfig::Control(c) => json!(c),
            AdapterConfig::NonlinearControl(c) => json!(c),
        };
        v["peft_type"] = json!(self.peft_type());
        v["task_type"] = json!("CAUSAL_LM");
        v["inference_mode"] = json!(true);
        v["base_model_name_or_path"] = json!(base_model);
        v["revision"] = Value::Null;
        v
    }
}

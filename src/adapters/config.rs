//! Which method, with which options, on which modules: the config of every method, read from and
//! written to PEFT's `adapter_config.json` (the engine's own `peft_type` for the methods PEFT
//! does not have).

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::registry;
pub use super::method::AdapterConfig;
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

/// Keys every adapter_config.json may have, whatever the method.
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

/// Parse a method's config out of `adapter_config.json` (`v`, read from `path`) with serde.
pub fn parse<T: serde::de::DeserializeOwned>(v: &Value, path: &Path, what: &str) -> Result<T> {
    serde_json::from_value(v.clone()).map_err(|e| Error::BadFile { path: path.to_path_buf(), msg: format!("{what} config: {e}") })
}

/// An `adapter_config.json` read by its method: the config and the keys the method reads.
pub type ReadConfig = (AdapterConfig, &'static [&'static str]);

impl AdapterConfig {
    /// Parse PEFT's `adapter_config.json`: the method table's reader for its `peft_type`. Keys
    /// the engine does not know are ignored (PEFT adds some every release); an option that
    /// changes the computation and is not implemented is an error.
    pub fn from_peft_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::BadFile { path: path.to_path_buf(), msg };
        let peft_type = v.get("peft_type").and_then(Value::as_str).ok_or_else(|| bad("no `peft_type`".into()))?;
        let Some(method) = registry::METHODS.iter().find(|m| m.peft_type == peft_type) else {
            let mut known: Vec<&str> = Vec::new();
            for m in registry::METHODS {
                if !known.contains(&m.peft_type) {
                    known.push(m.peft_type);
                }
            }
            return Err(bad(format!("peft_type `{peft_type}` is not implemented by this engine ({})", known.join(", "))));
        };
        let (cfg, known) = (method.read)(v, path)?;
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
        let mut v = self.peft_json();
        v["peft_type"] = json!(self.peft_type());
        v["task_type"] = json!("CAUSAL_LM");
        v["inference_mode"] = json!(true);
        v["base_model_name_or_path"] = json!(base_model);
        v["revision"] = Value::Null;
        v
    }
}

//! The LLaMA-family configuration, read from a Hugging Face `config.json`.
//!
//! Both spellings of the RoPE settings are accepted: transformers 4 (`rope_theta`, `rope_scaling`)
//! and transformers 5 (`rope_parameters { rope_theta, rope_type, ... }`).

use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::path::Path;

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: usize },
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

impl LlamaConfig {
    /// Every decoder layer's linear layers: name within the layer and shape [out, in].
    pub fn layer_linears(&self) -> [(&'static str, [usize; 2]); 7] {
        let (h, kv, hd, im) = (self.hidden_size, self.num_key_value_heads, self.head_dim, self.intermediate_size);
        let q = self.num_attention_heads * hd;
        [
            ("self_attn.q_proj", [q, h]),
            ("self_attn.k_proj", [kv * hd, h]),
            ("self_attn.v_proj", [kv * hd, h]),
            ("self_attn.o_proj", [h, q]),
            ("mlp.gate_proj", [im, h]),
            ("mlp.up_proj", [im, h]),
            ("mlp.down_proj", [h, im]),
        ]
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let v: Value = crate::error::read_json(path)?;
        Self::from_value(&v, path)
    }

    pub fn from_value(v: &Value, path: &Path) -> Result<Self> {
        let missing = |key: &str| Error::MissingConfigKey { path: path.to_path_buf(), key: key.to_string() };
        let invalid = |msg: String| Error::InvalidConfig { path: path.to_path_buf(), msg };
        let req = |key: &str| -> Result<usize> {
            let x = v.get(key).ok_or_else(|| missing(key))?;
            x.as_u64().map(|x| x as usize).ok_or_else(|| invalid(format!("`{key}` must be a positive integer, got {x}")))
        };
        let hidden_size = req("hidden_size")?;
        let num_attention_heads = req("num_attention_heads")?;
        let num_key_value_heads = match v.get("num_key_value_heads") {
            Some(Value::Null) | None => num_attention_heads,
            Some(_) => req("num_key_value_heads")?,
        };
        let head_dim = match v.get("head_dim") {
            Some(Value::Null) | None => hidden_size / num_attention_heads.max(1),
            Some(_) => req("head_dim")?,
        };
        if num_attention_heads == 0 || num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(invalid(format!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let rope = v.get("rope_parameters").filter(|r| r.is_object());
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let scaling = v.get("rope_scaling").filter(|r| r.is_object()).or(rope);
        let rope_scaling = match scaling {
            None => None,
            Some(s) => {
                let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
                match kind {
                    "default" => None,
                    "llama3" => {
                        let f = |k: &str| s.get(k).and_then(Value::as_f64).ok_or_else(|| missing(&format!("rope_scaling.{k}")));
                        Some(RopeScaling::Llama3 {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
                        })
                    }
                    other => return Err(invalid(format!("rope scaling type `{other}` is not supported (default, llama3)"))),
                }
            }
        };
        let token = |key: &str| v.get(key).and_then(Value::as_u64).map(|x| x as u32);
        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
            Some(x) => x.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            None => vec![],
        };
        let vocab_size = req("vocab_size")?;
        let special = [("bos_token_id", token("bos_token_id")), ("pad_token_id", token("pad_token_id"))];
        for (key, id) in special.into_iter().chain(eos_token_ids.iter().map(|&id| ("eos_token_id", Some(id)))) {
            if let Some(id) = id.filter(|&id| id as usize >= vocab_size) {
                return Err(invalid(format!("`{key}` {id} is past the vocabulary (vocab_size {vocab_size})")));
            }
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(invalid(format!("hidden_act `{act}` is not supported (LLaMA uses silu)")));
            }
        }
        Ok(Self {
            vocab_size,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: v.get("max_position_embeddings").and_then(Value::as_u64).unwrap_or(4096) as usize,
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            bos_token_id: token("bos_token_id"),
            eos_token_ids,
            pad_token_id: token("pad_token_id"),
        })
    }

    /// The `config.json` transformers writes for this model.
    pub fn to_hf_json(&self) -> Value {
        let mut v = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() { [one] => json!(one), many => json!(many) },
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        });
        if let Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) =
            &self.rope_scaling
        {
            v["rope_scaling"] = json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            });
        }
        v
    }

    /// SmolLM2-135M's shape (as its GGUF metadata gives it), for benchmarks with random weights.
    pub fn smollm2_135m() -> Self {
        Self {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            rope_scaling: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            pad_token_id: Some(2),
        }
    }

    /// LLaMA-2-7B's shape (the PyTorch + PEFT anchors' model), for benchmarks with random weights.
    pub fn llama2_7b() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 32,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            pad_token_id: Some(0),
        }
    }

    /// A tiny model for tests and the demo.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            hidden_size: 64,
            intermediate_size: 176,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 512,
            tie_word_embeddings: true,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            pad_token_id: Some(0),
        }
    }
}

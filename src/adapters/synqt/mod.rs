//! SynQT (Zhang, Bai, Lu, Lian, Wang, Wang, Xia, "Parameter-Efficient and Memory-Efficient
//! Tuning for Vision Transformer: A Disentangled Approach", ECCV 2024, arXiv 2407.06964; code:
//! taolinzhang/SynQT, `synqt.py`): a side network of learned query tokens beside a frozen ViT.
//!
//! Before block i a query synthesis module (QSM) makes T query tokens from its learned tokens
//! `P⁰ᵢ` [T, C] and the previous block's pooled query output `Qᵢ₋₁`:
//!
//! ```text
//! P̃ᵢ = Adapter₄₈(P⁰ᵢ + s_feat · Qᵢ₋₁)          (P⁰₀ alone for the first block)
//! P̂ᵢ = P̃ + s_attn · QsmAttn(LN₁ P̃),  then  P̂ᵢ += s_ffn · Adapter₄₈(LN₂ P̂ᵢ)
//! QsmAttn(x) = Adapter₈( softmax(q kᵀ / √C) v ),  q = Adapter₈(LN_q x), k, v = Adapter₈(LN_kv x)
//! Adapterₙ(x) = x + fc2(GELU(fc1 x))            (fc1: C → n, its own residual)
//! ```
//!
//! The frozen block i is applied "query-only" to P̂ᵢ (`VitBlock::forward_queries`): the queries
//! attend to the image's keys and values and go through the block's MLP, the image never sees
//! them. Its outputs, each averaged over the T tokens, are `Qᵢ` (the queries after the block),
//! `hᵢ` (the attention branch) and `hhᵢ` (the MLP branch). The head combines them, with one
//! shared adapter and a weight per feature conditioned on the image:
//!
//! ```text
//! F = [Q_{L−1}; Q₀..Q_{L−1}; h₀..h_{L−1}; hh₀..hh_{L−1}]       [b, 1 + 3L, C]
//! Gⱼ = Fⱼ + Adapter₄₈(LN_out Fⱼ)
//! w = [1; tanh(GELU(W_w G₀ + b_w))]                            [b, 1 + 3L]
//! logits = head(LN_head(mean_j wⱼ Gⱼ))                         (LN_head starts as the backbone's final norm)
//! ```
//!
//! The image path depends on no trained tensor, so it records no graph: training keeps only the
//! query path's activations and each block's image keys and values, which is the method's point
//! (its peak memory against LoRA's, `bench methods --shape vit-s14`).
//!
//! Initialisation as the seed's code: `P⁰` uniform in ±1, every map PyTorch's default
//! (U(±1/√in) for weight and bias), norms the identity, the scales `s_attn`, `s_ffn` learned
//! scalars from the config (`s_feat` fixed). Left out: the seed's dropout (0.1 in its adapters
//! and after each QSM) and DropPath, as the engine's other vision methods train without them.
//! The seed's per-task scales for CIFAR-100 are the defaults (T = 4, s_feat 0.1, s_attn 1.0,
//! s_ffn 0.1).
//!
//! Adapter file: `peft_type` "SYNQT" (not a PEFT type), the tensors under
//! `base_model.model.synqt.` and the linear head as `base_model.model.classifier.*`.

use std::path::Path;

use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::adapters::config::{parse, ReadConfig};
use crate::adapters::flags::{FlagGroup, Flags, MethodFlags};
use crate::adapters::method::AdapterMethod;
use crate::adapters::Targets;
use crate::error::{Error, Result};
use crate::model::Llama;
use crate::validate::{int_in, real_in};

mod network;
pub use network::Synqt;

/// SynQT's flags.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "SynQT")]
pub struct SynqtFlags {
    /// T, the query tokens of each block.
    #[arg(long, default_value_t = 4)]
    pub synqt_tokens: usize,
    /// s_feat: the scale of the previous block's pooled queries added to the learned tokens.
    #[arg(long, default_value_t = 0.1)]
    pub synqt_feat_scale: f64,
    /// s_attn's initial value (learned): the QSM's attention branch.
    #[arg(long, default_value_t = 1.0)]
    pub synqt_attn_scale: f64,
    /// s_ffn's initial value (learned): the QSM's adapter branch.
    #[arg(long, default_value_t = 0.1)]
    pub synqt_ffn_scale: f64,
    /// The width of the QSM's and the head's adapters.
    #[arg(long, default_value_t = 48)]
    pub synqt_adapter_width: usize,
    /// The width of the adapters of the QSM's attention (its q, k, v and output).
    #[arg(long, default_value_t = 8)]
    pub synqt_attention_width: usize,
}

impl MethodFlags for SynqtFlags {
    fn validate(&self) -> Result<()> {
        int_in("synqt-tokens", self.synqt_tokens, 1, 1024)?;
        real_in("synqt-feat-scale", self.synqt_feat_scale, (-1e3, true), (1e3, true))?;
        real_in("synqt-attn-scale", self.synqt_attn_scale, (-1e3, true), (1e3, true))?;
        real_in("synqt-ffn-scale", self.synqt_ffn_scale, (-1e3, true), (1e3, true))?;
        int_in("synqt-adapter-width", self.synqt_adapter_width, 1, 1 << 14)?;
        int_in("synqt-attention-width", self.synqt_attention_width, 1, 1 << 14)
    }
}

pub const FLAGS: &[FlagGroup] = &[<SynqtFlags as clap::Args>::augment_args];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SynqtConfig {
    pub tokens: usize,
    pub feat_scale: f64,
    pub attn_scale: f64,
    pub ffn_scale: f64,
    pub adapter_width: usize,
    pub attention_width: usize,
}

impl SynqtConfig {
    pub fn from_flags(f: &Flags) -> Result<Self> {
        let s = f.read::<SynqtFlags>()?;
        Ok(Self {
            tokens: s.synqt_tokens,
            feat_scale: s.synqt_feat_scale,
            attn_scale: s.synqt_attn_scale,
            ffn_scale: s.synqt_ffn_scale,
            adapter_width: s.synqt_adapter_width,
            attention_width: s.synqt_attention_width,
        })
    }
}

impl AdapterMethod for SynqtConfig {
    fn peft_type(&self) -> &'static str {
        "SYNQT"
    }

    fn targets(&self) -> Option<&Targets> {
        None
    }

    fn peft_json(&self) -> Value {
        json!(self)
    }

    fn inject(&self, _model: &mut Llama, _rng: &mut StdRng) -> Result<usize> {
        Err(Error::Adapter("SynQT is a side network of a vision transformer (vision-finetune, bench step --shape vit-s14); it does not attach to LLaMA".into()))
    }

    fn trains_llama(&self) -> bool {
        false
    }
}

/// The engine's own `peft_type: "SYNQT"`.
pub fn read_synqt(v: &Value, path: &Path) -> Result<ReadConfig> {
    const KEYS: &[&str] = &["tokens", "feat_scale", "attn_scale", "ffn_scale", "adapter_width", "attention_width"];
    let cfg = parse::<SynqtConfig>(v, path, "SynQT")?;
    // A file could hold any size: the widths and the token count are allocated from.
    let bad = |msg: String| Error::BadFile { path: path.to_path_buf(), msg };
    for (name, value) in [("tokens", cfg.tokens), ("adapter_width", cfg.adapter_width), ("attention_width", cfg.attention_width)] {
        if value == 0 || value > 1 << 14 {
            return Err(bad(format!("SynQT config: {name} = {value} is not between 1 and 16384")));
        }
    }
    Ok((cfg.into(), KEYS))
}

//! Where models come from: Hugging Face directories (local or in the hub cache) and GGUF files,
//! and the conversion from GGUF to a Hugging Face directory.

pub mod convert;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod onnx;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::model::{Llama, LlamaConfig};
use crate::quant::Quantization;

/// A loaded model with its tokenizer (when the checkpoint has one) and where it came from.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    pub source: String,
}

/// Load a model from a GGUF file, a local Hugging Face directory, or a hub repo id
/// (`org/name[@revision]`), with its weights in `dtype` on `device`.
pub fn load_model(spec: &str, dtype: DType, device: &Device) -> Result<LoadedModel> {
    load_model_with(spec, dtype, device, None)
}

/// `load_model`, quantizing the frozen linear weights when `quantize` is given (`--quantize nf4`).
/// A checkpoint saved by transformers + bitsandbytes in NF4 loads as NF4 either way.
pub fn load_model_with(spec: &str, dtype: DType, device: &Device, quantize: Option<Quantization>) -> Result<LoadedModel> {
    load(spec, dtype, device, quantize, false)
}

/// The dtypes training runs in for `--dtype dtype` on `device`: (activations, frozen linear
/// weights). On the CPU, bf16 is mixed precision as autocast has it: the frozen linear weights
/// and the operands of their products in bf16 (`ops::gemm_bf16`, f32 accumulation), the
/// activations, the adapters, their gradients and the optimizer state in f32. Elsewhere, one dtype.
pub fn training_dtypes(dtype: DType, device: &Device) -> (DType, DType) {
    if device.is_cpu() && dtype == DType::BF16 { (DType::F32, DType::BF16) } else { (dtype, dtype) }
}

/// `load_model_with` for training: in [`training_dtypes`].
pub fn load_model_for_training(spec: &str, dtype: DType, device: &Device, quantize: Option<Quantization>) -> Result<LoadedModel> {
    let (activations, base) = training_dtypes(dtype, device);
    let mut loaded = load_model_with(spec, activations, device, quantize)?;
    loaded.model.set_frozen_linear_dtype(base)?;
    Ok(loaded)
}

/// `load_model_with` for inference: a GGUF file on the CPU keeps its linear weights and head in
/// their block types (`quant::ggml`), unless `quantize` asks for NF4. Training reads the dense
/// weights: use `load_model_with`.
pub fn load_model_for_inference(spec: &str, dtype: DType, device: &Device, quantize: Option<Quantization>) -> Result<LoadedModel> {
    load(spec, dtype, device, quantize, quantize.is_none())
}

fn load(spec: &str, dtype: DType, device: &Device, quantize: Option<Quantization>, keep_packed: bool) -> Result<LoadedModel> {
    let path = Path::new(spec);
    if path.is_file() {
        if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
            return Err(Error::BadFile { path: path.to_path_buf(), msg: "expected a .gguf file or a model directory".into() });
        }
        // Packed weights take f32 rows of x whatever the dtype, so the activations stay f32 (as
        // llama.cpp's); a half dtype is then the KV cache's, which is what it would save.
        let packed_on_cpu = keep_packed && device.is_cpu();
        let compute = if packed_on_cpu { DType::F32 } else { dtype };
        let g = gguf::load_gguf_with(path, compute, device, keep_packed)?;
        let tokenizer = g.tokenizer_json.as_deref().map(parse_tokenizer).transpose()?;
        let weights = crate::weights::Weights::from_tensors(g.tensors, path.display().to_string());
        let mut model = Llama::load_packed(g.config, &weights, g.packed, compute, device, quantize)?;
        model.set_kv_dtype(dtype);
        return Ok(LoadedModel { model, tokenizer, source: spec.to_string() });
    }
    let source = crate::hub::ModelSource::parse(spec)?;
    let files = crate::hub::ModelFiles::resolve(&source)?;
    let config = LlamaConfig::from_file(&files.config)?;
    check_quantization_config(&files.config)?;
    let weights = crate::weights::Weights::from_safetensors(&files.weights)?;
    let model = Llama::load_with(config, &weights, dtype, device, quantize)?;
    let tokenizer = match &files.tokenizer {
        Some(p) => Some(
            tokenizers::Tokenizer::from_file(p).map_err(|e| Error::BadFile { path: p.clone(), msg: e.to_string() })?,
        ),
        None => None,
    };
    Ok(LoadedModel { model, tokenizer, source: source.describe() })
}

pub fn parse_tokenizer(json: &str) -> Result<tokenizers::Tokenizer> {
    // A syntax error is reported here, with its line and column, rather than inside tokenizers.
    serde_json::from_str::<serde::de::IgnoredAny>(json).map_err(|e| Error::Tokenizer(format!("not valid JSON: {e}")))?;
    // tokenizers 0.23 panics (`expect("Helper")` in decoders/mod.rs) on a decoder it cannot read
    // instead of returning its error: turn that panic back into an error at this boundary.
    match std::panic::catch_unwind(|| json.parse::<tokenizers::Tokenizer>()) {
        Ok(parsed) => parsed.map_err(|e| Error::Tokenizer(e.to_string())),
        Err(panic) => {
            let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(Error::Tokenizer(format!("malformed tokenizer: {}", msg.unwrap_or_else(|| "unreadable section".into()))))
        }
    }
}

/// A `quantization_config` in config.json: bitsandbytes 4-bit NF4 is read (per tensor, from its
/// quant state); any other method or quant type is refused by name.
fn check_quantization_config(config: &Path) -> Result<()> {
    let v: serde_json::Value = crate::error::read_json(config)?;
    let Some(q) = v.get("quantization_config").filter(|q| !q.is_null()) else { return Ok(()) };
    let bad = |msg: String| Error::InvalidConfig { path: config.to_path_buf(), msg };
    let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
    if method != "bitsandbytes" {
        return Err(bad(format!("quantization_config: quant_method `{method}` is not supported (bitsandbytes nf4)")));
    }
    let flag = |k: &str| q.get(k).and_then(|b| b.as_bool()).unwrap_or(false);
    if flag("load_in_8bit") || flag("_load_in_8bit") {
        return Err(bad("quantization_config: bitsandbytes 8-bit is not supported (nf4 only)".into()));
    }
    let qt = q.get("bnb_4bit_quant_type").and_then(|t| t.as_str()).unwrap_or("nf4");
    if qt != "nf4" {
        return Err(bad(format!("quantization_config: bnb_4bit_quant_type `{qt}` is not supported (nf4 only)")));
    }
    Ok(())
}

/// A model of `config`'s shape whose linear weights, embedding and head are random `kind` blocks
/// (codes uniform, scales 0.01; norms at 1), laid out for this CPU: what decoding a model of that
/// size costs, without the file (`bench decode --model random:llama2-7b`: 3.8 GB in Q4_0). A
/// matrix whose rows are not whole blocks (test shapes) is dense f32 instead.
pub fn random_packed(config: LlamaConfig, kind: crate::quant::ggml::BlockType, seed: u64) -> Result<Llama> {
    use crate::quant::ggml::QMatrix;
    use rand::{rngs::StdRng, RngCore, SeedableRng};
    use rayon::prelude::*;
    let c = &config;
    let h = c.hidden_size;
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), [c.vocab_size, h])];
    if !c.tie_word_embeddings {
        shapes.push(("lm_head.weight".to_string(), [c.vocab_size, h]));
    }
    for i in 0..c.num_hidden_layers {
        for (name, shape) in c.layer_linears() {
            shapes.push((format!("model.layers.{i}.{name}.weight"), shape));
        }
    }
    let scale = half::f16::from_f32(0.01);
    let mut packed = HashMap::new();
    let mut dense = HashMap::new();
    for (n, (name, [rows, cols])) in shapes.into_iter().enumerate() {
        if !cols.is_multiple_of(kind.block_len()) {
            dense.insert(name, (candle_core::Tensor::rand(-1f32, 1.0, (rows, cols), &Device::Cpu)? * 0.01)?);
            continue;
        }
        let bb = kind.block_bytes();
        let mut data = vec![0u8; rows * cols / kind.block_len() * bb];
        data.par_chunks_mut(bb << 12).enumerate().for_each(|(i, chunk)| {
            StdRng::seed_from_u64(seed ^ ((n as u64) << 32) ^ i as u64).fill_bytes(chunk);
            for block in chunk.chunks_exact_mut(bb) {
                // The scales small and finite, whatever the random bytes were.
                kind.set_scales(block, scale);
            }
        });
        packed.insert(name, QMatrix::new(kind, rows, cols, data)?.for_this_cpu());
    }
    let mut norms = dense;
    for i in 0..c.num_hidden_layers {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            norms.insert(format!("model.layers.{i}.{norm}.weight"), candle_core::Tensor::ones(h, DType::F32, &Device::Cpu)?);
        }
    }
    norms.insert("model.norm.weight".to_string(), candle_core::Tensor::ones(h, DType::F32, &Device::Cpu)?);
    let weights = crate::weights::Weights::from_tensors(norms, "random".to_string());
    Llama::load_packed(config, &weights, packed, DType::F32, &Device::Cpu, None)
}

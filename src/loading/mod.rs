//! Where models come from: Hugging Face directories (local or in the hub cache) and GGUF files,
//! and the conversion from GGUF to a Hugging Face directory.

pub mod convert;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod hub;
pub mod weights;

use std::path::Path;

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::model::{Llama, LlamaConfig};

/// A loaded model with its tokenizer (when the checkpoint has one) and where it came from.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    pub source: String,
}

/// Load a model from a GGUF file, a local Hugging Face directory, or a hub repo id
/// (`org/name[@revision]`), with its weights in `dtype` on `device`.
pub fn load_model(spec: &str, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let path = Path::new(spec);
    if path.is_file() {
        if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
            return Err(Error::BadFile { path: path.to_path_buf(), msg: "expected a .gguf file or a model directory".into() });
        }
        let g = gguf::load_gguf(path, dtype, device)?;
        let tokenizer = g.tokenizer_json.as_deref().map(parse_tokenizer).transpose()?;
        let weights = weights::Weights::from_tensors(g.tensors, path.display().to_string());
        let model = Llama::load(g.config, &weights, dtype, device)?;
        return Ok(LoadedModel { model, tokenizer, source: spec.to_string() });
    }
    let source = hub::ModelSource::parse(spec)?;
    let files = hub::ModelFiles::resolve(&source)?;
    let config = LlamaConfig::from_file(&files.config)?;
    let weights = weights::Weights::from_safetensors(&files.weights)?;
    let model = Llama::load(config, &weights, dtype, device)?;
    let tokenizer = match &files.tokenizer {
        Some(p) => Some(
            tokenizers::Tokenizer::from_file(p).map_err(|e| Error::BadFile { path: p.clone(), msg: e.to_string() })?,
        ),
        None => None,
    };
    Ok(LoadedModel { model, tokenizer, source: source.describe() })
}

pub fn parse_tokenizer(json: &str) -> Result<tokenizers::Tokenizer> {
    json.parse::<tokenizers::Tokenizer>().map_err(|e| Error::Tokenizer(e.to_string()))
}

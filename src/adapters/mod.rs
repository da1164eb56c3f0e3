//! Adapters: one config per method, and the one place that injects them into a model's target
//! modules by name (as PEFT's `target_modules`), saves them and loads them, in PEFT's file format
//! (`adapter_config.json` + `adapter_model.safetensors`, keys such as
//! `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`). The Control methods are not
//! targeted by name: they attach a `BlockControl` across the blocks of every decoder layer, and
//! use the same file layout with their own (non-PEFT) `peft_type`.

pub mod adalora;
pub mod control;
pub mod dora;
pub mod eva;
pub mod full;
pub mod ia3;
pub mod linalg;
pub mod lora;
pub mod lora_init;
pub mod sift;
pub mod snell;
pub mod nonlinear_control;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::loading::hub::ModelSource;
use crate::loading::weights::Weights;
use crate::model::{Linear, LinearAdapter, Llama};

pub use adalora::{AdaLoraConfig, AdaLoraHook, AdaLoraLinear};
pub use control::{ControlConfig, ParallelControl};
pub use dora::DoraLinear;
pub use eva::{initialize_eva, EvaConfig};
pub use full::{FullConfig, FullLinear};
pub use lora_init::{convert_to_lora, save_converted, InitKind, InitLoraLinear};
pub use sift::{SiftConfig, SiftHook, SiftLinear};
pub use snell::{SnellConfig, SnellLinear};
pub use ia3::{Ia3Config, Ia3Linear};
pub use lora::{LoraConfig, LoraLinear};
pub use nonlinear_control::{NonlinearControl, NonlinearControlConfig};

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

/// Attach adapters to every linear layer that the config targets, and block controls to every
/// decoder layer for the Control methods; returns how many modules were adapted.
/// Initialisation is seeded, so the same seed gives the same adapter.
pub fn inject(model: &mut Llama, cfg: &AdapterConfig, seed: u64) -> Result<usize> {
    let mut rng = StdRng::seed_from_u64(seed);
    match cfg {
        AdapterConfig::Control(c) => {
            let controls = control::attach(model, c, &mut rng)?;
            match &c.lora {
                Some(l) => Ok(controls + inject_linears(model, &AdapterConfig::Lora(l.clone()), &mut rng)?),
                None => Ok(controls),
            }
        }
        AdapterConfig::NonlinearControl(c) => nonlinear_control::attach(model, c, &mut rng),
        _ => inject_linears(model, cfg, &mut rng),
    }
}

fn inject_linears(model: &mut Llama, cfg: &AdapterConfig, rng: &mut StdRng) -> Result<usize> {
    let targets = cfg.targets().ok_or_else(|| Error::Adapter(format!("{} adapts no linear layer", cfg.peft_type())))?;
    let mut count = 0;
    for (path, linear) in model.named_linears_mut() {
        if !targets.matches(&path)? {
            continue;
        }
        if let AdapterConfig::Eva(c) = cfg {
            // A layer that EVA gave rank 0 has no adapter.
            if let Some(l) = eva::build(linear.base(), c, &path, rng)? {
                linear.set_adapter(Box::new(l));
                count += 1;
            }
            continue;
        }
        let (adapter, residual) = build(cfg, &path, linear, rng)?;
        if let Some(w) = residual {
            linear.set_base_weight(w);
        }
        linear.set_adapter(adapter);
        count += 1;
    }
    if count == 0 {
        return Err(Error::Adapter(format!("target_modules {targets:?} matched no module of the model")));
    }
    Ok(count)
}

/// The adapter of one layer and, for PiSSA/OLoRA, the residual weight that replaces the base.
type Built = (Box<dyn LinearAdapter>, Option<Tensor>);

fn build(cfg: &AdapterConfig, path: &str, linear: &Linear, rng: &mut StdRng) -> Result<Built> {
    let base = linear.base();
    if linear.is_merged() {
        return Err(Error::Adapter(format!("{path}: cannot inject into a merged layer")));
    }
    let adapter: Box<dyn LinearAdapter> = match cfg {
        AdapterConfig::Lora(c) | AdapterConfig::LoraInit(c, _) if c.r == 0 => {
            return Err(Error::Adapter("LoRA rank r must be at least 1".into()))
        }
        AdapterConfig::LoraInit(c, kind) => {
            let (adapter, residual) = InitLoraLinear::new(base, c, *kind, rng)?;
            return Ok((Box::new(adapter), Some(residual)));
        }
        AdapterConfig::AdaLora(c) => Box::new(AdaLoraLinear::new(base, c, rng)?),
        AdapterConfig::Sift(c) => Box::new(SiftLinear::new(base, c)?),
        AdapterConfig::Snell(c) => {
            c.validate(path)?;
            Box::new(SnellLinear::new(base, c, rng)?)
        }
        AdapterConfig::Eva(_) => unreachable!("EVA layers are built by inject"),
        AdapterConfig::Full(_) => Box::new(FullLinear::new(base)?),
        AdapterConfig::Lora(c) if c.use_dora => Box::new(DoraLinear::new(base, c, rng)?),
        AdapterConfig::Lora(c) => Box::new(LoraLinear::new(base, c, rng)?),
        AdapterConfig::Ia3(c) => {
            let ff = match &c.feedforward_modules {
                Some(t) => t.matches(path)?,
                None => false,
            };
            Box::new(Ia3Linear::new(base, ff)?)
        }
        AdapterConfig::Control(_) | AdapterConfig::NonlinearControl(_) => {
            return Err(Error::Adapter(format!("{} is not a per-linear adapter", cfg.peft_type())))
        }
    };
    Ok((adapter, None))
}

/// What a method adds to the Trainer beyond AdamW on its parameters: AdaLoRA's regulariser and
/// rank allocator, SIFT's index selection, GaLore's projection. Call right after `Trainer::new`
/// (before restoring a checkpoint: GaLore's moments have the projected shape).
pub fn configure_trainer(trainer: &mut crate::training::Trainer, model: &Llama, cfg: &AdapterConfig) -> Result<()> {
    match cfg {
        AdapterConfig::AdaLora(c) => {
            // The trainer knows the number of steps: PEFT needs it as `total_step`.
            let mut c = c.clone();
            c.total_step.get_or_insert(trainer.config.total_steps);
            trainer.hooks.push(Box::new(AdaLoraHook::new(model, &c)?));
        }
        AdapterConfig::Sift(_) => trainer.hooks.push(Box::new(SiftHook::new(model))),
        AdapterConfig::Full(FullConfig { galore: Some(g), .. }) => {
            trainer.optimizer.enable_galore(|name| name.ends_with(".weight"), *g)?;
        }
        _ => {}
    }
    Ok(())
}

/// Save the adapter as PEFT does: `adapter_config.json` and `adapter_model.safetensors` in `dir`
/// (created if needed; other files there are kept). Each file is written to a temporary name and
/// renamed, so an interrupted save leaves the previous files whole.
pub fn save_adapter(model: &Llama, cfg: &AdapterConfig, dir: &Path, base_model: Option<&str>) -> Result<()> {
    let tensors = adapter_tensors(model)?;
    std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    write_adapter_files(dir, cfg, &tensors, base_model)
}

/// Every trainable tensor of the model's adapters, contiguous, keyed as in PEFT's file.
/// SIFT's indices are saved with them (not trainable, but part of the adapter).
pub fn adapter_tensors(model: &Llama) -> Result<HashMap<String, Tensor>> {
    let mut out: HashMap<String, Tensor> =
        model.trainable_params().into_iter().map(|(k, v)| Ok((k, v.as_tensor().contiguous()?))).collect::<Result<_>>()?;
    for (path, sift) in sift_layers(model) {
        if let Some(idx) = sift.indices() {
            out.insert(format!("base_model.model.{path}.sift_indices"), idx.contiguous()?);
        }
    }
    Ok(out)
}

fn sift_layers(model: &Llama) -> Vec<(String, &SiftLinear)> {
    model
        .named_linears()
        .into_iter()
        .filter_map(|(p, l)| l.adapter().and_then(|a| a.as_any()).and_then(|a| a.downcast_ref::<SiftLinear>()).map(|s| (p, s)))
        .collect()
}

pub fn write_adapter_files(dir: &Path, cfg: &AdapterConfig, tensors: &HashMap<String, Tensor>, base_model: Option<&str>) -> Result<()> {
    let json = serde_json::to_string_pretty(&cfg.to_peft_json(base_model)).map_err(|e| Error::Adapter(e.to_string()))?;
    crate::loading::weights::save_safetensors_atomic(tensors, &dir.join("adapter_model.safetensors"))?;
    crate::fsutil::write_file_atomic(&dir.join("adapter_config.json"), json.as_bytes())
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
    let params = model.trainable_params();
    let mut expected: std::collections::HashSet<String> = params.iter().map(|(k, _)| k.clone()).collect();
    for (path, sift) in sift_layers(model) {
        let key = format!("base_model.model.{path}.sift_indices");
        if weights.names().contains(&key) {
            sift.set_indices(&weights.get_any(&key, DType::U32, &Device::Cpu)?)?;
        }
        expected.insert(key);
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
        var.set(&t)?;
    }
    for name in weights.names() {
        if !expected.contains(name.as_str()) {
            tracing::warn!("{}: tensor `{name}` matches no adapter parameter of the model; ignored", weights.origin());
        }
    }
    Ok(())
}

/// A trainable tensor drawn from U(-bound, bound), f32, from a seeded generator.
pub(crate) fn uniform_var(shape: &[usize], bound: f64, rng: &mut StdRng, device: &Device) -> Result<Var> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(device)?)?)
}

thread_local! {
    /// Which forward pass dropout masks are drawn for: the trainer sets it to (step, micro-batch)
    /// before each forward, so a mask depends only on the adapter's seed and the position in
    /// training, and a resumed run draws the masks the uninterrupted run would have drawn. Per
    /// thread: trainers running side by side (the test harness runs tests in parallel) must not
    /// change each other's masks.
    static DROPOUT_KEY: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

pub fn set_dropout_key(step: usize, micro_batch: usize) {
    DROPOUT_KEY.with(|k| k.set(((step as u64) << 20) | micro_batch as u64));
}

/// Inverted dropout whose masks are a function of its seed and the dropout key.
pub(crate) struct Dropout {
    pub p: f64,
    seed: u64,
}

impl Dropout {
    pub fn new(p: f64, rng: &mut StdRng) -> Self {
        Self { p, seed: rng.random() }
    }

    /// `x ⊙ mask` as differentiable candle ops (the mask a constant).
    pub fn apply(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self.mask(train) {
            Some(mask) => Ok((x * mask.tensor(x)?)?),
            None => Ok(x.clone()),
        }
    }

    /// This forward pass's mask, or None when dropout is off.
    pub fn mask(&self, train: bool) -> Option<DropoutMask> {
        if !train || self.p <= 0.0 {
            return None;
        }
        let key = DROPOUT_KEY.with(std::cell::Cell::get);
        Some(DropoutMask { seed: self.seed ^ key.wrapping_mul(0x9E37_79B9_7F4A_7C15), keep: (1.0 - self.p) as f32 })
    }
}

/// One inverted-dropout mask, held as its seed: the fused adapter ops draw it in forward and
/// again in backward rather than keep it (and the dropped input) from one to the other, which
/// on a LLaMA-7B step is two [tokens, d_in] tensors per adapted matrix. Element i of the
/// contiguous input is kept, scaled by 1 / keep, by the draw of `dropout_mask_values`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutMask {
    pub seed: u64,
    pub keep: f32,
}

impl DropoutMask {
    /// The mask (kept entries 1 / keep, dropped 0) for an input like `x`, in x's dtype and on
    /// its device.
    pub fn tensor(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = x.device() {
            return Ok(crate::kernels::cuda::dropout::mask(dev, x.shape(), x.dtype(), self.seed, self.keep)?);
        }
        let values = dropout_mask_values(self.seed, x.elem_count(), self.keep);
        Ok(Tensor::from_vec(values, x.shape(), &Device::Cpu)?.to_device(x.device())?.to_dtype(x.dtype())?)
    }

    /// `x ⊙ mask` in x's dtype, not tracked by autograd (the fused ops define their own
    /// backward); on CUDA one kernel, with no mask in memory.
    pub fn dropped(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.detach();
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return Ok(crate::kernels::cuda::dropout::apply(&x.contiguous()?, self.seed, self.keep)?);
        }
        Ok((&x * self.tensor(&x)?)?)
    }
}

/// The mask values `kernels/dropout.cu` draws, on the CPU: element i is kept (`1/keep`) when
/// the top 24 bits of `splitmix64(seed + (i + 1)·φ)` as a fraction of 2^24 are under `keep`.
/// Counter-based, so any element can be drawn alone (in parallel here, one thread each there).
pub fn dropout_mask_values(seed: u64, n: usize, keep: f32) -> Vec<f32> {
    use rayon::prelude::*;
    let scale = 1.0 / keep;
    (0..n)
        .into_par_iter()
        .map(|i| {
            let mut z = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 40) as f32 * (1.0 / 16_777_216.0);
            if u < keep { scale } else { 0.0 }
        })
        .collect()
}

#[cfg(test)]
mod dropout_tests {
    use super::dropout_mask_values;

    #[test]
    fn the_mask_keeps_the_asked_fraction_and_follows_its_seed() {
        let n = 200_000;
        let (a, b) = (dropout_mask_values(7, n, 0.7), dropout_mask_values(8, n, 0.7));
        let kept = a.iter().filter(|&&m| m > 0.0).count() as f64 / n as f64;
        assert!((kept - 0.7).abs() < 0.005, "kept {kept}");
        assert!(a.iter().all(|&m| m == 0.0 || m == 1.0 / 0.7f32));
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / n as f64;
        assert!(same < 0.65, "two seeds agree on {same} of the elements (independent: 0.58)");
        assert_eq!(a, dropout_mask_values(7, n, 0.7));
    }
}

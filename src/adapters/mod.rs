//! The methods layer: one file per method, and here the one place that injects them into a
//! model's target modules by name (as PEFT's `target_modules`). `config` reads and writes each
//! method's `adapter_config.json`, `files` saves and loads adapters in PEFT's file format. The
//! Control methods are not targeted by name: they attach a `BlockControl` across the blocks of
//! every decoder layer, and use the same file layout with their own (non-PEFT) `peft_type`.
//! The methods' math and sources: docs/METHODS.md.

pub mod adalora;
pub mod config;
pub mod control;
pub mod dora;
pub mod eva;
pub mod files;
pub mod full;
pub mod galore;
pub mod ia3;
pub mod linalg;
pub mod lora;
pub mod lora_init;
pub mod sift;
pub mod snell;
pub mod step_hook;
pub mod nonlinear_control;
pub mod registry;

use candle_core::{Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::model::{Linear, LinearAdapter, Llama};

pub use adalora::{AdaLoraConfig, AdaLoraHook, AdaLoraLinear};
pub use config::{AdapterConfig, Targets};
pub use files::{adapter_tensors, load_adapter, load_adapter_tensors, read_adapter_config, save_adapter, write_adapter_files};
pub use control::{ControlConfig, ParallelControl};
pub use dora::DoraLinear;
pub use eva::{initialize_eva, EvaConfig};
pub use full::{FullConfig, FullLinear};
pub use lora_init::{convert_to_lora, save_converted, InitKind, InitLoraLinear};
pub use sift::{SiftConfig, SiftHook, SiftLinear};
pub use snell::{SnellConfig, SnellLinear};
pub use step_hook::StepHook;
pub use ia3::{Ia3Config, Ia3Linear};
pub use lora::{LoraConfig, LoraLinear};
pub use nonlinear_control::{NonlinearControl, NonlinearControlConfig};

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
            check_rank(cfg, &path, linear.base().base_weight().dims())?;
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

/// The rank a per-linear method allocates its factors with, checked against the layer before
/// anything is allocated: a rank read from a file could be any size (2^40 would abort the
/// process). Above the larger of the two widths a rank adds nothing a smaller one cannot.
fn check_rank(cfg: &AdapterConfig, path: &str, dims: &[usize]) -> Result<()> {
    let (name, rank) = match cfg {
        AdapterConfig::Lora(c) | AdapterConfig::LoraInit(c, _) => ("r", c.r),
        AdapterConfig::Eva(c) => ("r", c.lora.r),
        AdapterConfig::AdaLora(c) => ("init_r", c.init_r),
        AdapterConfig::Snell(c) => ("r", c.r),
        _ => return Ok(()),
    };
    let widest = dims.iter().copied().max().unwrap_or(0);
    if rank > widest {
        return Err(Error::Adapter(format!("{path}: {name} = {rank} is larger than the layer itself ({dims:?})")));
    }
    Ok(())
}

fn build(cfg: &AdapterConfig, path: &str, linear: &Linear, rng: &mut StdRng) -> Result<Built> {
    let base = linear.base();
    if linear.is_merged() {
        return Err(Error::Adapter(format!("{path}: cannot inject into a merged layer")));
    }
    check_rank(cfg, path, base.base_weight().dims())?;
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

/// A trainable tensor drawn from U(-bound, bound), f32, from a seeded generator.
pub(crate) fn uniform_var(shape: &[usize], bound: f64, rng: &mut StdRng, device: &Device) -> Result<Var> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect();
    Ok(Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(device)?)?)
}

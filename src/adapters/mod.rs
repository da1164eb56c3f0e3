//! The methods layer. Each method is one folder (as PEFT's `tuners/<method>/`): its `mod.rs`
//! holds its config (which implements `method::AdapterMethod`), its command-line flags (a
//! `flags::MethodFlags` group) and its reader of `adapter_config.json`, its `layer.rs` the
//! trainable layer; the LoRA family (rsLoRA, DoRA, PiSSA, OLoRA, EVA) shares `lora/`.
//! `registry::METHODS` lists them in one table, and nothing else names a method.
//! `method::inject_linears` is the one place that injects adapters into a model's target modules
//! by name (as PEFT's `target_modules`); `config` reads and writes `adapter_config.json`, `files`
//! saves and loads adapters in PEFT's file format. The Control methods are not targeted by name:
//! they attach a `BlockControl` across the blocks of every decoder layer, and use the same file
//! layout with their own (non-PEFT) `peft_type`.
//! The methods' math and sources: docs/METHODS.md.

pub mod adalora;
pub mod config;
pub mod control;
pub mod files;
pub mod full;
pub mod ia3;
pub mod linalg;
pub mod lora;
pub mod method;
pub mod sift;
pub mod snell;
pub mod synqt;
pub mod step_hook;
pub mod nonlinear_control;
pub mod registry;
pub mod flags;

use rand::{rngs::StdRng, SeedableRng};

use crate::error::Result;
use crate::model::Llama;

pub use adalora::{AdaLoraConfig, AdaLoraHook, AdaLoraLinear};
pub use config::{AdapterConfig, Targets};
pub use files::{adapter_tensors, load_adapter, load_adapter_tensors, read_adapter_config, save_adapter, write_adapter_files};
pub use control::{ControlConfig, ParallelControl};
pub use lora::dora::DoraLinear;
pub use lora::eva::{initialize_eva, EvaConfig};
pub use full::{FullConfig, FullLinear};
pub use lora::init::{convert_to_lora, save_converted, InitKind, InitLoraLinear, LoraInitConfig};
pub use method::{AdapterMethod, TrainingExtras};
pub use sift::{SiftConfig, SiftHook, SiftLinear};
pub use snell::{SnellConfig, SnellLinear};
pub use synqt::{Synqt, SynqtConfig};
pub use step_hook::StepHook;
pub use ia3::{Ia3Config, Ia3Linear};
pub use lora::{LoraConfig, LoraLinear};
pub use nonlinear_control::{NonlinearControl, NonlinearControlConfig};

/// Attach the method of `cfg` to the model: adapters on every linear layer it targets, block
/// controls on every decoder layer for the Control methods; returns how many modules were
/// adapted. Initialisation is seeded, so the same seed gives the same adapter.
pub fn inject(model: &mut Llama, cfg: &AdapterConfig, seed: u64) -> Result<usize> {
    cfg.inject(model, &mut StdRng::seed_from_u64(seed))
}

pub(crate) use crate::ops::nn::uniform_var;

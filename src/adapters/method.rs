//! What a method is to the rest of the engine: the [`AdapterMethod`] trait that each method's
//! config implements in its own module, and [`AdapterConfig`], the one value that carries any of
//! them (read from and written to `adapter_config.json`, injected, trained, saved). Nothing
//! outside a method's module names the method: a new method is its module plus one row of
//! `registry::METHODS`.

use std::any::Any;
use std::fmt::Debug;

use rand::rngs::StdRng;
use serde_json::Value;

use super::full::galore::GaloreConfig;
use super::{StepHook, Targets};
use crate::error::{Error, Result};
use crate::model::{FrozenLinear, Linear, LinearAdapter, Llama, TrainBatch};

/// The adapter of one layer and, for the methods that move part of W into the adapter
/// (PiSSA, OLoRA), the residual weight that replaces the base.
pub type BuiltLinear = (Box<dyn LinearAdapter>, Option<candle_core::Tensor>);

/// What a method adds to the training loop beyond AdamW on its parameters.
#[derive(Default)]
pub struct TrainingExtras {
    /// Run around every optimizer step (AdaLoRA's rank allocator, SIFT's index selection).
    pub hooks: Vec<Box<dyn StepHook>>,
    /// GaLore's low-rank projection of the gradients of every `.weight` parameter.
    pub galore: Option<GaloreConfig>,
}

/// A method's config: how it names itself in `adapter_config.json`, which layers it adapts and
/// how it attaches to a model.
pub trait AdapterMethod: AnyMethod {
    /// `peft_type` in `adapter_config.json` (PEFT's name where PEFT has the method).
    fn peft_type(&self) -> &'static str;

    /// Whether it attaches to the LLaMA decoder (SynQT is a ViT's side network only).
    fn trains_llama(&self) -> bool {
        true
    }

    /// The linear layers the method adapts (None: it only attaches block controls).
    fn targets(&self) -> Option<&Targets>;

    /// The method's own keys of `adapter_config.json`; `AdapterConfig::to_peft_json` adds the
    /// keys every adapter has.
    fn peft_json(&self) -> Value;

    /// Attach the method to `model`; returns how many modules were adapted. The default builds
    /// an adapter on every targeted linear layer with [`build_linear`](Self::build_linear).
    fn inject(&self, model: &mut Llama, rng: &mut StdRng) -> Result<usize> {
        inject_linears(self, model, rng)
    }

    /// The adapter of the targeted layer at `path` (None: this layer gets none).
    fn build_linear(&self, path: &str, _base: &FrozenLinear, _rng: &mut StdRng) -> Result<Option<BuiltLinear>> {
        Err(Error::Adapter(format!("{path}: {} is not a per-linear adapter", self.peft_type())))
    }

    /// How many training micro-batches the method's data-driven initialisation reads (0: it has
    /// none). Called after `inject`, before training.
    fn init_batches(&self) -> usize {
        0
    }

    /// The data-driven initialisation (EVA's SVD of the activations) of the layers `inject`
    /// attached; it may change the config (EVA writes its ranks into it). Returns what it did,
    /// for the user.
    fn initialize_from_data(&mut self, _model: &mut Llama, _batches: &[TrainBatch], _seed: u64) -> Result<Option<String>> {
        Ok(None)
    }

    /// Hooks and gradient projections for training `model` for `total_steps` optimizer steps.
    fn training_extras(&self, _model: &Llama, _total_steps: usize) -> Result<TrainingExtras> {
        Ok(TrainingExtras::default())
    }
}

/// Cloning, comparing and downcasting a boxed method; implemented for every method config that
/// is `Clone + PartialEq + Debug`, so a method writes none of it.
pub trait AnyMethod: Debug + Send + Sync + 'static {
    fn clone_box(&self) -> Box<dyn AdapterMethod>;
    fn eq_dyn(&self, other: &dyn AdapterMethod) -> bool;
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<T: AdapterMethod + Clone + PartialEq> AnyMethod for T {
    fn clone_box(&self) -> Box<dyn AdapterMethod> {
        Box::new(self.clone())
    }
    fn eq_dyn(&self, other: &dyn AdapterMethod) -> bool {
        other.as_any().downcast_ref::<T>() == Some(self)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Any method's config.
#[derive(Debug)]
pub struct AdapterConfig(Box<dyn AdapterMethod>);

impl AdapterConfig {
    pub fn new(method: impl AdapterMethod) -> Self {
        Self(Box::new(method))
    }

    /// The config as the method's own type, when it is that method.
    pub fn downcast_ref<T: AdapterMethod>(&self) -> Option<&T> {
        self.0.as_any().downcast_ref()
    }

    pub fn downcast_mut<T: AdapterMethod>(&mut self) -> Option<&mut T> {
        self.0.as_any_mut().downcast_mut()
    }
}

impl<T: AdapterMethod> From<T> for AdapterConfig {
    fn from(method: T) -> Self {
        Self::new(method)
    }
}

impl std::ops::Deref for AdapterConfig {
    type Target = dyn AdapterMethod;
    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl std::ops::DerefMut for AdapterConfig {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut *self.0
    }
}

impl Clone for AdapterConfig {
    fn clone(&self) -> Self {
        Self(self.0.clone_box())
    }
}

impl PartialEq for AdapterConfig {
    fn eq(&self, other: &Self) -> bool {
        self.0.eq_dyn(&*other.0)
    }
}

/// Build the method's adapter on every linear layer its targets match.
pub fn inject_linears<M: AdapterMethod + ?Sized>(method: &M, model: &mut Llama, rng: &mut StdRng) -> Result<usize> {
    inject_named(method, model.named_linears_mut(), rng)
}

/// Build the method's adapter on every layer of `linears` (module path, layer) its targets
/// match: the injection of any model that names its linear layers (the LLaMA decoder, the ViT).
pub fn inject_named<M: AdapterMethod + ?Sized>(method: &M, linears: Vec<(String, &mut Linear)>, rng: &mut StdRng) -> Result<usize> {
    let targets = method.targets().ok_or_else(|| Error::Adapter(format!("{} adapts no linear layer", method.peft_type())))?;
    let mut count = 0;
    for (path, linear) in linears {
        if !targets.matches(&path)? {
            continue;
        }
        if linear.is_merged() {
            return Err(Error::Adapter(format!("{path}: cannot inject into a merged layer")));
        }
        let Some((adapter, residual)) = method.build_linear(&path, linear.base(), rng)? else { continue };
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

/// A rank (`name` in the config) checked against the layer before anything is allocated from
/// it: a rank read from a file could be any size (2^40 would abort the process), and above the
/// larger of the layer's two widths a rank adds nothing a smaller one cannot.
pub fn check_rank(path: &str, name: &str, rank: usize, base: &FrozenLinear) -> Result<()> {
    let dims = base.base_weight().dims();
    let widest = dims.iter().copied().max().unwrap_or(0);
    if rank > widest {
        return Err(Error::Adapter(format!("{path}: {name} = {rank} is larger than the layer itself ({dims:?})")));
    }
    Ok(())
}

//! The hook through which a method takes part in the optimizer step beyond "loss, backward,
//! AdamW on its parameters". The trainer (`training::step`) calls it; the methods that need it
//! (AdaLoRA, SIFT) implement it.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::Tensor;

use crate::Result;

/// What a method that needs more than "loss, backward, AdamW" plugs into the step (AdaLoRA's
/// regulariser and rank allocator, SIFT's index selection). Every method has a no-op default.
pub trait StepHook: Send {
    /// A term added to every micro-batch's loss before backward (and to the reported loss).
    fn regularizer(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// After each micro-batch's backward, with its full gradient store.
    fn after_backward(&mut self, _grads: &GradStore) -> Result<()> {
        Ok(())
    }
    /// With the accumulated gradients (keyed by parameter name), before clipping and the update.
    fn before_update(&mut self, _step: usize, _grads: &mut HashMap<String, Tensor>) -> Result<()> {
        Ok(())
    }
    /// After the optimizer update, with the clipped gradients; `step` counts from 0.
    fn after_update(&mut self, _step: usize, _grads: &HashMap<String, Tensor>) -> Result<()> {
        Ok(())
    }
    /// What a resumed run needs to continue exactly as this one would (AdaLoRA's sensitivity
    /// averages and final rank pattern), keyed by name; the training checkpoint saves it.
    /// Empty for hooks whose state lives in the adapter itself (SIFT's indices).
    fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        Ok(HashMap::new())
    }
    /// Restore what `state_tensors` saved (an empty map: a checkpoint without hook state).
    fn load_state(&mut self, _tensors: &HashMap<String, Tensor>) -> Result<()> {
        Ok(())
    }
}

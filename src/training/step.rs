//! One optimizer step: the causal-LM loss over micro-batches, gradient accumulation, clipping at
//! a global norm, the scheduled learning rate and AdamW. A non-finite loss stops training with a
//! report that names the step.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};

use super::gradient_checkpointing::LayerTape;
use super::optim::{clip_grad_norm, linear_schedule, AdamW, AdamWConfig};
use crate::error::{Error, Result};
use crate::model::linear_cross_entropy::linear_cross_entropy;
use crate::adapters::StepHook;
use crate::model::{Llama, TrainBatch};

/// Mean next-token cross-entropy of the batch (labels shifted by one, -100 ignored).
pub fn causal_lm_loss(model: &Llama, batch: &TrainBatch, train: bool) -> Result<Tensor> {
    check_length(batch)?;
    let hidden = model.forward_hidden(&batch.input_ids, Some(&batch.mask), None, train)?;
    causal_lm_loss_from_hidden(model, &hidden, batch)
}

/// `causal_lm_loss` from the final hidden states [b, t, hidden] of the batch, without holding the
/// [b·t, vocab] logits (`linear_cross_entropy`).
pub fn causal_lm_loss_from_hidden(model: &Llama, hidden: &Tensor, batch: &TrainBatch) -> Result<Tensor> {
    let (b, t) = check_length(batch)?;
    let h = hidden.narrow(1, 0, t - 1)?.contiguous()?.reshape((b * (t - 1), ()))?;
    let labels = batch.labels.narrow(1, 1, t - 1)?.contiguous()?.reshape(b * (t - 1))?;
    linear_cross_entropy(&h, &*model.product_head()?, &labels)
}

fn check_length(batch: &TrainBatch) -> Result<(usize, usize)> {
    let (b, t) = batch.input_ids.dims2()?;
    if t < 2 {
        return Err(Error::Training("a training sequence needs at least 2 tokens".into()));
    }
    Ok((b, t))
}

/// `loss.backward()`, keeping only the gradients of variables, detached. candle's store also keeps
/// a gradient for every constant an op received, and a gradient accumulated from a tracked tensor
/// holds that tensor's graph: kept, such an entry keeps a whole layer's activations alive for as
/// long as the store lives (every recomputed layer's, under gradient checkpointing).
pub fn backward_to_variables(loss: &Tensor) -> Result<GradStore> {
    let variables: Vec<TensorId> = loss.sorted_nodes().iter().filter(|n| n.is_variable()).map(|n| n.id()).collect();
    let all = loss.backward()?;
    let mut kept = GradStore::default();
    for id in variables {
        if let Some(g) = all.get_id(id) {
            kept.insert_id(id, g.detach());
        }
    }
    Ok(kept)
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct StepStats {
    pub step: usize,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    pub tokens: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct StepConfig {
    pub optim: AdamWConfig,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub max_grad_norm: Option<f64>,
    /// Keep only each decoder layer's input in forward and recompute the layer in backward
    /// (`training::gradient_checkpointing`): far less activation memory for one more forward.
    pub gradient_checkpointing: bool,
}

pub struct Trainer {
    pub optimizer: AdamW,
    pub config: StepConfig,
    /// Optimizer steps taken so far.
    pub step: usize,
    params: Vec<(String, Var)>,
    pub hooks: Vec<Box<dyn StepHook>>,
}

impl Trainer {
    /// `lr_scale` gives each trainable tensor's learning-rate multiplier from its name.
    pub fn new(model: &Llama, config: StepConfig, lr_scale: impl Fn(&str) -> f64) -> Result<Self> {
        let params = model.trainable_params();
        if params.is_empty() {
            return Err(Error::Training("the model has no trainable parameters: inject an adapter first".into()));
        }
        let groups = params.iter().map(|(n, v)| (n.clone(), v.clone(), lr_scale(n))).collect();
        Ok(Self { optimizer: AdamW::new(groups, config.optim)?, config, step: 0, params, hooks: Vec::new() })
    }

    /// Every hook's `state_tensors`, the names prefixed with `hook.<index>.`.
    pub fn hook_state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, hook) in self.hooks.iter().enumerate() {
            out.extend(hook.state_tensors()?.into_iter().map(|(k, v)| (format!("hook.{i}.{k}"), v)));
        }
        Ok(out)
    }

    /// Hand each hook its part of what `hook_state` saved.
    pub fn load_hook_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (i, hook) in self.hooks.iter_mut().enumerate() {
            let prefix = format!("hook.{i}.");
            let mine = tensors.iter().filter_map(|(k, v)| k.strip_prefix(&prefix).map(|k| (k.to_string(), v.clone()))).collect();
            hook.load_state(&mine)?;
        }
        Ok(())
    }

    pub fn lr(&self) -> f64 {
        linear_schedule(self.step, self.config.warmup_steps, self.config.total_steps, self.config.optim.lr)
    }

    /// Accumulate gradients over the micro-batches (each loss divided by their number, as the
    /// HF Trainer does), clip, and update.
    pub fn step(&mut self, model: &Llama, micro_batches: &[TrainBatch]) -> Result<StepStats> {
        let n = micro_batches.len().max(1) as f64;
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut loss_sum = 0f64;
        let mut tokens = 0;
        for (i, batch) in micro_batches.iter().enumerate() {
            crate::ops::dropout::set_dropout_key(self.step, i);
            check_length(batch)?;
            let (hidden, tape) = if self.config.gradient_checkpointing {
                let (hidden, tape) = LayerTape::forward(model, &batch.input_ids, &batch.mask, true)?;
                (hidden, Some(tape))
            } else {
                (model.forward_hidden(&batch.input_ids, Some(&batch.mask), None, true)?, None)
            };
            let mut loss = causal_lm_loss_from_hidden(model, &hidden, batch)?;
            for hook in &self.hooks {
                if let Some(reg) = hook.regularizer()? {
                    loss = (loss + reg)?;
                }
            }
            let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(Error::Training(format!("non-finite loss ({value}) at step {}", self.step + 1)));
            }
            loss_sum += value;
            tokens += batch.tokens();
            let loss = (loss / n)?;
            let store = match tape {
                Some(tape) => tape.backward(&loss)?,
                None => backward_to_variables(&loss)?,
            };
            for hook in &mut self.hooks {
                hook.after_backward(&store)?;
            }
            for (name, var) in &self.params {
                if let Some(g) = store.get(var.as_tensor()) {
                    // Detached, so that no graph reaches the optimizer state and outlives the step.
                    let g = g.detach().to_dtype(candle_core::DType::F32)?;
                    let sum = match grads.remove(name) {
                        Some(acc) => (acc + g)?,
                        None => g,
                    };
                    grads.insert(name.clone(), sum);
                }
            }
        }
        for hook in &mut self.hooks {
            hook.before_update(self.step, &mut grads)?;
        }
        let grad_norm = match self.config.max_grad_norm {
            Some(max) => clip_grad_norm(&mut grads, max)?,
            None => clip_grad_norm(&mut grads, f64::INFINITY)?,
        };
        if !grad_norm.is_finite() {
            return Err(Error::Training(format!("non-finite gradient norm at step {}", self.step + 1)));
        }
        let lr = self.lr();
        if !lr.is_finite() || lr < 0.0 {
            return Err(Error::Training(format!("learning rate {lr} at step {}: it must be finite and not negative", self.step + 1)));
        }
        self.optimizer.step(&grads, lr)?;
        for hook in &mut self.hooks {
            hook.after_update(self.step, &grads)?;
        }
        self.step += 1;
        Ok(StepStats { step: self.step, loss: loss_sum / n, grad_norm, lr, tokens })
    }
}

/// Mean loss over batches without updating anything (the held-out loss).
pub fn eval_loss(model: &Llama, batches: &[TrainBatch]) -> Result<f64> {
    let mut sum = 0f64;
    for b in batches {
        sum += causal_lm_loss(model, b, false)?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(sum / batches.len().max(1) as f64)
}

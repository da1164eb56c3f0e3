//! Gradient checkpointing (Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016;
//! what Hugging Face's `gradient_checkpointing_enable` does per decoder layer): the forward keeps
//! only each decoder layer's input, and backward recomputes one layer at a time with its graph.
//!
//! Memory: L hidden-state tensors [b, t, hidden] plus one layer's activations, instead of every
//! layer's activations (at LLaMA-7B, batch 16 x 256, bf16: about 1 GiB instead of about 17 GiB
//! for LoRA on q,k,v,up,down). Cost: one more forward of every layer, less the MLP's down
//! projection: the recomputed layer is only backpropagated through ([`Llama::layer_backward_graph`]),
//! and the down projection's product, which only adds into the residual, is read by no backward
//! (at LLaMA-7B shapes a fifth of a layer's forward FLOPs, about 7% of a checkpointed step's).
//!
//! candle's backward starts from a scalar, so the gradient `g` that reaches a layer's output is
//! fed back through the surrogate `sum(out ⊙ g)` with g constant: its gradient with respect to
//! `out` is g exactly (`1 · g`) whatever out's value, and everything below `out` is the layer's
//! own backward.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::step::backward_to_variables;
use crate::error::{Error, Result};
use crate::model::{Llama, Positions};

/// The layer inputs of one checkpointed forward, and what its backward needs to recompute them.
pub struct LayerTape<'a> {
    model: &'a Llama,
    positions: Positions,
    /// Input of layer i at index i (the embeddings first); no graph.
    inputs: Vec<Tensor>,
    /// The last layer's output, where the graph that the loss builds begins.
    output: Var,
    train: bool,
}

impl<'a> LayerTape<'a> {
    /// The final hidden states (after the last norm) of `input_ids` [b, t] with `mask`, whose graph
    /// reaches back only to the last layer's output; the tape to backpropagate through the layers.
    pub fn forward(model: &'a Llama, input_ids: &Tensor, mask: &[Vec<u32>], train: bool) -> Result<(Tensor, Self)> {
        let t = input_ids.dim(1)?;
        let positions = model.positions(mask, t)?;
        let mut inputs = Vec::with_capacity(model.layers.len());
        let mut x = model.embed(input_ids)?.detach();
        for i in 0..model.layers.len() {
            let next = model.layer(i, &x, &positions, train)?.detach();
            inputs.push(std::mem::replace(&mut x, next));
        }
        let output = Var::from_tensor(&x)?;
        drop(x);
        let hidden = model.final_norm(output.as_tensor(), train)?;
        Ok((hidden, Self { model, positions, inputs, output, train }))
    }

    /// Backward from `loss` (built on the hidden states `forward` returned): the gradients of every
    /// trainable tensor, as `loss.backward()` gives them without checkpointing.
    pub fn backward(self, loss: &Tensor) -> Result<GradStore> {
        let Self { model, positions, mut inputs, output, train } = self;
        let mut store = backward_to_variables(loss)?;
        let Some(mut grad) = store.remove(output.as_tensor()) else { return Ok(store) };
        drop(output);
        while let Some(input) = inputs.pop() {
            let index = inputs.len();
            // The embeddings are frozen: layer 0's input needs no gradient.
            let x = if index == 0 { input } else { tracked_copy(input)? };
            let out = model.layer_backward_graph(index, &x, &positions, train)?;
            let mut layer_store = backward_to_variables(&(out * &grad)?.sum_all()?)?;
            if index > 0 {
                grad = layer_store
                    .remove(&x)
                    .ok_or_else(|| Error::Training(format!("no gradient reached the input of decoder layer {index}")))?;
            }
            store.extend(layer_store)?;
        }
        Ok(store)
    }
}

/// A copy of `t` that gradients are collected for (the original is released).
fn tracked_copy(t: Tensor) -> Result<Tensor> {
    Ok(Var::from_tensor(&t)?.as_tensor().clone())
}

//! One model over a shared base that decodes rows of different adapters in one batch.
//!
//! `y = x Wᵀ` for every row at once, from the base weights read once, then each adapter's own
//! term for its rows only: `y[rows_a] += s_a · (x[rows_a] A_aᵀ) B_aᵀ` (Punica's / S-LoRA's
//! segmented LoRA: `ops::lora_rows`, every row's term in one call, on the CPU and in CUDA). A
//! row's adapter is named per forward by [`RowModels`], which the caller sets.
//!
//! - A method whose output is not `base + term` (DoRA, IA3, SNELL, ...), or an adapter whose
//!   layer holds other base weights (PiSSA's residual, a merged adapter), computes its rows
//!   whole on its own layer.
//! - Block controls (Control, Parallel / Double Control) add their output to the block's, so
//!   each adds its term to its rows.
//! - A forward whose rows all belong to one model takes that model's own path, bit for bit what
//!   the model alone computes.

use std::sync::{Arc, RwLock};

use candle_core::{Tensor, Var};

use super::linear::{FrozenLinear, Linear, LinearAdapter};
use super::llama::{BlockControl, ControlContext, Llama};
use crate::{Error, Result};

/// Which model (0: the base, then the adapters in the order given to [`Llama::mixed`]) each row
/// of the next forward belongs to.
#[derive(Default)]
pub struct RowModels(RwLock<Vec<usize>>);

impl RowModels {
    pub fn set(&self, rows: Vec<usize>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = rows;
    }

    fn get(&self) -> Vec<usize> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The rows of each model present in a forward of `b` rows, in order of first appearance; or
/// the one model when every row is its.
enum Groups {
    One(usize),
    Several(Vec<(usize, Tensor)>, Tensor),
}

/// Each row's model for a forward of `b` rows (checked against the assignment's length).
fn models_of_rows(rows: &RowModels, b: usize) -> Result<Vec<usize>> {
    let rows = rows.get();
    if rows.len() != b {
        return Err(Error::msg(format!("mixed adapters: a forward of {b} rows, but {} rows were assigned to models", rows.len())));
    }
    Ok(rows)
}

fn groups(rows: &RowModels, b: usize, device: &candle_core::Device) -> Result<Groups> {
    let rows = models_of_rows(rows, b)?;
    if rows.iter().all(|&m| m == rows[0]) {
        return Ok(Groups::One(rows[0]));
    }
    group_rows(&rows, device)
}

/// The index tensors of each model's rows, and of the way back to the rows' order.
fn group_rows(rows: &[usize], device: &candle_core::Device) -> Result<Groups> {
    let b = rows.len();
    let mut models: Vec<usize> = Vec::new();
    for &m in rows {
        if !models.contains(&m) {
            models.push(m);
        }
    }
    let mut order = Vec::with_capacity(b);
    let mut out = Vec::with_capacity(models.len());
    for m in models {
        let idx: Vec<u32> = (0..b as u32).filter(|&r| rows[r as usize] == m).collect();
        order.extend_from_slice(&idx);
        out.push((m, Tensor::new(idx.as_slice(), device)?));
    }
    // Where each original row sits among the groups, to put them back in order.
    let mut back = vec![0u32; b];
    for (at, &row) in order.iter().enumerate() {
        back[row as usize] = at as u32;
    }
    Ok(Groups::Several(out, Tensor::new(back.as_slice(), device)?))
}

/// How one model computes a linear layer in a mixed batch.
enum Slot {
    /// The shared base alone.
    Base,
    /// The shared base plus its LoRA term: `factors[i]`.
    LowRank(usize),
    /// Its own layer, whole (not of the low-rank form, or other base weights).
    Whole,
}

/// One linear layer's adapters, by model.
struct MixedLinear {
    /// The models' own layers (`None`: the shared base alone).
    models: Vec<Option<Linear>>,
    slots: Vec<Slot>,
    /// (A, B, s), B transposed on the CPU (`ops::lora_rows::transpose_b`).
    factors: Vec<(Tensor, Tensor, f64)>,
    b_transposed: bool,
    rows: Arc<RowModels>,
}

impl MixedLinear {
    /// Model `index` computes this layer by `linear` (`None`: the shared base alone).
    fn set(&mut self, index: usize, linear: Option<Linear>, base: &FrozenLinear) -> Result<()> {
        let b_transposed = base.device().is_cpu();
        let mut models = std::mem::take(&mut self.models);
        if models.len() <= index {
            models.resize_with(index + 1, || None);
        }
        let previous = std::mem::replace(&mut models[index], linear);
        let (mut factors, mut slots) = (Vec::new(), Vec::with_capacity(models.len()));
        let built = models.iter().try_for_each(|m| {
            slots.push(match m {
                None => Slot::Base,
                Some(linear) => match linear.low_rank_factors() {
                    Some((a, b, s)) if linear.base().shares_weight_with(base) => {
                        let b = if b_transposed { crate::ops::lora_rows::transpose_b(&b)? } else { b };
                        factors.push((a, b, s));
                        Slot::LowRank(factors.len() - 1)
                    }
                    _ => Slot::Whole,
                },
            });
            Ok::<_, crate::Error>(())
        });
        // All or nothing: the slots index the factors.
        if let Err(e) = built {
            models[index] = previous;
            self.models = models;
            return Err(e);
        }
        (self.models, self.factors, self.slots, self.b_transposed) = (models, factors, slots, b_transposed);
        Ok(())
    }

    /// `y` plus each row's low-rank term (`ops::lora_rows`), `models` the batch rows' models.
    fn add_low_rank_rows(&self, x: &Tensor, y: Tensor, models: &[usize]) -> Result<Tensor> {
        // Each batch row's positions (x [b, t, in]: t rows of x a batch row) take its adapter.
        let rows = crate::ops::lora_rows::rows_of(x)?;
        let t = rows / x.dim(0)?.max(1);
        let adapter_of: Vec<Option<usize>> = (0..rows)
            .map(|r| match self.slot(models[r / t]) {
                Slot::LowRank(i) => Some(*i),
                _ => None,
            })
            .collect();
        crate::ops::lora_rows::add_tensor(x, y, &adapter_of, &self.factors, self.b_transposed)
    }

    fn model(&self, m: usize) -> Option<&Linear> {
        self.models.get(m).and_then(Option::as_ref)
    }

    fn slot(&self, m: usize) -> &Slot {
        self.slots.get(m).unwrap_or(&Slot::Base)
    }
}

impl LinearAdapter for MixedLinear {
    fn forward(&self, x: &Tensor, base: &FrozenLinear, _train: bool) -> Result<Tensor> {
        let models = models_of_rows(&self.rows, x.dim(0)?)?;
        if models.iter().all(|&m| m == models[0]) {
            return match self.model(models[0]) {
                Some(linear) => linear.forward(x, false),
                None => base.forward(x),
            };
        }
        let whole = models.iter().any(|&m| matches!(self.slot(m), Slot::Whole));
        let fast = crate::ops::lora_rows::takes(x);
        // The index tensors only where rows are gathered (not on the `lora_rows` path).
        let (groups, back) = match (whole || !fast).then(|| group_rows(&models, x.device())).transpose()? {
            Some(Groups::Several(g, back)) => (g, Some(back)),
            _ => (Vec::new(), None),
        };
        let mut y = base.forward(x)?;
        if !self.factors.is_empty() {
            if fast {
                y = self.add_low_rank_rows(x, y, &models)?;
            } else {
                // Another device or dtype: each adapter's term by candle ops on its rows.
                for (m, idx) in &groups {
                    if let Slot::LowRank(i) = self.slot(*m) {
                        let (a, b, s) = &self.factors[*i];
                        let xm = x.index_select(idx, 0)?;
                        let term = (crate::ops::nn::matmul_t(&crate::ops::nn::matmul_t(&xm, &a.to_dtype(x.dtype())?)?, &b.to_dtype(x.dtype())?)? * *s)?;
                        y = y.index_add(idx, &term, 0)?;
                    }
                }
            }
        }
        let Some(back) = back.filter(|_| whole) else {
            return Ok(y);
        };
        let mut parts = Vec::with_capacity(groups.len());
        for (m, idx) in &groups {
            parts.push(match (self.slot(*m), self.model(*m)) {
                (Slot::Whole, Some(linear)) => linear.forward(&x.index_select(idx, 0)?, false)?,
                _ => y.index_select(idx, 0)?,
            });
        }
        Ok(Tensor::cat(&parts, 0)?.index_select(&back, 0)?)
    }

    /// Rows of the base alone, or of several models none of which computes its rows whole,
    /// on the `lora_rows` path: the base's output plus each row's low-rank term.
    fn takes_base_output(&self, x: &Tensor) -> bool {
        let Ok(models) = x.dim(0).map_err(Error::from).and_then(|b| models_of_rows(&self.rows, b)) else {
            return false;
        };
        if models.iter().all(|&m| m == models[0]) {
            return self.model(models[0]).is_none();
        }
        crate::ops::lora_rows::takes(x) && !models.iter().any(|&m| matches!(self.slot(m), Slot::Whole))
    }

    fn add_to_base(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let models = models_of_rows(&self.rows, x.dim(0)?)?;
        if self.factors.is_empty() || models.iter().all(|&m| m == models[0]) {
            return Ok(y);
        }
        self.add_low_rank_rows(x, y, &models)
    }

    fn merged_weight(&self, _base: &Tensor) -> Result<Tensor> {
        Err(Error::msg("a layer of several adapters cannot be merged"))
    }

    fn unmerged_weight(&self, _merged: &Tensor) -> Result<Tensor> {
        Err(Error::msg("a layer of several adapters cannot be merged"))
    }

    fn params(&self) -> Vec<(String, Var)> {
        Vec::new()
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}

/// One block's controls, by model.
struct MixedControl {
    models: Vec<Option<Box<dyn BlockControl>>>,
    rows: Arc<RowModels>,
}

impl BlockControl for MixedControl {
    fn forward(&self, block_input: &Tensor, ctx: &ControlContext, train: bool) -> Result<Tensor> {
        self.add_to(&block_input.zeros_like()?, block_input, ctx, train)
    }

    fn add_to(&self, block_output: &Tensor, block_input: &Tensor, ctx: &ControlContext, train: bool) -> Result<Tensor> {
        let groups = match groups(&self.rows, block_input.dim(0)?, block_input.device())? {
            Groups::One(m) => {
                return match self.models.get(m).and_then(Option::as_ref) {
                    Some(c) => c.add_to(block_output, block_input, ctx, train),
                    None => Ok(block_output.clone()),
                }
            }
            Groups::Several(g, _) => g,
        };
        let mut out = block_output.clone();
        for (m, idx) in &groups {
            let Some(control) = self.models.get(*m).and_then(Option::as_ref) else { continue };
            let bias = ctx.bias.index_select(idx, 0)?;
            let past = ctx.past_input.map(|p| p.index_select(idx, 0)).transpose()?;
            let term = control.forward(&block_input.index_select(idx, 0)?, &ControlContext { bias: &bias, past_input: past.as_ref() }, train)?;
            out = out.index_add(idx, &term, 0)?;
        }
        Ok(out)
    }

    fn params(&self) -> Vec<(String, Var)> {
        Vec::new()
    }

    fn mixes_tokens(&self) -> bool {
        self.models.iter().flatten().any(|c| c.mixes_tokens())
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}

impl Llama {
    /// One model that serves `models` (the base first, then models over its weights, each with
    /// an adapter: `Llama::share_base` and an adapter attached) row by row, the row's model
    /// named by the returned [`RowModels`] before each forward. The adapters move into it.
    pub fn mixed(models: Vec<Llama>) -> Result<(Llama, Arc<RowModels>)> {
        let rows = Arc::new(RowModels::default());
        let mut models = models.into_iter();
        let Some(first) = models.next() else {
            return Err(Error::msg("mixed adapters: no model"));
        };
        let mut out = first.share_base();
        for (i, m) in models.enumerate() {
            out.set_mixed_model(&rows, i + 1, Some(m))?;
        }
        Ok((out, rows))
    }

    /// In a [`Llama::mixed`] model, model `index` becomes `model` (its adapters move in), or,
    /// with `None`, the base alone: adapters load and unload while the server runs. No row of
    /// `index` may be in flight meanwhile.
    pub fn set_mixed_model(&mut self, rows: &Arc<RowModels>, index: usize, model: Option<Llama>) -> Result<()> {
        if index == 0 {
            return Err(Error::msg("mixed adapters: model 0 is the base"));
        }
        let mut model = model;
        if let Some(m) = &model {
            let shared = m.embed_tokens.id() == self.embed_tokens.id()
                && m.norm.id() == self.norm.id()
                && m.lm_head.as_ref().map(Tensor::id) == self.lm_head.as_ref().map(Tensor::id)
                && m.layers.len() == self.layers.len();
            if !shared {
                return Err(Error::msg(format!("mixed adapters: model {index} has embeddings, norms or a head of its own, not the base's")));
            }
        }
        for (l, layer) in self.layers.iter_mut().enumerate() {
            for (j, linear) in layer.linears_mut().into_iter().enumerate() {
                let own = model.as_mut().and_then(|m| {
                    let own: &mut Linear = m.layers[l].linears_mut().into_iter().nth(j).expect("7 linears");
                    let plain = own.adapter().is_none() && own.base().shares_weight_with(linear.base());
                    (!plain).then(|| {
                        let bare = own.share_base();
                        std::mem::replace(own, bare)
                    })
                });
                let base = linear.base().clone();
                match linear.adapter_mut().and_then(|a| a.as_any_mut()).and_then(|a| a.downcast_mut::<MixedLinear>()) {
                    Some(mixed) => mixed.set(index, own, &base)?,
                    None if own.is_some() => {
                        let mut mixed = MixedLinear { models: Vec::new(), slots: Vec::new(), factors: Vec::new(), b_transposed: false, rows: rows.clone() };
                        mixed.set(index, own, &base)?;
                        linear.set_adapter(Box::new(mixed));
                    }
                    None => {}
                }
            }
            let (attn, mlp) = match model.as_mut() {
                Some(m) => (m.layers[l].attn_control.take(), m.layers[l].mlp_control.take()),
                None => (None, None),
            };
            for (slot, control) in [(&mut layer.attn_control, attn), (&mut layer.mlp_control, mlp)] {
                match slot.as_mut().and_then(|c| c.as_any_mut()).and_then(|c| c.downcast_mut::<MixedControl>()) {
                    Some(mixed) => {
                        if mixed.models.len() <= index {
                            mixed.models.resize_with(index + 1, || None);
                        }
                        mixed.models[index] = control;
                    }
                    None if control.is_some() => {
                        let mut models: Vec<Option<Box<dyn BlockControl>>> = (0..index).map(|_| None).collect();
                        models.push(control);
                        *slot = Some(Box::new(MixedControl { models, rows: rows.clone() }));
                    }
                    None => {}
                }
            }
        }
        Ok(())
    }
}

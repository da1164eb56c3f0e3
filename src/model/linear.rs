//! A frozen linear layer with an optional adapter attached: the one place where every per-weight
//! method (LoRA and its family, DoRA, IA3, SNELL) hooks into the model.

use candle_core::{Tensor, Var};

use crate::Result;

/// The frozen base weight `W` [out, in] of a linear layer (no bias: LLaMA has none).
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: Tensor,
}

impl FrozenLinear {
    pub fn new(weight: Tensor) -> Self {
        Self { weight: weight.detach() }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// `x Wᵀ` for x of shape [..., in].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        matmul_t(x, &self.weight)
    }
}

/// `x Mᵀ` for x [..., in] and M [out, in], flattening the leading dims into one GEMM.
pub fn matmul_t(x: &Tensor, m: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner.max(1);
    let y = x.reshape((rows, inner))?.matmul(&m.t()?)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("matmul_t needs at least one dim") = m.dim(0)?;
    Ok(y.reshape(out_dims)?)
}

/// What a per-weight adapter method implements.
pub trait LinearAdapter: Send + Sync {
    /// The adapted layer's output for input x, given the frozen base layer.
    fn forward(&self, x: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor>;
    /// The weight that computes the adapted layer with a plain linear (for `merge`).
    fn merged_weight(&self, base: &Tensor) -> Result<Tensor>;
    /// The inverse of `merged_weight` (for `unmerge`).
    fn unmerged_weight(&self, merged: &Tensor) -> Result<Tensor>;
    /// Trainable tensors with their key suffix in PEFT's file format (e.g. `lora_A.weight`).
    fn params(&self) -> Vec<(String, Var)>;
    /// The concrete adapter, for the methods that need more than this trait (PiSSA's conversion,
    /// SIFT's indices, EVA's re-initialisation).
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// A linear layer of the model: the frozen base plus, optionally, one adapter.
pub struct Linear {
    base: FrozenLinear,
    adapter: Option<Box<dyn LinearAdapter>>,
    merged: bool,
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Self { base: FrozenLinear::new(weight), adapter: None, merged: false }
    }

    pub fn base(&self) -> &FrozenLinear {
        &self.base
    }

    /// Replace the frozen weight (PiSSA and OLoRA store a residual; merge writes W + ΔW).
    pub fn set_base_weight(&mut self, weight: Tensor) {
        self.base = FrozenLinear::new(weight);
    }

    pub fn adapter(&self) -> Option<&dyn LinearAdapter> {
        self.adapter.as_deref()
    }

    pub fn set_adapter(&mut self, adapter: Box<dyn LinearAdapter>) {
        self.adapter = Some(adapter);
        self.merged = false;
    }

    /// Remove the adapter and hand it back (EVA wraps adapters to record their inputs).
    pub fn take_adapter(&mut self) -> Option<Box<dyn LinearAdapter>> {
        self.merged = false;
        self.adapter.take()
    }

    /// Detach the adapter (EVA gives some layers rank 0, i.e. no adapter).
    pub fn clear_adapter(&mut self) {
        self.adapter = None;
        self.merged = false;
    }

    pub fn is_merged(&self) -> bool {
        self.merged
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match &self.adapter {
            Some(adapter) if !self.merged => adapter.forward(x, &self.base, train),
            _ => self.base.forward(x),
        }
    }

    /// Fold the adapter into the base weight; the adapter stays attached for `unmerge`.
    pub fn merge(&mut self) -> Result<()> {
        if let (Some(adapter), false) = (&self.adapter, self.merged) {
            self.base = FrozenLinear::new(adapter.merged_weight(self.base.weight())?);
            self.merged = true;
        }
        Ok(())
    }

    pub fn unmerge(&mut self) -> Result<()> {
        if let (Some(adapter), true) = (&self.adapter, self.merged) {
            self.base = FrozenLinear::new(adapter.unmerged_weight(self.base.weight())?);
            self.merged = false;
        }
        Ok(())
    }
}

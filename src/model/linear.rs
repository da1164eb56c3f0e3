//! A frozen linear layer with an optional adapter attached: the one place where every per-weight
//! method (LoRA and its family, DoRA, IA3, SNELL) hooks into the model.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};

use crate::ops::nn::{self as ops, AttentionHeads};
use crate::quant::ggml::QMatrix;
use crate::quant::{BaseWeight, Nf4Tensor};
use crate::Result;

#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: BaseWeight,
}

impl FrozenLinear {
    pub fn new(weight: Tensor) -> Self {
        Self { weight: BaseWeight::Dense(weight.detach()) }
    }

    /// An NF4 base that computes in `dtype`.
    pub fn nf4(weight: Nf4Tensor, dtype: DType) -> Self {
        Self { weight: BaseWeight::Nf4 { weight: Arc::new(weight), dtype } }
    }

    /// A GGUF block-quantized base, kept packed, that computes in `dtype`.
    pub fn packed(weight: QMatrix, dtype: DType) -> Self {
        Self { weight: BaseWeight::Packed { weight: Arc::new(weight), dtype } }
    }

    pub fn base_weight(&self) -> &BaseWeight {
        &self.weight
    }

    /// Whether both hold the very same weights (shared, not equal copies).
    pub fn shares_weight_with(&self, other: &FrozenLinear) -> bool {
        match (&self.weight, &other.weight) {
            (BaseWeight::Dense(a), BaseWeight::Dense(b)) => a.id() == b.id(),
            (BaseWeight::Nf4 { weight: a, dtype: da }, BaseWeight::Nf4 { weight: b, dtype: db }) => Arc::ptr_eq(a, b) && da == db,
            (BaseWeight::Packed { weight: a, dtype: da }, BaseWeight::Packed { weight: b, dtype: db }) => Arc::ptr_eq(a, b) && da == db,
            _ => false,
        }
    }

    /// W in the working dtype ([`BaseWeight::dense`]: for NF4 a dense copy for as long as the
    /// caller holds it: DoRA's norms, merge, export).
    pub fn weight(&self) -> Result<Cow<'_, Tensor>> {
        self.weight.dense()
    }

    pub fn device(&self) -> &Device {
        self.weight.device()
    }

    fn dims(&self) -> &[usize] {
        self.weight.dims()
    }

    pub fn out_features(&self) -> usize {
        self.dims()[0]
    }

    pub fn in_features(&self) -> usize {
        self.dims()[1]
    }

    /// `x Wᵀ` for x of shape [..., in]. NF4: dequantize, then the dense matmul; W is a constant
    /// for autograd, so backward computes only `dx = dy · dequant(W)`. Untracked x on a GPU
    /// (decoding) reads the packed codes directly: one row through the GEMV kernel, up to
    /// [`FEW_ROWS_MAX`](crate::quant::nf4_kernels::FEW_ROWS_MAX) rows (beams, small batches) through
    /// the few-row matmul.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.elem_count() / self.in_features().max(1);
        match &self.weight {
            // Inference on a packed GGUF base: by the blocks' dot products where they pay (few
            // rows, or any number when interleaved); else by dequantizing W once and a dense GEMM.
            BaseWeight::Packed { weight, .. } if !x.track_op() && x.device().is_cpu() && weight.packed_product_pays(rows) => {
                crate::quant::ggml::matmul_tensor(weight, x)
            }
            BaseWeight::Nf4 { weight, .. }
                if rows <= crate::quant::nf4_kernels::FEW_ROWS_MAX && x.device().is_cuda() && !x.track_op() && crate::ops::fused_for(x) =>
            {
                if rows == 1 { crate::quant::nf4_kernels::gemv(weight, x) } else { crate::quant::nf4_kernels::matmul_few(weight, x) }
            }
            _ => ops::frozen_matmul_t(x, &self.weight),
        }
    }

    /// `x Wᵀ` for x [b, t, in] split into attention heads; in training one op
    /// ([`ops::frozen_matmul_t_heads`]), so the [b, t, out] product is not kept.
    pub fn forward_heads(&self, x: &Tensor, heads: AttentionHeads, train: bool) -> Result<Tensor> {
        if train {
            return ops::frozen_matmul_t_heads(x, &self.weight, heads, train);
        }
        heads.split(&self.forward(x)?, train)
    }
}

/// The outputs of linears that read the same x (q, k and v; gate and up) by one packed product
/// at inference on the CPU (`QMatrix::matmul_many`: x quantized once, one parallel loop), when
/// every one is an interleaved packed base whose adapter, if active, adds its term to the base's
/// output (`LinearAdapter::takes_base_output`) and x is f32; `None` otherwise, and each layer
/// then computes its own.
pub fn packed_siblings<const N: usize>(linears: [&Linear; N], x: &Tensor, train: bool) -> Result<Option<[Tensor; N]>> {
    use crate::quant::ggml::Layout;
    if train || x.track_op() || !x.device().is_cpu() || x.dtype() != DType::F32 || N == 0 {
        return Ok(None);
    }
    let cols = linears[0].base.in_features();
    let rows = x.elem_count() / cols.max(1);
    let mut ws = Vec::with_capacity(N);
    for linear in linears {
        if linear.active_adapter().is_some_and(|a| !a.takes_base_output(x)) {
            return Ok(None);
        }
        match linear.base.base_weight() {
            BaseWeight::Packed { weight, .. } if weight.layout == Layout::Interleaved && weight.cols == cols && weight.packed_product_pays(rows) => ws.push(weight.as_ref()),
            _ => return Ok(None),
        }
    }
    let dims = x.dims();
    if dims.last() != Some(&cols) {
        return Ok(None);
    }
    let ys = crate::threads::with_values(x, |values: &[f32]| QMatrix::matmul_many(&ws, values, rows))??;
    let mut outs = Vec::with_capacity(N);
    for ((y, w), linear) in ys.into_iter().zip(&ws).zip(linears) {
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("x has a last dim") = w.rows;
        let y = Tensor::from_vec(y, shape, x.device())?;
        outs.push(match linear.active_adapter() {
            Some(adapter) => adapter.add_to_base(x, y)?,
            None => y,
        });
    }
    Ok(Some(outs.try_into().unwrap_or_else(|_| unreachable!("one output a linear"))))
}

/// Inference: not training, and no input carries a graph.
pub fn inference(inputs: &[&Tensor], train: bool) -> bool {
    !train && inputs.iter().all(|x| !x.track_op())
}

/// `out`, detached at inference: the adapter's variables would otherwise give every later
/// product of the forward a tracked input, which takes a packed base off its packed kernels
/// (and keeps a graph nobody reads).
pub fn untracked(out: Tensor, inference: bool) -> Result<Tensor> {
    Ok(if inference { out.detach() } else { out })
}

/// What a per-weight adapter method implements.
pub trait LinearAdapter: Send + Sync {
    /// The adapted layer's output for input x, given the frozen base layer.
    fn forward(&self, x: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor>;
    /// The output for x [b, t, in] split into attention heads (q, k, v). The methods whose fused
    /// op can take the split inside (LoRA, DoRA) do, so the graph does not keep their output;
    /// the others split it by a separate op.
    fn forward_heads(&self, x: &Tensor, base: &FrozenLinear, heads: AttentionHeads, train: bool) -> Result<Tensor> {
        heads.split(&self.forward(x, base, train)?, train)
    }
    /// The output for `x = silu(g) ⊙ u` (down_proj). LoRA's fused op takes SwiGLU inside, so the
    /// graph does not keep the activation; the others compute it by a separate op.
    fn forward_swiglu(&self, g: &Tensor, u: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor> {
        self.forward(&ops::swiglu(g, u, train)?, base, train)
    }
    /// [`LinearAdapter::forward_swiglu`] in a graph that is only backpropagated through, never
    /// read (gradient checkpointing's recompute of a layer): the same gradients, values left
    /// unspecified, so that a method may skip the work no backward reads (LoRA: the base GEMM
    /// and the branch's up-projection). The others compute the whole output.
    fn forward_swiglu_backward_only(&self, g: &Tensor, u: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor> {
        self.forward_swiglu(g, u, base, train)
    }
    /// `(A [r, in], B [out, r], s)` where the inference output is `base(x) + s · (x Aᵀ) Bᵀ`
    /// (LoRA, rsLoRA), so that rows of several adapters share one base product
    /// (`ops::lora_rows`); `None` for the methods that change the product itself (DoRA, IA3,
    /// SNELL, ...), whose rows a mixed batch computes whole.
    fn low_rank_factors(&self) -> Option<(Tensor, Tensor, f64)> {
        None
    }
    /// Whether, at inference, this adapter's output for x is the base's output plus a term that
    /// [`LinearAdapter::add_to_base`] adds, so that the base's product may come from elsewhere
    /// (siblings that read the same x in one packed product, `packed_siblings`).
    fn takes_base_output(&self, _x: &Tensor) -> bool {
        false
    }
    /// The output for x from the base's output `y = base(x)`, where `takes_base_output(x)`.
    fn add_to_base(&self, _x: &Tensor, _y: Tensor) -> Result<Tensor> {
        Err(crate::Error::msg("this adapter computes its own base product"))
    }
    /// The weight that computes the adapted layer with a plain linear (for `merge`).
    fn merged_weight(&self, base: &Tensor) -> Result<Tensor>;
    /// The inverse of `merged_weight` (for `unmerge`).
    fn unmerged_weight(&self, merged: &Tensor) -> Result<Tensor>;
    /// Trainable tensors with their key suffix in PEFT's file format (e.g. `lora_A.weight`).
    fn params(&self) -> Vec<(String, Var)>;
    /// Tensors of the adapter's file that are not trained (SIFT's chosen positions): the key
    /// suffix (as in `params`), the dtype it is read back in, and the tensor (None while unset).
    fn state(&self) -> Vec<(&'static str, DType, Option<Tensor>)> {
        Vec::new()
    }
    /// Set one tensor of `state` read from a file.
    fn set_state(&self, key: &str, _value: &Tensor) -> Result<()> {
        Err(crate::Error::Adapter(format!("this adapter keeps no `{key}`")))
    }
    /// The concrete adapter, for the methods that need more than this trait (PiSSA's conversion,
    /// SIFT's indices, EVA's re-initialisation).
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
    /// [`LinearAdapter::as_any`], mutable (a mixed layer's adapters change at run time).
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
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
    /// The frozen weight, shared (no copy), without the adapter.
    pub fn share_base(&self) -> Self {
        Self { base: self.base.clone(), adapter: None, merged: false }
    }

    pub fn new(weight: Tensor) -> Self {
        Self { base: FrozenLinear::new(weight), adapter: None, merged: false }
    }

    /// Keep a dense frozen base in `dtype` (a packed or NF4 base stays as it is).
    pub fn set_base_dtype(&mut self, dtype: DType) -> Result<()> {
        if let BaseWeight::Dense(w) = self.base.base_weight() {
            if w.dtype() != dtype {
                self.base = FrozenLinear::new(w.to_dtype(dtype)?);
            }
        }
        Ok(())
    }

    /// A layer whose frozen weight is NF4, computing in `dtype`.
    pub fn new_nf4(weight: Nf4Tensor, dtype: DType) -> Self {
        Self { base: FrozenLinear::nf4(weight, dtype), adapter: None, merged: false }
    }

    /// A layer whose frozen weight is a packed GGUF matrix, computing in `dtype`.
    pub fn new_packed(weight: QMatrix, dtype: DType) -> Self {
        Self { base: FrozenLinear::packed(weight, dtype), adapter: None, merged: false }
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

    pub fn adapter_mut(&mut self) -> Option<&mut (dyn LinearAdapter + 'static)> {
        self.adapter.as_deref_mut()
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

    /// The active adapter's low-rank factors (`LinearAdapter::low_rank_factors`); `None`
    /// without an adapter, merged, or not of that form.
    pub fn low_rank_factors(&self) -> Option<(Tensor, Tensor, f64)> {
        self.active_adapter().and_then(|a| a.low_rank_factors())
    }

    /// The adapter that computes the layer: none when it is merged into the base weight.
    fn active_adapter(&self) -> Option<&dyn LinearAdapter> {
        self.adapter.as_deref().filter(|_| !self.merged)
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self.active_adapter() {
            Some(adapter) => untracked(adapter.forward(x, &self.base, train)?, inference(&[x], train)),
            None => self.base.forward(x),
        }
    }

    /// `forward(x)` for x [b, t, in] split into attention heads (`LinearAdapter::forward_heads`).
    pub fn forward_heads(&self, x: &Tensor, heads: AttentionHeads, train: bool) -> Result<Tensor> {
        match self.active_adapter() {
            Some(adapter) => untracked(adapter.forward_heads(x, &self.base, heads, train)?, inference(&[x], train)),
            None => self.base.forward_heads(x, heads, train),
        }
    }

    /// `residual + forward(x)`; a frozen layer in training adds into the residual in one op
    /// ([`ops::frozen_matmul_t_add`]), so its output is not kept for backward.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        match self.active_adapter() {
            None if train => ops::frozen_matmul_t_add(x, self.base.base_weight(), residual),
            _ => Ok((residual + self.forward(x, train)?)?),
        }
    }

    /// `residual + forward(silu(g) ⊙ u)` (the MLP's down_proj); a frozen layer in training is one
    /// op ([`ops::swiglu_frozen_matmul_t_add`]) that keeps neither the activation nor the
    /// product for backward, an adapter takes `LinearAdapter::forward_swiglu`.
    pub fn forward_swiglu_add(&self, g: &Tensor, u: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        match self.active_adapter() {
            Some(adapter) => untracked((residual + adapter.forward_swiglu(g, u, &self.base, train)?)?, inference(&[g, u, residual], train)),
            None if train => ops::swiglu_frozen_matmul_t_add(g, u, self.base.base_weight(), residual, train),
            None => Ok((residual + self.base.forward(&ops::swiglu(g, u, train)?)?)?),
        }
    }

    /// [`Linear::forward_swiglu_add`] in a graph that is only backpropagated through, never read
    /// ([`crate::model::Llama::layer_backward_graph`]): the same gradients; the values are not
    /// the layer's output, since the frozen GEMM that no backward reads is not run.
    pub fn forward_swiglu_add_backward_only(&self, g: &Tensor, u: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        match self.active_adapter() {
            Some(adapter) => Ok((residual + adapter.forward_swiglu_backward_only(g, u, &self.base, train)?)?),
            None => ops::swiglu_frozen_matmul_t_add_backward_only(g, u, self.base.base_weight(), residual, train),
        }
    }

    /// Fold the adapter into the base weight; the adapter stays attached for `unmerge`. An NF4
    /// base becomes dense: dequantized W + ΔW.
    pub fn merge(&mut self) -> Result<()> {
        if let (Some(adapter), false) = (&self.adapter, self.merged) {
            self.base = FrozenLinear::new(adapter.merged_weight(&*self.base.weight()?)?);
            self.merged = true;
        }
        Ok(())
    }

    pub fn unmerge(&mut self) -> Result<()> {
        if let (Some(adapter), true) = (&self.adapter, self.merged) {
            self.base = FrozenLinear::new(adapter.unmerged_weight(&*self.base.weight()?)?);
            self.merged = false;
        }
        Ok(())
    }
}

//! The frozen base weight of a linear layer, dense or NF4: what the training ops multiply by
//! without ever holding its gradient.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::ggml::QMatrix;
use super::Nf4Tensor;
use crate::Result;

/// The frozen base weight `W` [out, in] of a linear layer (no bias: LLaMA has none), dense or NF4.
/// Cheap to clone (shared): the training ops hold one and take [`BaseWeight::dense`] in forward
/// and again in backward, so an NF4 base is never kept dequantized between the two (QLoRA's
/// memory: at 7B, the dense copies of every layer would be 13 GB in bf16).
#[derive(Debug, Clone)]
pub enum BaseWeight {
    Dense(Tensor),
    /// NF4 (bitsandbytes layout), dequantized into `dtype`, the model's working dtype, when used.
    Nf4 { weight: Arc<Nf4Tensor>, dtype: DType },
    /// A GGUF block-quantized matrix kept packed (inference on the CPU), dequantized into
    /// `dtype` when a dense W is needed.
    Packed { weight: Arc<QMatrix>, dtype: DType },
}

impl BaseWeight {
    /// W in the working dtype. Dense: borrowed, free. NF4: dequantized on every call, a dense
    /// [out, in] matrix allocated for as long as the caller holds it.
    pub fn dense(&self) -> Result<Cow<'_, Tensor>> {
        match self {
            BaseWeight::Dense(w) => Ok(Cow::Borrowed(w)),
            BaseWeight::Nf4 { weight, dtype } => Ok(Cow::Owned(weight.dequantize(*dtype)?)),
            BaseWeight::Packed { weight, dtype } => Ok(Cow::Owned(weight.to_tensor(*dtype)?)),
        }
    }

    pub fn device(&self) -> &Device {
        match self {
            BaseWeight::Dense(w) => w.device(),
            BaseWeight::Nf4 { weight, .. } => &weight.device,
            BaseWeight::Packed { .. } => &Device::Cpu,
        }
    }

    pub fn dims(&self) -> &[usize] {
        match self {
            BaseWeight::Dense(w) => w.dims(),
            BaseWeight::Nf4 { weight, .. } => &weight.shape,
            BaseWeight::Packed { weight, .. } => &weight.shape,
        }
    }

    /// The bytes a product with W reads: the dense values, or the packed codes and scales.
    pub fn bytes(&self) -> usize {
        match self {
            BaseWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            BaseWeight::Nf4 { weight, .. } => weight.packed.len() + weight.shape.iter().product::<usize>() / weight.blocksize,
            BaseWeight::Packed { weight, .. } => weight.data.len(),
        }
    }

    /// The dtype [`BaseWeight::dense`] gives.
    pub fn dtype(&self) -> DType {
        match self {
            BaseWeight::Dense(w) => w.dtype(),
            BaseWeight::Nf4 { dtype, .. } | BaseWeight::Packed { dtype, .. } => *dtype,
        }
    }
}

impl From<Tensor> for BaseWeight {
    fn from(w: Tensor) -> Self {
        BaseWeight::Dense(w.detach())
    }
}

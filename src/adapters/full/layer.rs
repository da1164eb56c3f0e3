//! Full fine-tuning's layer: a trainable copy of the weight.

use candle_core::{DType, Tensor, Var};

use crate::model::{FrozenLinear, LinearAdapter};
use crate::ops::nn::matmul_t;
use crate::Result;

pub struct FullLinear {
    pub weight: Var,
    /// The base weight (shares its storage: no copy) for `unmerge`.
    original: Tensor,
}

impl FullLinear {
    pub fn new(base: &FrozenLinear) -> Result<Self> {
        Ok(Self { weight: Var::from_tensor(&base.weight()?.to_dtype(DType::F32)?)?, original: base.weight()?.into_owned() })
    }
}

impl LinearAdapter for FullLinear {
    fn forward(&self, x: &Tensor, _base: &FrozenLinear, _train: bool) -> Result<Tensor> {
        matmul_t(x, &self.weight.as_tensor().to_dtype(x.dtype())?)
    }

    fn merged_weight(&self, w: &Tensor) -> Result<Tensor> {
        Ok(self.weight.as_tensor().to_dtype(w.dtype())?)
    }

    fn unmerged_weight(&self, _merged: &Tensor) -> Result<Tensor> {
        Ok(self.original.clone())
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("weight".into(), self.weight.clone())]
    }
}

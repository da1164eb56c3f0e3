//! IA3's layer: one learned scale per output (or input) feature.

use candle_core::{DType, Tensor, Var};

use crate::model::{FrozenLinear, LinearAdapter};
use crate::Result;

pub struct Ia3Linear {
    pub l: Var,
    feedforward: bool,
}

impl Ia3Linear {
    pub fn new(base: &FrozenLinear, feedforward: bool) -> Result<Self> {
        let shape = if feedforward { (1, base.in_features()) } else { (base.out_features(), 1) };
        Ok(Self { l: Var::ones(shape, DType::F32, base.device())?, feedforward })
    }

    /// The scaling as a row vector in `dtype`, to broadcast over the last dim of activations.
    fn scaling(&self, dtype: DType) -> Result<Tensor> {
        Ok(self.l.as_tensor().flatten_all()?.to_dtype(dtype)?)
    }

    /// The scaling shaped to multiply W [out, in]: a column for outputs, a row for inputs.
    fn weight_scaling(&self) -> &Tensor {
        self.l.as_tensor()
    }
}

impl LinearAdapter for Ia3Linear {
    fn forward(&self, x: &Tensor, base: &FrozenLinear, _train: bool) -> Result<Tensor> {
        let l = self.scaling(x.dtype())?;
        if self.feedforward {
            base.forward(&x.broadcast_mul(&l)?)
        } else {
            Ok(base.forward(x)?.broadcast_mul(&l)?)
        }
    }

    fn merged_weight(&self, w: &Tensor) -> Result<Tensor> {
        Ok(w.to_dtype(DType::F32)?.broadcast_mul(self.weight_scaling())?.to_dtype(w.dtype())?)
    }

    fn unmerged_weight(&self, w: &Tensor) -> Result<Tensor> {
        Ok(w.to_dtype(DType::F32)?.broadcast_div(self.weight_scaling())?.to_dtype(w.dtype())?)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("ia3_l".into(), self.l.clone())]
    }
}

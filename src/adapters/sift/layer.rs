//! SIFT's layer: the sparse increment of one weight.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor, Var};

use crate::ops::nn::matmul_t;
use crate::model::{FrozenLinear, LinearAdapter};
use crate::{Error, Result};
use super::SiftConfig;

#[derive(Default)]
pub struct SiftState {
    /// Positions in the flattened W, u32 [k]; None until the first backward.
    pub indices: Option<Tensor>,
    pub(super) probe: Option<Var>,
    pub(super) acc: Option<Tensor>,
}

pub struct SiftLinear {
    pub values: Var,
    pub k: usize,
    shape: (usize, usize),
    pub state: Arc<Mutex<SiftState>>,
}

impl SiftLinear {
    pub fn new(base: &FrozenLinear, cfg: &SiftConfig) -> Result<Self> {
        let shape = (base.out_features(), base.in_features());
        let numel = shape.0 * shape.1;
        let k = ((cfg.sparse_rate * numel as f64) as usize + 1).min(numel);
        let values = Var::zeros(k, DType::F32, base.device())?;
        Ok(Self { values, k, shape, state: Arc::new(Mutex::new(SiftState::default())) })
    }

    pub fn indices(&self) -> Option<Tensor> {
        self.state.lock().expect("sift lock").indices.clone()
    }

    pub fn set_indices(&self, indices: &Tensor) -> Result<()> {
        if indices.dims() != [self.k] {
            return Err(Error::Adapter(format!("SIFT indices have shape {:?}, expected [{}]", indices.dims(), self.k)));
        }
        let mut st = self.state.lock().expect("sift lock");
        st.indices = Some(indices.to_dtype(DType::U32)?.to_device(self.values.device())?);
        st.probe = None;
        st.acc = None;
        Ok(())
    }

    /// Δ = scatter(indices, values) as a dense f32 [out, in].
    pub fn delta(&self, indices: &Tensor) -> Result<Tensor> {
        let (o, i) = self.shape;
        let zeros = Tensor::zeros(o * i, DType::F32, self.values.device())?;
        Ok(zeros.index_add(indices, self.values.as_tensor(), 0)?.reshape((o, i))?)
    }
}

impl LinearAdapter for SiftLinear {
    fn forward(&self, x: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor> {
        let mut st = self.state.lock().expect("sift lock");
        let y = base.forward(x)?;
        if let Some(idx) = &st.indices {
            let delta = self.delta(idx)?.to_dtype(x.dtype())?;
            return Ok((y + matmul_t(x, &delta)?)?);
        }
        if !train {
            return Ok(y);
        }
        let probe = match &st.probe {
            Some(p) => p.clone(),
            None => {
                let p = Var::zeros(self.shape, DType::F32, self.values.device())?;
                st.probe = Some(p.clone());
                p
            }
        };
        Ok((y + matmul_t(x, &probe.as_tensor().to_dtype(x.dtype())?)?)?)
    }

    fn merged_weight(&self, w: &Tensor) -> Result<Tensor> {
        match self.indices() {
            Some(idx) => Ok((w.to_dtype(DType::F32)? + self.delta(&idx)?)?.to_dtype(w.dtype())?),
            None => Ok(w.clone()),
        }
    }

    fn unmerged_weight(&self, w: &Tensor) -> Result<Tensor> {
        match self.indices() {
            Some(idx) => Ok((w.to_dtype(DType::F32)? - self.delta(&idx)?)?.to_dtype(w.dtype())?),
            None => Ok(w.clone()),
        }
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("sift_values".into(), self.values.clone())]
    }

    /// The chosen positions are part of the adapter: the values mean nothing without them.
    fn state(&self) -> Vec<(&'static str, DType, Option<Tensor>)> {
        vec![("sift_indices", DType::U32, self.indices())]
    }

    fn set_state(&self, key: &str, value: &Tensor) -> Result<()> {
        match key {
            "sift_indices" => self.set_indices(value),
            other => Err(Error::Adapter(format!("SIFT keeps no `{other}`"))),
        }
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}


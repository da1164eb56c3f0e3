//! SIFT (Song et al., "Sparse is Enough in Fine-tuning Pre-trained Large Language Models",
//! ICML 2024; song-wx/SIFT `sift.py`, `use_lora=False` path, docs/METHODS.md §4.2).
//!
//! Per targeted weight W [out, in], `k = int(sparse_rate · numel) + 1` entries are trainable
//! (sparse_rate 0.2 in EfficientFT). The entries are chosen on the FIRST backward as the top-k of
//! |∂L/∂W|: until then the layer computes `y = x (W + P)ᵀ` with a dense zero probe P whose
//! gradient is ∂L/∂W; [`SiftHook`] accumulates it over the micro-batches, picks the indices
//! (stored in ascending order), and gives the first update the dense gradient gathered at them
//! (SIFT's backward hook moves the same sparse gradient into its vector). From then on
//! `y = x Wᵀ + x Δᵀ`, `Δ = scatter(indices, values)` with `values` [k] (zero-init) the only
//! trainable tensor, so only those k entries of the effective weight ever change.
//!
//! Not a PEFT type: the engine writes `peft_type: "SIFT"`, `<module>.sift_values` (f32 [k]) and
//! `<module>.sift_indices` (u32 [k], row-major positions in W).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use std::path::Path;

use rand::rngs::StdRng;
use serde_json::Value;

use super::config::{parse, ReadConfig};
use super::method::{AdapterMethod, BuiltLinear, TrainingExtras};
use super::Targets;
use crate::ops::nn::matmul_t;
use crate::model::{FrozenLinear, LinearAdapter, Llama};
use super::StepHook;
use crate::{Error, Result};

fn default_rate() -> f64 {
    0.2
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiftConfig {
    pub target_modules: Targets,
    #[serde(default = "default_rate")]
    pub sparse_rate: f64,
}

impl AdapterMethod for SiftConfig {
    fn peft_type(&self) -> &'static str {
        "SIFT"
    }

    fn targets(&self) -> Option<&Targets> {
        Some(&self.target_modules)
    }

    fn peft_json(&self) -> Value {
        serde_json::to_value(self).expect("SiftConfig serialises")
    }

    fn build_linear(&self, _path: &str, base: &FrozenLinear, _rng: &mut StdRng) -> Result<Option<BuiltLinear>> {
        Ok(Some((Box::new(SiftLinear::new(base, self)?), None)))
    }

    fn training_extras(&self, model: &Llama, _total_steps: usize) -> Result<TrainingExtras> {
        Ok(TrainingExtras { hooks: vec![Box::new(SiftHook::new(model))], ..Default::default() })
    }
}

/// The engine's own `peft_type: "SIFT"`.
pub fn read_sift(v: &Value, path: &Path) -> Result<ReadConfig> {
    Ok((parse::<SiftConfig>(v, path, "SIFT")?.into(), &["target_modules", "sparse_rate"]))
}

#[derive(Default)]
pub struct SiftState {
    /// Positions in the flattened W, u32 [k]; None until the first backward.
    pub indices: Option<Tensor>,
    probe: Option<Var>,
    acc: Option<Tensor>,
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

/// The k positions of the largest |g|, ascending.
pub fn top_k_abs(g: &Tensor, k: usize) -> Result<Tensor> {
    let a: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.abs()?.to_vec1()?;
    let k = k.min(a.len());
    let mut idx: Vec<u32> = (0..a.len() as u32).collect();
    if k < a.len() {
        idx.select_nth_unstable_by(k - 1, |&x, &y| a[y as usize].total_cmp(&a[x as usize]));
        idx.truncate(k);
    }
    idx.sort_unstable();
    Ok(Tensor::from_vec(idx, k, &Device::Cpu)?.to_device(g.device())?)
}

/// Picks each SIFT layer's indices on the first backward (see the module doc).
pub struct SiftHook {
    layers: Vec<(String, Arc<Mutex<SiftState>>, usize)>,
}

impl SiftHook {
    pub fn new(model: &Llama) -> Self {
        let mut layers = Vec::new();
        for (path, lin) in model.named_linears() {
            if let Some(s) = lin.adapter().and_then(|a| a.as_any()).and_then(|a| a.downcast_ref::<SiftLinear>()) {
                layers.push((format!("base_model.model.{path}.sift_values"), s.state.clone(), s.k));
            }
        }
        Self { layers }
    }
}

impl StepHook for SiftHook {
    fn after_backward(&mut self, grads: &GradStore) -> Result<()> {
        for (_, state, _) in &self.layers {
            let mut st = state.lock().expect("sift lock");
            let Some(g) = st.probe.as_ref().and_then(|p| grads.get(p.as_tensor())).cloned() else { continue };
            st.acc = Some(match st.acc.take() {
                Some(acc) => (acc + g)?,
                None => g,
            });
        }
        Ok(())
    }

    fn before_update(&mut self, _step: usize, grads: &mut HashMap<String, Tensor>) -> Result<()> {
        for (name, state, k) in &self.layers {
            let mut st = state.lock().expect("sift lock");
            if st.indices.is_some() {
                continue;
            }
            let Some(acc) = st.acc.take() else { continue };
            let idx = top_k_abs(&acc, *k)?;
            grads.insert(name.clone(), acc.flatten_all()?.index_select(&idx, 0)?.to_dtype(DType::F32)?);
            st.indices = Some(idx);
            st.probe = None;
        }
        Ok(())
    }
}

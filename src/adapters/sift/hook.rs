//! SIFT's step hook: picks each layer's trained entries from the first gradient.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

use crate::model::Llama;
use crate::adapters::StepHook;
use crate::Result;
use super::{SiftLinear, SiftState};

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

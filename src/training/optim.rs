//! AdamW with decoupled weight decay, exactly as `torch.optim.AdamW` updates:
//! `p ← p − lr·wd·p`, `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `p ← p − lr · (m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε)`.
//! Parameters come in groups with a learning-rate multiplier each (EfficientFT's `lr_V = λ·lr`).
//! The state (m, v, t) saves and loads with the checkpoint.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use crate::adapters::full::galore::{GaloreConfig, Projector};
use crate::error::{Error, Result};
use crate::ops::adamw::{self, AdamWScalars};

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 3e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

pub struct Param {
    pub name: String,
    pub var: Var,
    /// Multiplies the scheduled learning rate for this parameter.
    pub lr_scale: f64,
    m: Tensor,
    v: Tensor,
    /// Set for the weights trained with GaLore (their moments are in the projected space).
    pub galore: Option<Projector>,
}

pub struct AdamW {
    pub config: AdamWConfig,
    pub params: Vec<Param>,
    pub t: usize,
}

impl AdamW {
    /// `params`: (name, var, lr multiplier).
    pub fn new(params: Vec<(String, Var, f64)>, config: AdamWConfig) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, var, lr_scale)| {
                let m = var.as_tensor().zeros_like()?;
                let v = var.as_tensor().zeros_like()?;
                Ok(Param { name, var, lr_scale, m, v, galore: None })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { config, params, t: 0 })
    }

    /// One update with learning rate `lr` from the gradients in `grads` (keyed by parameter name).
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.t += 1;
        let c = self.config;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        for p in &mut self.params {
            let Some(g) = grads.get(&p.name) else { continue };
            let lr = lr * p.lr_scale;
            if let Some(proj) = &mut p.galore {
                // galore_torch.GaLoreAdamW: moments of the projected gradient, HF-AdamW arithmetic.
                let low = proj.project(g, self.t - 1)?;
                p.m = ((&p.m * c.beta1)? + (&low * (1.0 - c.beta1))?)?;
                p.v = ((&p.v * c.beta2)? + (low.sqr()? * (1.0 - c.beta2))?)?;
                let step_size = lr * bc2.sqrt() / bc1;
                let norm = (&p.m / (p.v.sqrt()? + c.eps)?)?;
                let update = proj.project_back(&norm)?.to_dtype(p.var.dtype())?;
                let mut theta = (p.var.as_tensor() - (update * step_size)?)?;
                if c.weight_decay > 0.0 {
                    theta = (&theta * (1.0 - lr * c.weight_decay))?;
                }
                p.var.set(&theta)?;
                continue;
            }
            let theta = p.var.as_tensor();
            if adamw::adamw_applies(theta, g, &p.m, &p.v) {
                let decay = (c.weight_decay > 0.0).then_some(c.weight_decay);
                adamw::adamw_update(theta, g, &p.m, &p.v, AdamWScalars::new((c.beta1, c.beta2), c.eps, decay, lr, self.t))?;
                continue;
            }
            let decayed = if c.weight_decay > 0.0 { (theta * (1.0 - lr * c.weight_decay))? } else { theta.clone() };
            p.m = ((&p.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&p.v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&p.m / bc1)? / denom)?;
            p.var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Train the 2-D parameters that `select` picks by name with GaLore; their moments restart
    /// at zero in the projected shape.
    pub fn enable_galore(&mut self, select: impl Fn(&str) -> bool, config: GaloreConfig) -> Result<usize> {
        let mut n = 0;
        for p in &mut self.params {
            if !select(&p.name) || p.var.rank() != 2 {
                continue;
            }
            let shape = p.var.dims2()?;
            let proj = Projector::new(config, shape);
            let low = proj.low_shape(shape);
            p.m = Tensor::zeros(low, p.var.dtype(), p.var.device())?;
            p.v = p.m.clone();
            p.galore = Some(proj);
            n += 1;
        }
        Ok(n)
    }

    /// The moments as named tensors (`m.NAME`, `v.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in &self.params {
            // Copies: the fused update writes the moments in place.
            out.insert(format!("m.{}", p.name), p.m.copy()?);
            out.insert(format!("v.{}", p.name), p.v.copy()?);
            if let Some(ortho) = p.galore.as_ref().and_then(|g| g.ortho.as_ref()) {
                out.insert(format!("galore_p.{}", p.name), ortho.contiguous()?);
            }
        }
        Ok(out)
    }

    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: usize) -> Result<()> {
        for p in &mut self.params {
            for (prefix, slot) in [("m", &mut p.m), ("v", &mut p.v)] {
                let key = format!("{prefix}.{}", p.name);
                let value = tensors.get(&key).ok_or_else(|| Error::Training(format!("optimizer state lacks `{key}`")))?;
                if value.dims() != slot.dims() {
                    return Err(Error::Training(format!(
                        "optimizer state `{key}` has shape {:?}, the parameter {:?}",
                        value.dims(),
                        slot.dims()
                    )));
                }
                // A copy the update may write in place, not the caller's tensor.
                *slot = value.to_device(slot.device())?.to_dtype(slot.dtype())?.copy()?;
            }
            if let (Some(proj), Some(ortho)) = (p.galore.as_mut(), tensors.get(&format!("galore_p.{}", p.name))) {
                proj.ortho = Some(ortho.to_device(p.var.device())?.to_dtype(DType::F32)?);
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Scale the gradients so that their global L2 norm is at most `max_norm`; returns the norm
/// before clipping (as `torch.nn.utils.clip_grad_norm_`).
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    // One read back for all of them: a read per gradient waits on the device each time.
    let squares = grads.values().map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64)).collect::<candle_core::Result<Vec<_>>>()?;
    let sq = match squares.is_empty() {
        true => 0.0,
        false => Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f64>()?,
    };
    let norm = sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

/// Linear warmup from 0 to `peak` over `warmup` steps, then linear decay to 0 at `total`
/// (transformers' `get_linear_schedule_with_warmup`). `step` counts from 0.
pub fn linear_schedule(step: usize, warmup: usize, total: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let remaining = total.saturating_sub(step) as f64;
    peak * (remaining / total.saturating_sub(warmup).max(1) as f64).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_hand_computed_torch_step() {
        // One torch.optim.AdamW step on p = [1, -2], g = [0.5, 0.25], lr 0.1, wd 0.01:
        // p' = p(1 - lr·wd) - lr · g/(|g| + eps) = [0.999 - 0.1, -1.998 - 0.1·(0.25/0.25)]
        let var = Var::new(&[1f32, -2.0], &Device::Cpu).unwrap();
        let cfg = AdamWConfig { lr: 0.1, weight_decay: 0.01, ..Default::default() };
        let mut opt = AdamW::new(vec![("p".into(), var.clone(), 1.0)], cfg).unwrap();
        let g = Tensor::new(&[0.5f32, 0.25], &Device::Cpu).unwrap();
        opt.step(&HashMap::from([("p".to_string(), g)]), 0.1).unwrap();
        let p = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!((p[0] - 0.899).abs() < 1e-6, "{p:?}");
        assert!((p[1] - (-2.098)).abs() < 1e-6, "{p:?}");
    }

    #[test]
    fn lr_multiplier_scales_the_step() {
        let a = Var::new(&[0f32], &Device::Cpu).unwrap();
        let b = Var::new(&[0f32], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("a".into(), a.clone(), 1.0), ("b".into(), b.clone(), 4.0)], Default::default()).unwrap();
        let g = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        opt.step(&HashMap::from([("a".to_string(), g.clone()), ("b".to_string(), g)]), 0.01).unwrap();
        let (a, b) = (a.as_tensor().to_vec1::<f32>().unwrap()[0], b.as_tensor().to_vec1::<f32>().unwrap()[0]);
        assert!((b / a - 4.0).abs() < 1e-5, "a {a} b {b}");
    }

    #[test]
    fn clipping_caps_the_global_norm() {
        let mut grads = HashMap::from([
            ("a".to_string(), Tensor::new(&[3f32], &Device::Cpu).unwrap()),
            ("b".to_string(), Tensor::new(&[4f32], &Device::Cpu).unwrap()),
        ]);
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let a = grads["a"].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-5);
    }

    #[test]
    fn schedule_warms_up_then_decays_to_zero() {
        assert_eq!(linear_schedule(0, 10, 110, 1.0), 0.0);
        assert!((linear_schedule(5, 10, 110, 1.0) - 0.5).abs() < 1e-12);
        assert!((linear_schedule(10, 10, 110, 1.0) - 1.0).abs() < 1e-12);
        assert!((linear_schedule(60, 10, 110, 1.0) - 0.5).abs() < 1e-12);
        assert_eq!(linear_schedule(110, 10, 110, 1.0), 0.0);
    }
}

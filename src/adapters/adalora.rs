//! AdaLoRA (Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
//! ICLR 2023), with PEFT's semantics (`tuners/adalora`, docs/METHODS.md §4.2).
//!
//! SVD-form update `ΔW = B (A ⊙ E)`: `lora_A` [r, in], `lora_B` [out, r] ~ N(0, 0.02²),
//! `lora_E` [r, 1] zero, r = `init_r`; forward
//! `y = x Wᵀ + (drop(x) (A ⊙ E)ᵀ) Bᵀ · α / (ranknum + 1e-5)` with ranknum = r (PEFT's scaling is
//! `lora_alpha`, not α/r). PEFT's keys: `lora_A`, `lora_B`, `lora_E` (ParameterDicts: no `.weight`).
//!
//! Training adds PEFT's orthogonal regulariser to the loss,
//! `orth_reg_weight · mean over {A, B} of ‖A Aᵀ − I‖_F, ‖Bᵀ B − I‖_F` (PEFT takes the Frobenius
//! norm, not its square, and averages over the matrices), and runs PEFT's `RankAllocator` after
//! every optimizer step ([`AdaLoraHook`], `update_and_allocate(global_step)` with the 0-based step):
//! - sensitivity `I = |p · ∇p|` of every A, B, E entry, smoothed `Ī ← β₁Ī + (1−β₁)I` and the
//!   uncertainty `Ū ← β₂Ū + (1−β₂)|I − Ī|` (β₁ = β₂ = 0.85), score `Ī·Ū`;
//! - the importance of triplet i of a layer is `s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)`;
//! - budget (total kept ranks): `init_r·n` while `step ≤ tinit`; then
//!   `⌊(init_r·n − target_r·n)(1 − (step−tinit)/(T−tfinal−tinit))³ + target_r·n⌋` with masking
//!   every `deltaT` steps; at `step = T − tfinal` the final mask to `target_r·n` is fixed (the
//!   rank pattern) and re-applied after every later step;
//! - masking zeroes the E entries whose importance is ≤ the (init_bgt − budget)-th smallest.
//!
//! `total_step` (T) must be set (PEFT raises without it; the seed's script crashed on that).
//! The saved file keeps every rank (masked E entries are zero), and `rank_pattern` is null.
//! The allocator's state (the EMAs, the final rank pattern) is part of the training checkpoint
//! ([`StepHook::state_tensors`]), so a resumed run allocates exactly as an uninterrupted one.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng};
use serde::{Deserialize, Serialize};

use std::path::Path;

use serde_json::{json, Value};

use super::config::{parse, ReadConfig};
use super::method::{check_rank, AdapterMethod, BuiltLinear, TrainingExtras};
use super::Targets;
use crate::ops::dropout::Dropout;
use crate::ops;
use crate::ops::nn::matmul_t;
use crate::model::{FrozenLinear, LinearAdapter, Llama};
use super::StepHook;
use crate::{Error, Result};

fn d8() -> usize {
    8
}
fn d12() -> usize {
    12
}
fn d1() -> usize {
    1
}
fn d085() -> f64 {
    0.85
}
fn d05() -> f64 {
    0.5
}
fn d8f() -> f64 {
    8.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaLoraConfig {
    pub target_modules: Targets,
    #[serde(default = "d8f")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default = "d8")]
    pub target_r: usize,
    #[serde(default = "d12")]
    pub init_r: usize,
    #[serde(default)]
    pub tinit: usize,
    #[serde(default)]
    pub tfinal: usize,
    #[serde(rename = "deltaT", default = "d1")]
    pub delta_t: usize,
    #[serde(default = "d085")]
    pub beta1: f64,
    #[serde(default = "d085")]
    pub beta2: f64,
    #[serde(default = "d05")]
    pub orth_reg_weight: f64,
    #[serde(default)]
    pub total_step: Option<usize>,
}

impl AdaLoraConfig {
    pub fn new(target_modules: Targets, init_r: usize, target_r: usize, total_step: usize) -> Self {
        Self {
            target_modules,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_r,
            init_r,
            tinit: 0,
            tfinal: 0,
            delta_t: 1,
            beta1: 0.85,
            beta2: 0.85,
            orth_reg_weight: 0.5,
            total_step: Some(total_step),
        }
    }

    /// PEFT's `AdaLoraConfig.__post_init__` checks.
    pub fn validate(&self) -> Result<usize> {
        let total = self.total_step.filter(|&t| t > 0).ok_or_else(|| {
            Error::Adapter("AdaLoRA needs `total_step` (the number of optimizer steps) for its budget schedule".into())
        })?;
        if self.tinit >= total.saturating_sub(self.tfinal) {
            return Err(Error::Adapter(format!(
                "AdaLoRA: tinit {} must be below total_step {total} - tfinal {}: no budgeting phase left",
                self.tinit, self.tfinal
            )));
        }
        if self.init_r == 0 || self.target_r > self.init_r {
            return Err(Error::Adapter(format!("AdaLoRA: need 0 < target_r {} <= init_r {}", self.target_r, self.init_r)));
        }
        Ok(total)
    }
}

impl AdapterMethod for AdaLoraConfig {
    fn peft_type(&self) -> &'static str {
        "ADALORA"
    }

    fn targets(&self) -> Option<&Targets> {
        Some(&self.target_modules)
    }

    fn peft_json(&self) -> Value {
        let mut v = serde_json::to_value(self).expect("AdaLoraConfig serialises");
        v["r"] = json!(self.target_r);
        v["bias"] = json!("none");
        v["fan_in_fan_out"] = json!(false);
        v["init_lora_weights"] = json!(true);
        v["rank_pattern"] = Value::Null;
        v["modules_to_save"] = Value::Null;
        v
    }

    fn build_linear(&self, path: &str, base: &FrozenLinear, rng: &mut StdRng) -> Result<Option<BuiltLinear>> {
        check_rank(path, "init_r", self.init_r, base)?;
        Ok(Some((Box::new(AdaLoraLinear::new(base, self, rng)?), None)))
    }

    /// The regulariser and rank allocator; PEFT needs the number of steps as `total_step`.
    fn training_extras(&self, model: &Llama, total_steps: usize) -> Result<TrainingExtras> {
        let mut c = self.clone();
        c.total_step.get_or_insert(total_steps);
        Ok(TrainingExtras { hooks: vec![Box::new(AdaLoraHook::new(model, &c)?)], ..Default::default() })
    }
}

/// AdaLoRA inherits LoRA's `r`, which PEFT ignores for AdaLoRA (the rank is `init_r`).
const ADALORA_KEYS: &[&str] = &[
    "r", "lora_alpha", "lora_dropout", "target_modules", "target_r", "init_r", "tinit", "tfinal", "deltaT",
    "beta1", "beta2", "orth_reg_weight", "total_step",
];

/// PEFT's `peft_type: "ADALORA"`.
pub fn read_peft_adalora(v: &Value, path: &Path) -> Result<ReadConfig> {
    Ok((parse::<AdaLoraConfig>(v, path, "AdaLoRA")?.into(), ADALORA_KEYS))
}

fn normal_var(shape: &[usize], std: f64, rng: &mut StdRng, device: &Device) -> Result<Var> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random();
            (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect();
    Ok(Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu)?.to_device(device)?)?)
}

pub struct AdaLoraLinear {
    pub a: Var,
    pub b: Var,
    pub e: Var,
    pub scaling: f64,
    pub ranknum: f64,
    dropout: Dropout,
}

impl AdaLoraLinear {
    pub fn new(base: &FrozenLinear, cfg: &AdaLoraConfig, rng: &mut StdRng) -> Result<Self> {
        let (out, inp, r) = (base.out_features(), base.in_features(), cfg.init_r);
        let device = base.device();
        let e = Var::zeros((r, 1), DType::F32, device)?;
        let a = normal_var(&[r, inp], 0.02, rng, device)?;
        let b = normal_var(&[out, r], 0.02, rng, device)?;
        let scaling = if cfg.lora_alpha > 0.0 { cfg.lora_alpha } else { r as f64 };
        Ok(Self { a, b, e, scaling, ranknum: r as f64, dropout: Dropout::new(cfg.lora_dropout, rng) })
    }

    fn factor(&self) -> f64 {
        self.scaling / (self.ranknum + 1e-5)
    }

    /// `B (A ⊙ E) · α/(ranknum + 1e-5)`, f32.
    pub fn delta_weight(&self) -> Result<Tensor> {
        let ae = self.a.as_tensor().broadcast_mul(self.e.as_tensor())?;
        Ok((self.b.as_tensor().matmul(&ae)? * self.factor())?)
    }
}

impl LinearAdapter for AdaLoraLinear {
    /// The fused LoRA linear with `A ⊙ E` as its A (src/ops/lora_linear.rs) on CUDA and in
    /// CPU training, so that no [T, out] branch output is kept; plain candle ops otherwise.
    fn forward(&self, x: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor> {
        let ae = self.a.as_tensor().broadcast_mul(self.e.as_tensor())?.to_dtype(x.dtype())?;
        let b = self.b.as_tensor().to_dtype(x.dtype())?;
        if ops::fused_forward(x, train) {
            return ops::lora_linear(x, base.base_weight(), &ae, &b, self.factor(), self.dropout.mask(train));
        }
        let xd = self.dropout.apply(x, train)?;
        let branch = (matmul_t(&matmul_t(&xd, &ae)?, &b)? * self.factor())?;
        Ok((base.forward(x)? + branch)?)
    }

    fn merged_weight(&self, w: &Tensor) -> Result<Tensor> {
        Ok((w.to_dtype(DType::F32)? + self.delta_weight()?)?.to_dtype(w.dtype())?)
    }

    fn unmerged_weight(&self, w: &Tensor) -> Result<Tensor> {
        Ok((w.to_dtype(DType::F32)? - self.delta_weight()?)?.to_dtype(w.dtype())?)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("lora_A".into(), self.a.clone()), ("lora_B".into(), self.b.clone()), ("lora_E".into(), self.e.clone())]
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

struct Layer {
    /// `base_model.model.<module>` (parameter names are `<prefix>.lora_A` …).
    prefix: String,
    a: Var,
    b: Var,
    e: Var,
}

/// EMA sensitivity and uncertainty of one tensor.
struct Ema {
    ipt: Tensor,
    unc: Tensor,
}

/// The orthogonal regulariser and PEFT's `RankAllocator`, run by the Trainer.
pub struct AdaLoraHook {
    pub config: AdaLoraConfig,
    total_step: usize,
    layers: Vec<Layer>,
    pub init_bgt: usize,
    pub target_bgt: usize,
    ema: HashMap<String, Ema>,
    /// The kept triplets of each layer after the final allocation (PEFT's `rank_pattern`).
    pub rank_pattern: Option<Vec<Vec<bool>>>,
    /// The budget of the last step and whether that step masked.
    pub last: Option<(usize, bool)>,
}

impl AdaLoraHook {
    pub fn new(model: &Llama, config: &AdaLoraConfig) -> Result<Self> {
        let total_step = config.validate()?;
        let mut layers = Vec::new();
        for (path, lin) in model.named_linears() {
            if let Some(l) = lin.adapter().and_then(|a| a.as_any()).and_then(|a| a.downcast_ref::<AdaLoraLinear>()) {
                layers.push(Layer { prefix: format!("base_model.model.{path}"), a: l.a.clone(), b: l.b.clone(), e: l.e.clone() });
            }
        }
        if layers.is_empty() {
            return Err(Error::Adapter("AdaLoRA hook: the model has no AdaLoRA layer".into()));
        }
        let init_bgt = layers.iter().map(|l| l.a.dims()[0]).sum();
        let target_bgt = config.target_r * layers.len();
        Ok(Self { config: config.clone(), total_step, layers, init_bgt, target_bgt, ema: HashMap::new(), rank_pattern: None, last: None })
    }

    /// PEFT's `budget_schedule(step)`: (budget, whether this step masks).
    pub fn budget_schedule(&self, step: usize) -> (usize, bool) {
        let c = &self.config;
        let end = self.total_step - c.tfinal;
        if step <= c.tinit {
            (self.init_bgt, false)
        } else if step > end {
            (self.target_bgt, true)
        } else {
            let mul = 1.0 - (step - c.tinit) as f64 / (end - c.tinit) as f64;
            let budget = ((self.init_bgt - self.target_bgt) as f64 * mul.powi(3) + self.target_bgt as f64) as usize;
            (budget, step.is_multiple_of(c.delta_t.max(1)))
        }
    }

    fn update_ipt(&mut self, grads: &HashMap<String, Tensor>) -> Result<()> {
        let (b1, b2) = (self.config.beta1, self.config.beta2);
        for l in &self.layers {
            for (suffix, var) in [("lora_A", &l.a), ("lora_B", &l.b), ("lora_E", &l.e)] {
                let name = format!("{}.{suffix}", l.prefix);
                let Some(g) = grads.get(&name) else { continue };
                let ipt = (var.as_tensor() * g)?.abs()?;
                let ema = match self.ema.remove(&name) {
                    Some(e) => e,
                    None => Ema { ipt: ipt.zeros_like()?, unc: ipt.zeros_like()? },
                };
                let avg = ((ema.ipt * b1)? + (&ipt * (1.0 - b1))?)?;
                let unc = ((ema.unc * b2)? + ((&ipt - &avg)?.abs()? * (1.0 - b2))?)?;
                self.ema.insert(name, Ema { ipt: avg, unc });
            }
        }
        Ok(())
    }

    fn score(&self, name: &str) -> Result<Option<Tensor>> {
        Ok(match self.ema.get(name) {
            Some(e) => Some((&e.ipt * &e.unc)?),
            None => None,
        })
    }

    /// PEFT's `mask_to_budget`: zero the least important E entries; returns the kept pattern.
    fn mask_to_budget(&mut self, budget: usize) -> Result<Vec<Vec<bool>>> {
        let mut triplets = Vec::new();
        for l in &self.layers {
            let r = l.e.dims()[0];
            let mut s = Tensor::zeros(r, DType::F32, l.e.device())?;
            if let Some(t) = self.score(&format!("{}.lora_E", l.prefix))? {
                s = (s + t.flatten_all()?)?;
            }
            if let Some(t) = self.score(&format!("{}.lora_A", l.prefix))? {
                s = (s + t.mean(1)?)?;
            }
            if let Some(t) = self.score(&format!("{}.lora_B", l.prefix))? {
                s = (s + t.mean(0)?)?;
            }
            triplets.push(s.to_vec1::<f32>()?);
        }
        let k = self.init_bgt.saturating_sub(budget);
        let threshold = if k == 0 {
            f32::NEG_INFINITY
        } else {
            let mut all: Vec<f32> = triplets.iter().flatten().copied().collect();
            all.sort_by(f32::total_cmp);
            all[k - 1]
        };
        let pattern: Vec<Vec<bool>> = triplets.iter().map(|t| t.iter().map(|&v| v > threshold).collect()).collect();
        self.apply_pattern(&pattern)?;
        Ok(pattern)
    }

    fn apply_pattern(&self, pattern: &[Vec<bool>]) -> Result<()> {
        for (l, keep) in self.layers.iter().zip(pattern) {
            let m: Vec<f32> = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
            let m = Tensor::from_vec(m, (keep.len(), 1), &Device::Cpu)?.to_device(l.e.device())?;
            l.e.set(&(l.e.as_tensor() * m)?)?;
        }
        Ok(())
    }
}

impl StepHook for AdaLoraHook {
    fn regularizer(&self) -> Result<Option<Tensor>> {
        let w = self.config.orth_reg_weight;
        if w <= 0.0 {
            return Ok(None);
        }
        let mut sum: Option<Tensor> = None;
        let mut n = 0usize;
        for l in &self.layers {
            let a = l.a.as_tensor();
            let b = l.b.as_tensor();
            for cov in [a.matmul(&a.t()?)?, b.t()?.matmul(b)?] {
                let eye = Tensor::eye(cov.dim(0)?, DType::F32, cov.device())?;
                let fro = (cov - eye)?.sqr()?.sum_all()?.sqrt()?;
                sum = Some(match sum {
                    Some(s) => (s + fro)?,
                    None => fro,
                });
                n += 1;
            }
        }
        Ok(match sum {
            Some(s) => Some((s * (w / n as f64))?),
            None => None,
        })
    }

    /// `ema.<parameter>.ipt` / `.unc` (f32, the parameter's shape), `rank_pattern.<layer prefix>`
    /// (u8 [r], 1 = kept) once fixed, and `last` (u32 [budget, masked]).
    fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, e) in &self.ema {
            out.insert(format!("ema.{name}.ipt"), e.ipt.clone());
            out.insert(format!("ema.{name}.unc"), e.unc.clone());
        }
        if let Some(pattern) = &self.rank_pattern {
            for (l, keep) in self.layers.iter().zip(pattern) {
                let m: Vec<u8> = keep.iter().map(|&k| u8::from(k)).collect();
                out.insert(format!("rank_pattern.{}", l.prefix), Tensor::from_vec(m, keep.len(), &Device::Cpu)?);
            }
        }
        if let Some((budget, masked)) = self.last {
            out.insert("last".to_string(), Tensor::new(&[budget as u32, u32::from(masked)], &Device::Cpu)?);
        }
        Ok(out)
    }

    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.ema.clear();
        for l in &self.layers {
            for (suffix, var) in [("lora_A", &l.a), ("lora_B", &l.b), ("lora_E", &l.e)] {
                let name = format!("{}.{suffix}", l.prefix);
                let (Some(ipt), Some(unc)) = (tensors.get(&format!("ema.{name}.ipt")), tensors.get(&format!("ema.{name}.unc"))) else {
                    continue;
                };
                if ipt.dims() != var.dims() || unc.dims() != var.dims() {
                    return Err(Error::Adapter(format!("AdaLoRA checkpoint: the averages of `{name}` do not have its shape {:?}", var.dims())));
                }
                let load = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(var.device())?) };
                self.ema.insert(name, Ema { ipt: load(ipt)?, unc: load(unc)? });
            }
        }
        let mut pattern = Vec::new();
        for l in &self.layers {
            match tensors.get(&format!("rank_pattern.{}", l.prefix)) {
                Some(t) => pattern.push(t.to_dtype(DType::U8)?.to_vec1::<u8>()?.into_iter().map(|k| k != 0).collect::<Vec<bool>>()),
                None => break,
            }
        }
        self.rank_pattern = match pattern.len() {
            0 => None,
            n if n == self.layers.len() => Some(pattern),
            n => return Err(Error::Adapter(format!("AdaLoRA checkpoint: a rank pattern for {n} of {} layers", self.layers.len()))),
        };
        self.last = match tensors.get("last") {
            Some(t) => {
                let v = t.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                Some((v[0] as usize, v.get(1).is_some_and(|&m| m != 0)))
            }
            None => None,
        };
        Ok(())
    }

    fn after_update(&mut self, step: usize, grads: &HashMap<String, Tensor>) -> Result<()> {
        let end = self.total_step - self.config.tfinal;
        if step < end {
            self.update_ipt(grads)?;
            let (budget, mask) = self.budget_schedule(step);
            if mask {
                self.mask_to_budget(budget)?;
            }
            self.last = Some((budget, mask));
        } else if step == end {
            let pattern = self.mask_to_budget(self.target_bgt)?;
            self.rank_pattern = Some(pattern);
            self.ema.clear();
            self.last = Some((self.target_bgt, true));
        } else if let Some(p) = &self.rank_pattern {
            self.apply_pattern(p)?;
            self.last = Some((self.target_bgt, true));
        }
        Ok(())
    }
}

/// Row `i` of `E` as kept or not (nonzero), per layer, in module order: for tests and reports.
pub fn kept_ranks(model: &Llama) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for (_, lin) in model.named_linears() {
        if let Some(l) = lin.adapter().and_then(|a| a.as_any()).and_then(|a| a.downcast_ref::<AdaLoraLinear>()) {
            let e: Vec<f32> = l.e.as_tensor().flatten_all()?.to_vec1()?;
            out.push(e.iter().filter(|&&v| v != 0.0).count());
        }
    }
    Ok(out)
}


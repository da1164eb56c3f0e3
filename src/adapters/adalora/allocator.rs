//! AdaLoRA's rank allocator (PEFT's `RankAllocator`) and orthogonal regulariser, run around each step.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use crate::model::Llama;
use crate::adapters::StepHook;
use crate::{Error, Result};
use super::{AdaLoraConfig, AdaLoraLinear};

/// One AdaLoRA layer's parameters, as the allocator sees them.
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


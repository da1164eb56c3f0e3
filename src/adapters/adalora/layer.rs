//! AdaLoRA's layer: `P Λ Q` with the rank mask in Λ.

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng};

use crate::ops::dropout::Dropout;
use crate::ops;
use crate::ops::nn::matmul_t;
use crate::model::{FrozenLinear, LinearAdapter};
use crate::Result;
use super::AdaLoraConfig;

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


//! The linear probe, the vision methods' baseline: a frozen backbone's CLS features, standardised
//! by the training images' mean and deviation, and a softmax classifier `p = softmax(f W + b)`
//! trained on them by AdamW over the whole training set at each step (cross-entropy, weight
//! decay on W); the step kept is the one with the best validation accuracy (the first on ties),
//! and the test accuracy is that classifier's.

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::Optimizer;

use crate::data::images::ImageSet;
use crate::error::{Error, Result};
use crate::model::vit::Vit;

#[derive(Debug, Clone)]
pub struct ProbeConfig {
    pub steps: usize,
    pub lr: f64,
    pub weight_decay: f64,
    /// Validation every this many steps.
    pub eval_every: usize,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self { steps: 500, lr: 1e-3, weight_decay: 1e-4, eval_every: 10 }
    }
}

/// The trained classifier and where it was chosen.
#[derive(Debug, Clone)]
pub struct Probe {
    pub weight: Tensor,
    pub bias: Tensor,
    pub mean: Tensor,
    pub std: Tensor,
    pub step: usize,
    pub val_accuracy: f64,
}

/// The CLS features of a set's images resized to `size`, `batch` images at a time: [n, hidden].
pub fn features(vit: &Vit, set: &ImageSet, size: usize, batch: usize) -> Result<Tensor> {
    let mut parts = Vec::new();
    for start in (0..set.len()).step_by(batch.max(1)) {
        let indices: Vec<usize> = (start..(start + batch.max(1)).min(set.len())).collect();
        let x = set.select(&indices).backbone_input(size, &Device::Cpu)?;
        parts.push(vit.cls_features(&x)?);
    }
    if parts.is_empty() {
        return Err(Error::msg("no images to take features of"));
    }
    Ok(Tensor::cat(&parts, 0)?)
}

fn labels(y: &[u8]) -> Result<Tensor> {
    Ok(Tensor::from_vec(y.iter().map(|&l| l as u32).collect::<Vec<_>>(), y.len(), &Device::Cpu)?)
}

impl Probe {
    /// Train on (`train`, `train_y`), choosing the step by (`val`, `val_y`); `classes` outputs.
    pub fn train(train: &Tensor, train_y: &[u8], val: &Tensor, val_y: &[u8], classes: usize, cfg: &ProbeConfig) -> Result<Probe> {
        let (n, hidden) = train.dims2()?;
        if n != train_y.len() || val.dim(0)? != val_y.len() || n == 0 || val_y.is_empty() {
            return Err(Error::msg(format!("linear probe: {n} training features for {} labels, {} validation features for {} labels", train_y.len(), val.dim(0)?, val_y.len())));
        }
        if let Some(&bad) = train_y.iter().chain(val_y).find(|&&l| l as usize >= classes) {
            return Err(Error::msg(format!("linear probe: label {bad} with {classes} classes")));
        }
        let mean = train.mean_keepdim(0)?;
        let std = (train.broadcast_sub(&mean)?.sqr()?.mean_keepdim(0)? + 1e-6)?.sqrt()?;
        let standard = |f: &Tensor| -> Result<Tensor> { Ok(f.broadcast_sub(&mean)?.broadcast_div(&std)?) };
        let (x, xv, y) = (standard(train)?, standard(val)?, labels(train_y)?);
        let w = Var::zeros((hidden, classes), DType::F32, &Device::Cpu)?;
        let b = Var::zeros(classes, DType::F32, &Device::Cpu)?;
        let params = candle_nn::ParamsAdamW { lr: cfg.lr, weight_decay: cfg.weight_decay, ..Default::default() };
        let mut opt = candle_nn::AdamW::new(vec![w.clone(), b.clone()], params)?;
        let mut best: Option<Probe> = None;
        for step in 0..=cfg.steps {
            if step % cfg.eval_every.max(1) == 0 || step == cfg.steps {
                let acc = accuracy_of(&xv, val_y, w.as_tensor(), b.as_tensor())?;
                if best.as_ref().is_none_or(|p| acc > p.val_accuracy) {
                    best = Some(Probe { weight: w.as_tensor().copy()?, bias: b.as_tensor().copy()?, mean: mean.clone(), std: std.clone(), step, val_accuracy: acc });
                }
            }
            if step == cfg.steps {
                break;
            }
            let logits = x.matmul(w.as_tensor())?.broadcast_add(b.as_tensor())?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            opt.backward_step(&loss)?;
        }
        best.ok_or_else(|| Error::msg("linear probe: no step was evaluated"))
    }

    /// Accuracy on raw (not standardised) features.
    pub fn accuracy(&self, features: &Tensor, y: &[u8]) -> Result<f64> {
        let f = features.broadcast_sub(&self.mean)?.broadcast_div(&self.std)?;
        accuracy_of(&f, y, &self.weight, &self.bias)
    }
}

fn accuracy_of(f: &Tensor, y: &[u8], w: &Tensor, b: &Tensor) -> Result<f64> {
    let predicted: Vec<u32> = f.matmul(w)?.broadcast_add(b)?.argmax(D::Minus1)?.to_vec1()?;
    let right = predicted.iter().zip(y).filter(|(p, &l)| **p == l as u32).count();
    Ok(right as f64 / y.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three classes of 4-d features around three distinct centres: the probe separates them.
    #[test]
    fn separates_separable_classes_and_checks_its_input() {
        let centres = [[3.0f32, 0.0, 0.0, 1.0], [0.0, 3.0, 0.0, 1.0], [0.0, 0.0, 3.0, 1.0]];
        let make = |n: usize, seed: u64| -> (Tensor, Vec<u8>) {
            let noise: Vec<f32> = Tensor::randn(0f32, 0.5, (n, 4), &Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let y: Vec<u8> = (0..n).map(|i| ((i as u64 + seed) % 3) as u8).collect();
            let f: Vec<f32> = (0..n * 4).map(|k| centres[y[k / 4] as usize][k % 4] + noise[k]).collect();
            (Tensor::from_vec(f, (n, 4), &Device::Cpu).unwrap(), y)
        };
        let ((train, ty), (val, vy), (test, sy)) = (make(60, 0), make(30, 1), make(30, 2));
        let probe = Probe::train(&train, &ty, &val, &vy, 3, &ProbeConfig { steps: 200, lr: 0.05, ..Default::default() }).unwrap();
        assert!(probe.val_accuracy >= 0.9 && probe.accuracy(&test, &sy).unwrap() >= 0.9, "{} {}", probe.val_accuracy, probe.accuracy(&test, &sy).unwrap());
        // At step 0 (W = 0) every prediction is class 0: a third right.
        let untrained = Probe::train(&train, &ty, &val, &vy, 3, &ProbeConfig { steps: 0, ..Default::default() }).unwrap();
        assert!((untrained.val_accuracy - 1.0 / 3.0).abs() < 1e-9);
        assert!(Probe::train(&train, &ty[..10], &val, &vy, 3, &ProbeConfig::default()).unwrap_err().to_string().contains("60 training features for 10 labels"));
        assert!(Probe::train(&train, &ty, &val, &vy, 2, &ProbeConfig::default()).unwrap_err().to_string().contains("label 2 with 2 classes"));
    }
}

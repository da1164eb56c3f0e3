//! Fine-tuning a frozen ViT for image classification with a per-linear method (LoRA and its
//! family, IA3, SNELL) injected into the backbone's linear layers by their Hugging Face module
//! paths (`encoder.layer.N.attention.attention.query`...), or Parallel / Double Control's
//! controls across its blocks (seed 001's ViT experiment), or the nonlinear controller across
//! each MLP (seed 000's), a linear head on the CLS feature, `p = softmax(cls(x) W + b)`, and
//! cross-entropy; or SynQT's side network beside the frozen backbone (seed 004) under the head.
//! AdamW on the adapters and the head, the learning rate warmed up linearly over the first tenth
//! of the steps, then cosine-decayed to a hundredth of its peak (the seeds' VTAB-1k recipe: AdamW, cosine, lr 1e-3, no augmentation,
//! images resized directly). After each epoch the validation accuracy chooses the epoch whose
//! test accuracy is reported (the probe's protocol, `eval::linear_probe`).

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var, D};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use super::optim::{AdamW, AdamWConfig};
use crate::adapters::{AdapterConfig, Synqt, SynqtConfig};
use crate::error::{Error, Result};
use crate::model::vit::Vit;

#[derive(Debug, Clone)]
pub struct VisionConfig {
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
}

impl Default for VisionConfig {
    fn default() -> Self {
        Self { epochs: 10, batch: 32, lr: 1e-3, weight_decay: 1e-4, seed: 0 }
    }
}

/// Images already resized and normalised for the backbone, [n, 3, size, size], with labels.
pub struct Images {
    pub x: Tensor,
    pub labels: Vec<u8>,
}

impl Images {
    /// A set's images as the backbone's input at `size` (`ImageSet::backbone_input`), on the CPU.
    pub fn of(set: &crate::data::images::ImageSet, size: usize) -> Result<Self> {
        Ok(Self { x: set.backbone_input(size, &candle_core::Device::Cpu)?, labels: set.labels.clone() })
    }

    fn len(&self) -> usize {
        self.labels.len()
    }

    fn batch(&self, indices: &[usize]) -> Result<(Tensor, Tensor)> {
        let idx = Tensor::from_vec(indices.iter().map(|&i| i as u32).collect::<Vec<_>>(), indices.len(), self.x.device())?;
        let y: Vec<u32> = indices.iter().map(|&i| self.labels[i] as u32).collect();
        Ok((self.x.index_select(&idx, 0)?, Tensor::from_vec(y, indices.len(), self.x.device())?))
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EpochStats {
    pub epoch: usize,
    pub train_loss: f64,
    pub val_accuracy: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct VisionReport {
    pub trainable_params: usize,
    pub adapted_modules: usize,
    /// The epoch chosen by validation (1-based).
    pub epoch: usize,
    pub val_accuracy: f64,
    pub test_accuracy: f64,
    pub epochs: Vec<EpochStats>,
    /// Mean seconds of an optimizer step.
    pub step_seconds: f64,
}

/// The linear head, W [classes, hidden] as PyTorch's `nn.Linear` keeps it, saved beside the
/// adapters as `classifier.weight` / `classifier.bias` (PEFT's place for a head trained with the
/// adapter), on the CLS feature, or on SynQT's combined features when the method is SynQT.
#[derive(Clone)]
pub struct Head {
    pub weight: Var,
    pub bias: Var,
    pub synqt: Option<Synqt>,
}

impl Head {
    pub fn zeros(hidden: usize, classes: usize, device: &candle_core::Device) -> Result<Self> {
        Ok(Self { weight: Var::zeros((classes, hidden), DType::F32, device)?, bias: Var::zeros(classes, DType::F32, device)?, synqt: None })
    }

    /// The head's parameters (SynQT's too) by their keys in the adapter's file.
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut params = vec![("base_model.model.classifier.weight".into(), self.weight.clone()), ("base_model.model.classifier.bias".into(), self.bias.clone())];
        params.extend(self.synqt.iter().flat_map(Synqt::params));
        params
    }

    fn logits(&self, vit: &Vit, x: &Tensor, train: bool) -> Result<Tensor> {
        let features = match &self.synqt {
            Some(synqt) => synqt.features(vit, x)?,
            None => vit.cls(x, train)?,
        };
        Ok(features.matmul(&self.weight.as_tensor().t()?)?.broadcast_add(self.bias.as_tensor())?)
    }
}

/// The share of `set` the backbone with its adapters and `head` classifies right.
pub fn accuracy(vit: &Vit, head: &Head, set: &Images, batch: usize) -> Result<f64> {
    let mut right = 0;
    let all: Vec<usize> = (0..set.len()).collect();
    for chunk in all.chunks(batch.max(1)) {
        let (x, _) = set.batch(chunk)?;
        let predicted: Vec<u32> = head.logits(vit, &x, false)?.argmax(D::Minus1)?.to_vec1()?;
        right += predicted.iter().zip(chunk).filter(|(p, &i)| **p == set.labels[i] as u32).count();
    }
    Ok(right as f64 / set.len().max(1) as f64)
}

/// The methods this loop trains: per-linear, their training AdamW on their parameters alone.
pub fn check_method(method: &AdapterConfig) -> Result<()> {
    // AdaLoRA's and SIFT's step hooks, GaLore's projection and EVA's initialisation from data
    // are LLaMA's training loop's, not this one's.
    if matches!(method.peft_type(), "LORA" | "IA3" | "SNELL" | "CONTROL" | "NONLINEAR_CONTROL" | "SYNQT") && method.init_batches() == 0 {
        return Ok(());
    }
    Err(Error::Adapter(format!("{} (with its options) does not train on the ViT yet: LoRA and its variants, IA3, SNELL, Parallel / Double Control, nonlinear Control and SynQT do", method.peft_type())))
}

/// Attach `method` to `vit` and make the classifier of `classes` outputs (zero; SynQT's side
/// network drawn from `rng`). Returns the head and how many modules were adapted (SynQT: the
/// blocks it runs beside).
fn attach(vit: &mut Vit, method: &AdapterConfig, classes: usize, rng: &mut StdRng) -> Result<(Head, usize)> {
    check_method(method)?;
    let mut head = Head::zeros(vit.config.hidden, classes, vit.patch_weight.device())?;
    if let Some(synqt) = method.downcast_ref::<SynqtConfig>() {
        let network = Synqt::new(vit, synqt, rng)?;
        let blocks = network.blocks();
        head.synqt = Some(network);
        return Ok((head, blocks));
    }
    let adapted = inject(vit, method, rng)?;
    Ok((head, adapted))
}

/// Attach `method` to the ViT: a per-linear method on the layers it targets; Parallel / Double
/// Control's controls across every block's MLP (and attention), with its LoRA on its targets;
/// the nonlinear controller across every block's MLP. Returns how many modules were adapted.
fn inject(vit: &mut Vit, method: &AdapterConfig, rng: &mut StdRng) -> Result<usize> {
    use crate::adapters::method::inject_named;
    let (hidden, device) = (vit.config.hidden, vit.patch_weight.device().clone());
    if let Some(nonlinear) = method.downcast_ref::<crate::adapters::NonlinearControlConfig>() {
        return crate::adapters::nonlinear_control::attach_to(vit.control_slots(), hidden, &device, nonlinear, rng);
    }
    let Some(control) = method.downcast_ref::<crate::adapters::ControlConfig>() else {
        return inject_named(&**method, vit.named_linears_mut(), rng);
    };
    let controls = crate::adapters::control::attach_to(vit.control_slots(), hidden, &device, control, rng)?;
    match &control.lora {
        Some(lora) => Ok(controls + inject_named(lora, vit.named_linears_mut(), rng)?),
        None => Ok(controls),
    }
}

/// Save the adapters on `vit` and `head` as PEFT keeps an adapter (`adapters::files`).
pub fn save(vit: &Vit, head: &Head, method: &AdapterConfig, dir: &std::path::Path) -> Result<()> {
    let mut params = vit.trainable_params();
    params.extend(head.params());
    let tensors = crate::adapters::files::named_adapter_tensors(params, vit.named_linears())?;
    crate::adapters::files::save_tensors(&tensors, method, dir, None)
}

/// Attach a saved adapter and its head to `vit`: injected by its config, every tensor read back.
pub fn load(vit: &mut Vit, dir: &std::path::Path) -> Result<(AdapterConfig, Head)> {
    let source = crate::hub::ModelSource::Dir(dir.to_path_buf());
    let method = crate::adapters::files::read_adapter_config(&source)?;
    let weights = crate::weights::Weights::from_safetensors(&[source.file("adapter_model.safetensors")?])?;
    let key = "base_model.model.classifier.weight";
    let classes = weights.get_any(key, DType::F32, &candle_core::Device::Cpu)?.dims2()?.0;
    let (head, _) = attach(vit, &method, classes, &mut StdRng::seed_from_u64(0))?;
    let mut params = vit.trainable_params();
    params.extend(head.params());
    crate::adapters::files::load_named_adapter_tensors(params, vit.named_linears(), &weights)?;
    Ok((method, head))
}

/// The learning rate of step `step` of `total`: linear warmup over the first tenth, then a
/// cosine from `peak` to `peak / 100`.
pub fn warmup_cosine(step: usize, total: usize, peak: f64) -> f64 {
    let warmup = (total / 10).max(1);
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
    let floor = peak / 100.0;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

/// The method's adapters on a ViT, a new head and AdamW on both: one optimizer step at a time.
pub struct Trainer {
    pub head: Head,
    /// The adapters' and the head's parameters by their keys in the adapter's file.
    pub params: Vec<(String, Var)>,
    pub optimizer: AdamW,
    pub adapted_modules: usize,
}

impl Trainer {
    /// Inject `method` into `vit` (seeded by `rng`) and add a zero head of `classes` outputs.
    pub fn new(vit: &mut Vit, method: &AdapterConfig, classes: usize, cfg: &VisionConfig, rng: &mut StdRng) -> Result<Self> {
        let (head, adapted_modules) = attach(vit, method, classes, rng)?;
        let mut params = vit.trainable_params();
        params.extend(head.params());
        let with_scale = params.iter().map(|(k, v)| (k.clone(), v.clone(), 1.0)).collect();
        let optimizer = AdamW::new(with_scale, AdamWConfig { lr: cfg.lr, weight_decay: cfg.weight_decay, ..Default::default() })?;
        Ok(Self { head, params, optimizer, adapted_modules })
    }

    pub fn trainable_params(&self) -> usize {
        self.params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// One step on images x [b, 3, H, W] with labels y [b] at learning rate `lr`; returns the
    /// batch's mean cross-entropy before the step.
    pub fn step(&mut self, vit: &Vit, x: &Tensor, y: &Tensor, lr: f64) -> Result<f64> {
        let loss = candle_nn::loss::cross_entropy(&self.head.logits(vit, x, true)?, y)?;
        let grads = super::step::backward_to_variables(&loss)?;
        let by_name: HashMap<String, Tensor> = self.params.iter().filter_map(|(name, var)| grads.get(var.as_tensor()).map(|g| (name.clone(), g.clone()))).collect();
        self.optimizer.step(&by_name, lr)?;
        Ok(loss.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }
}

/// Inject `method` into `vit` and train it with a new head on `train`, choosing the epoch by
/// `val` and reporting its accuracy on `test`; the adapters and the head are left as they were
/// after the chosen epoch. `on_epoch` sees each epoch's figures as they come.
pub fn finetune(
    vit: &mut Vit,
    method: &AdapterConfig,
    (train, val, test): (&Images, &Images, &Images),
    classes: usize,
    cfg: &VisionConfig,
    mut on_epoch: impl FnMut(&EpochStats),
) -> Result<(VisionReport, Head)> {
    if train.len() == 0 || val.len() == 0 || cfg.batch == 0 || cfg.epochs == 0 {
        return Err(Error::msg(format!("vision fine-tuning: {} training and {} validation images, batch {}, {} epochs: each must be positive", train.len(), val.len(), cfg.batch, cfg.epochs)));
    }
    if let Some(&bad) = train.labels.iter().chain(&val.labels).chain(&test.labels).find(|&&l| l as usize >= classes) {
        return Err(Error::msg(format!("vision fine-tuning: label {bad} with {classes} classes")));
    }
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut trainer = Trainer::new(vit, method, classes, cfg, &mut rng)?;
    let vit = &*vit;

    let steps_per_epoch = train.len().div_ceil(cfg.batch);
    let total = steps_per_epoch * cfg.epochs;
    let mut order: Vec<usize> = (0..train.len()).collect();
    let (mut epochs, mut step, mut step_seconds) = (Vec::new(), 0, 0.0);
    // The chosen epoch: its number, validation accuracy and parameters.
    let mut best: Option<(usize, f64, Vec<Tensor>)> = None;
    for epoch in 1..=cfg.epochs {
        let started = std::time::Instant::now();
        order.shuffle(&mut rng);
        let mut loss_sum = 0.0;
        for chunk in order.chunks(cfg.batch) {
            let (x, y) = train.batch(chunk)?;
            loss_sum += trainer.step(vit, &x, &y, warmup_cosine(step, total, cfg.lr))? * chunk.len() as f64;
            step += 1;
        }
        let seconds = started.elapsed().as_secs_f64();
        step_seconds += seconds;
        let val_accuracy = accuracy(vit, &trainer.head, val, cfg.batch)?;
        let stats = EpochStats { epoch, train_loss: loss_sum / train.len() as f64, val_accuracy, seconds };
        on_epoch(&stats);
        epochs.push(stats);
        if best.as_ref().is_none_or(|b| val_accuracy > b.1) {
            let values = trainer.params.iter().map(|(_, v)| v.as_tensor().copy()).collect::<candle_core::Result<Vec<_>>>()?;
            best = Some((epoch, val_accuracy, values));
        }
    }
    let (epoch, val_accuracy, values) = best.expect("at least one epoch ran");
    for ((_, var), value) in trainer.params.iter().zip(values) {
        var.set(&value)?;
    }
    // The test images are read once, by the chosen epoch's parameters.
    let test_accuracy = accuracy(vit, &trainer.head, test, cfg.batch)?;
    let (trainable_params, adapted_modules) = (trainer.trainable_params(), trainer.adapted_modules);
    let report = VisionReport { trainable_params, adapted_modules, epoch, val_accuracy, test_accuracy, epochs, step_seconds: step_seconds / total as f64 };
    Ok((report, trainer.head))
}

/// A tiny random ViT (8 wide, 2 blocks of 2 heads, 4 x 4 patches) for the tests.
#[cfg(test)]
pub(crate) fn tiny_vit(seed: u64, device: &candle_core::Device) -> Vit {
    let cfg = crate::model::vit::VitConfig { patch_size: 4, hidden: 8, depth: 2, heads: 2, mlp: 16, layer_norm_eps: 1e-6, layer_scale: true, pos_grid: 2 };
    Vit::random(cfg, seed, device).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::LoraConfig;
    use candle_core::Device;

    fn lora(targets: &[&str]) -> AdapterConfig {
        let target_modules = crate::adapters::Targets::List(targets.iter().map(|s| s.to_string()).collect());
        AdapterConfig::new(LoraConfig { r: 4, lora_alpha: 8.0, lora_dropout: 0.0, target_modules, use_rslora: false, use_dora: false })
    }

    /// Two classes told apart by the image's brightness under noise (attention without strong
    /// position embeddings cannot tell where a patch is, so the classes differ in content).
    fn bright_or_dark(n: usize, seed: u64) -> Images {
        use rand::Rng;
        let mut rng = StdRng::seed_from_u64(seed);
        let labels: Vec<u8> = (0..n).map(|i| (i % 2) as u8).collect();
        let x: Vec<f32> = labels.iter().flat_map(|&l| (0..3 * 64).map(move |_| if l == 0 { 0.4 } else { -0.4 })).map(|v| v + rng.random_range(-1.0f32..1.0)).collect();
        Images { x: Tensor::from_vec(x, (n, 3, 8, 8), &Device::Cpu).unwrap(), labels }
    }

    #[test]
    fn lora_on_the_vit_starts_at_the_backbone_and_learns_a_task() {
        let dev = Device::Cpu;
        let images = bright_or_dark(4, 9).x;
        let plain = tiny_vit(3, &dev).cls_features(&images).unwrap();
        let mut vit = tiny_vit(3, &dev);
        let (train, val, test) = (bright_or_dark(48, 1), bright_or_dark(16, 2), bright_or_dark(16, 3));
        let cfg = VisionConfig { epochs: 8, batch: 8, lr: 1e-2, weight_decay: 0.0, seed: 5 };
        let mut seen = Vec::new();
        let (report, head) = finetune(&mut vit, &lora(&["query", "value", "fc1"]), (&train, &val, &test), 2, &cfg, |e| seen.push(e.epoch)).unwrap();
        // 2 blocks x 3 targets, each r (in + out) parameters, plus the head.
        assert_eq!(report.adapted_modules, 6);
        assert_eq!(report.trainable_params, 4 * 4 * (8 + 8) + 2 * 4 * (8 + 16) + 8 * 2 + 2);
        assert_eq!(seen, (1..=8).collect::<Vec<_>>());
        assert!(report.epochs.last().unwrap().train_loss < 0.5 * std::f64::consts::LN_2, "{:?}", report.epochs);
        assert!(report.val_accuracy >= 0.9 && report.test_accuracy >= 0.9, "{report:?}");
        // LoRA's B starts at zero: before training the adapted backbone is the backbone. After,
        // the adapters moved it.
        let fresh = tiny_vit(3, &dev);
        let mut untrained = tiny_vit(3, &dev);
        crate::adapters::method::inject_named(&*lora(&["query"]), untrained.named_linears_mut(), &mut StdRng::seed_from_u64(0)).unwrap();
        let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff(&untrained.cls_features(&images).unwrap(), &plain), 0.0);
        assert_eq!(diff(&fresh.cls_features(&images).unwrap(), &plain), 0.0);
        assert!(diff(&vit.cls_features(&images).unwrap(), &plain) > 1e-3);
        // The chosen epoch's parameters are the ones left: they give the reported accuracy.
        assert_eq!(accuracy(&vit, &head, &test, 5).unwrap(), report.test_accuracy);

        // Saved and loaded into a fresh backbone: the same classifier.
        let dir = tempfile::tempdir().unwrap();
        let method = lora(&["query", "value", "fc1"]);
        save(&vit, &head, &method, &dir.path().join("adapter")).unwrap();
        let mut loaded = tiny_vit(3, &dev);
        let (method_back, head_back) = load(&mut loaded, &dir.path().join("adapter")).unwrap();
        assert!(method_back == method);
        let logits = |vit: &Vit, head: &Head| head.logits(vit, &test.x, false).unwrap();
        assert_eq!(diff(&logits(&loaded, &head_back), &logits(&vit, &head)), 0.0);
        // A saved adapter on a backbone of another width is an error naming the tensor.
        let mut narrow = tiny_vit(3, &dev);
        narrow.config.hidden = 16;
        assert!(load(&mut narrow, &dir.path().join("adapter")).is_err());
    }

    /// Double Control (controls across both blocks of each layer) and the nonlinear controller
    /// (across each MLP) learn the task and round-trip.
    #[test]
    fn the_controls_on_the_vit_learn_a_task_and_round_trip() {
        // 2 blocks x 2 controls x (A [4, 8] + B [8, 4]); 2 blocks x (down [4, 8] + 4, up [8, 4]
        // + 8); plus the head.
        let double = (["--method", "double_control", "--control-rank", "4", "--double-control-rank", "4"].as_slice(), 4, 2 * 2 * 64);
        let nonlinear = (["--method", "nonlinear_control", "--control-rank", "4"].as_slice(), 2, 2 * (36 + 40));
        for (args, modules, params) in [double, nonlinear] {
            control_learns_a_task_and_round_trips(args, modules, params + 8 * 2 + 2);
        }
        let mut vit = tiny_vit(3, &Device::Cpu);
        let stable = crate::adapters::flags::AdapterArgs::parse(["--method", "nonlinear_control", "--control-rank", "4", "--stable-mode"]).unwrap().to_config().unwrap();
        let err = inject(&mut vit, &stable, &mut StdRng::seed_from_u64(0)).unwrap_err().to_string();
        assert!(err.contains("stable mode"), "{err}");
    }

    fn control_learns_a_task_and_round_trips(args: &[&str], modules: usize, params: usize) {
        let dev = Device::Cpu;
        let mut vit = tiny_vit(3, &dev);
        let method = crate::adapters::flags::AdapterArgs::parse(args).unwrap().to_config().unwrap();
        let (train, val, test) = (bright_or_dark(48, 1), bright_or_dark(16, 2), bright_or_dark(16, 3));
        let cfg = VisionConfig { epochs: 8, batch: 8, lr: 1e-2, weight_decay: 0.0, seed: 5 };
        let (report, head) = finetune(&mut vit, &method, (&train, &val, &test), 2, &cfg, |_| ()).unwrap();
        assert_eq!((report.adapted_modules, report.trainable_params), (modules, params), "{args:?}");
        assert!(report.val_accuracy >= 0.9 && report.test_accuracy >= 0.9, "{report:?}");
        let dir = tempfile::tempdir().unwrap();
        save(&vit, &head, &method, dir.path()).unwrap();
        let mut loaded = tiny_vit(3, &dev);
        let (_, head_back) = load(&mut loaded, dir.path()).unwrap();
        let logits = |vit: &Vit, head: &Head| head.logits(vit, &test.x, false).unwrap();
        let diff = (logits(&loaded, &head_back) - logits(&vit, &head)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0);
        assert!(loaded.blocks.iter().all(|b| b.mlp_control.is_some()));
    }

    /// SynQT beside the frozen backbone learns the task, leaves the backbone's own features as
    /// they were, and round-trips with its head.
    #[test]
    fn synqt_on_the_vit_learns_a_task_and_round_trips() {
        let dev = Device::Cpu;
        let images = bright_or_dark(4, 9).x;
        let plain = tiny_vit(3, &dev).cls_features(&images).unwrap();
        let mut vit = tiny_vit(3, &dev);
        let args = ["--method", "synqt", "--synqt-tokens", "2", "--synqt-adapter-width", "4", "--synqt-attention-width", "2"];
        let method = crate::adapters::flags::AdapterArgs::parse(args).unwrap().to_config().unwrap();
        let (train, val, test) = (bright_or_dark(48, 1), bright_or_dark(16, 2), bright_or_dark(16, 3));
        let cfg = VisionConfig { epochs: 8, batch: 8, lr: 1e-2, weight_decay: 0.0, seed: 5 };
        let (report, head) = finetune(&mut vit, &method, (&train, &val, &test), 2, &cfg, |_| ()).unwrap();
        // Per block: tokens [2, 8], three adapters of width 4 (prompt_ffn, ffn: 2 x 8 x 4 + 4 + 8
        // each), four of width 2 (2 x 8 x 2 + 2 + 8), four norms, two scales. The head: its
        // norm and adapter, the weigher [6, 8] + 6, the head's norm, the classifier.
        let adapter = |n: usize| 2 * 8 * n + n + 8;
        let block = 2 * 8 + 2 * adapter(4) + 4 * adapter(2) + 4 * 16 + 2;
        assert_eq!((report.adapted_modules, report.trainable_params), (2, 2 * block + 16 + adapter(4) + 6 * 8 + 6 + 16 + 8 * 2 + 2));
        assert!(report.val_accuracy >= 0.9 && report.test_accuracy >= 0.9, "{report:?}");
        let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff(&vit.cls_features(&images).unwrap(), &plain), 0.0);
        let dir = tempfile::tempdir().unwrap();
        save(&vit, &head, &method, dir.path()).unwrap();
        let mut loaded = tiny_vit(3, &dev);
        let (method_back, head_back) = load(&mut loaded, dir.path()).unwrap();
        assert!(method_back == method);
        let logits = |vit: &Vit, head: &Head| head.logits(vit, &test.x, false).unwrap();
        assert_eq!(diff(&logits(&loaded, &head_back), &logits(&vit, &head)), 0.0);
        // SynQT does not attach to LLaMA.
        let mut llama = crate::model::Llama::random(crate::model::LlamaConfig::tiny(32), 0, DType::F32, &dev).unwrap();
        assert!(method.inject(&mut llama, &mut StdRng::seed_from_u64(0)).unwrap_err().to_string().contains("does not attach to LLaMA"));
    }

    /// The gradient of the loss in LoRA's B of the first block's query, by autograd through the
    /// whole ViT (attention, LayerNorm, GELU, LayerScale), against central differences.
    #[test]
    fn gradients_through_the_vit_match_finite_differences() {
        let dev = Device::Cpu;
        let mut vit = tiny_vit(4, &dev);
        crate::adapters::method::inject_named(&*lora(&["query", "fc2"]), vit.named_linears_mut(), &mut StdRng::seed_from_u64(1)).unwrap();
        let (x, y) = bright_or_dark(3, 4).batch(&[0, 1, 2]).unwrap();
        let head = Tensor::from_vec((0..16).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.3).collect::<Vec<_>>(), (8, 2), &dev).unwrap();
        let loss = |vit: &Vit, train: bool| -> Tensor { candle_nn::loss::cross_entropy(&vit.cls(&x, train).unwrap().matmul(&head).unwrap(), &y).unwrap() };
        let var_of = |vit: &mut Vit, path: &str, which: &str| -> Var {
            let (_, linear) = vit.named_linears_mut().into_iter().find(|(p, _)| p == path).unwrap();
            linear.adapter().unwrap().params().into_iter().find(|(n, _)| n.starts_with(which)).unwrap().1
        };
        for (path, which) in [("encoder.layer.0.attention.attention.query", "lora_B"), ("encoder.layer.1.mlp.fc2", "lora_A")] {
            let var = var_of(&mut vit, path, which);
            // B = 0 would leave A's gradient 0: give B values first.
            let b = var_of(&mut vit, path, "lora_B");
            b.set(&Tensor::full(0.05f32, b.shape(), &dev).unwrap()).unwrap();
            let grads = loss(&vit, true).backward().unwrap();
            let analytic: Vec<f32> = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for k in [0, base.len() / 2, base.len() - 1] {
                let eps = 1e-2f32;
                let at = |delta: f32| -> f64 {
                    let mut v = base.clone();
                    v[k] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &dev).unwrap()).unwrap();
                    loss(&vit, false).to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
                };
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &dev).unwrap()).unwrap();
                let err = (numeric - analytic[k] as f64).abs();
                assert!(err < 2e-3 + 2e-2 * numeric.abs(), "{path} {which}[{k}]: autograd {} against {numeric}", analytic[k]);
            }
        }
    }

    #[test]
    fn the_schedule_warms_up_then_decays_to_a_hundredth() {
        let lr = |s| warmup_cosine(s, 100, 1e-3);
        assert!((lr(0) - 1e-4).abs() < 1e-12 && (lr(9) - 1e-3).abs() < 1e-12);
        assert!((lr(10) - 1e-3).abs() < 1e-12 && lr(55) < lr(20) && (lr(100) - 1e-5).abs() < 1e-12);
    }

    #[test]
    fn bad_input_is_a_clear_error() {
        let dev = Device::Cpu;
        let mut vit = tiny_vit(3, &dev);
        let (train, val) = (bright_or_dark(4, 1), bright_or_dark(4, 2));
        let err = finetune(&mut vit, &lora(&["query"]), (&train, &val, &val), 1, &VisionConfig::default(), |_| ()).err().unwrap().to_string();
        assert!(err.contains("label 1 with 1 classes"), "{err}");
        let err = finetune(&mut vit, &lora(&["q_proj"]), (&train, &val, &val), 2, &VisionConfig::default(), |_| ()).err().unwrap().to_string();
        assert!(err.contains("matched no module"), "{err}");
        let adalora = crate::adapters::flags::AdapterArgs::parse(["--method", "adalora", "--target-modules", "query"]).unwrap().to_config().unwrap();
        let err = finetune(&mut vit, &adalora, (&train, &val, &val), 2, &VisionConfig::default(), |_| ()).err().unwrap().to_string();
        assert!(err.contains("ADALORA") && err.contains("does not train on the ViT"), "{err}");
        let cfg = VisionConfig { batch: 0, ..Default::default() };
        assert!(finetune(&mut vit, &lora(&["query"]), (&train, &val, &val), 2, &cfg, |_| ()).err().unwrap().to_string().contains("batch 0"));
    }
}

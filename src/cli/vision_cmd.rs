//! The vision commands, on an image classification task in IDX files sampled VTAB-1k style
//! (`data::images`): `probe`, the linear probe of a frozen backbone (`eval::linear_probe`), and
//! `vision-finetune`, a method's adapters on the backbone with a linear head
//! (`training::vision`).

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use crate::data::images::{vtab_sample, ImageSet};
use crate::error::{Error, Result};
use crate::eval::linear_probe::{features, Probe, ProbeConfig};

/// The task and backbone every vision command takes.
#[derive(Args, Debug, Clone)]
pub struct VisionTaskArgs {
    /// The backbone: an ONNX export of Hugging Face's Dinov2Model (scripts/fetch_assets.sh dinov2).
    #[arg(long)]
    pub backbone: PathBuf,
    /// The module path of the backbone inside the ONNX graph.
    #[arg(long, default_value = "backbone")]
    pub prefix: String,
    /// A folder with train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and
    /// t10k-labels-idx1-ubyte (each may end in .gz): Fashion-MNIST's or MNIST's layout.
    #[arg(long)]
    pub data: PathBuf,
    /// Training images drawn from the training split.
    #[arg(long, default_value_t = 800)]
    pub train: usize,
    /// Validation images drawn from the training split (they choose the probe's step, the
    /// fine-tuning's epoch).
    #[arg(long, default_value_t = 200)]
    pub val: usize,
    /// Test images: the first N of the test split (default: all of it).
    #[arg(long)]
    pub test: Option<usize>,
    /// The sample's seed (and the fine-tuning's).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images resized to this side (the backbone's input; a multiple of its patch size).
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    /// Write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Replace the `--json` file when it exists (refused otherwise).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub overwrite: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub task: VisionTaskArgs,
    #[arg(long, default_value_t = 500)]
    pub steps: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
}

#[derive(Args, Debug, Clone)]
pub struct VisionFinetuneArgs {
    #[command(flatten)]
    pub task: VisionTaskArgs,
    /// The method and its flags (`--method lora --r 8 --target-modules query,value`); the
    /// targets are the backbone's module paths as Hugging Face's Dinov2Model names them
    /// (`query`, `key`, `value`, `dense` (the attention's output), `fc1`, `fc2`).
    #[command(flatten)]
    pub adapter: crate::adapters::flags::AdapterArgs,
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    /// Save the chosen epoch's adapter and head here, as PEFT keeps an adapter
    /// (`adapter_config.json`, `adapter_model.safetensors` with `classifier.*`); an existing
    /// adapter there is replaced only with `--overwrite`.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct VisionEvalArgs {
    #[command(flatten)]
    pub task: VisionTaskArgs,
    /// An adapter saved by `vision-finetune --output`.
    #[arg(long)]
    pub adapter: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub train: usize,
    pub val: usize,
    pub test: usize,
    pub seed: u64,
    pub step: usize,
    pub val_accuracy: f64,
    pub test_accuracy: f64,
    pub feature_seconds: f64,
}

/// The split's IDX pair in `dir`, gzipped or not.
fn split(dir: &std::path::Path, prefix: &str) -> Result<ImageSet> {
    let find = |name: &str| -> Result<PathBuf> {
        [dir.join(name), dir.join(format!("{name}.gz"))].into_iter().find(|p| p.exists()).ok_or_else(|| Error::msg(format!("--data {}: no {name} (nor {name}.gz)", dir.display())))
    };
    ImageSet::read_idx(&find(&format!("{prefix}-images-idx3-ubyte"))?, &find(&format!("{prefix}-labels-idx1-ubyte"))?)
}

/// The backbone and the task's three sets, sampled VTAB-1k style; the number of classes.
struct VisionTask {
    vit: crate::model::vit::Vit,
    train: ImageSet,
    val: ImageSet,
    test: ImageSet,
    classes: usize,
    /// The training split's images drawn for training and validation.
    sample: Sample,
}

/// Which images of the training split a run drew (in its report, so that an anchor can train on
/// the same ones: `bench/vision_anchor.py --sample`).
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
}

impl VisionTaskArgs {
    fn load(&self) -> Result<VisionTask> {
        crate::validate::int_in("train", self.train, 1, 1 << 24)?;
        crate::validate::int_in("val", self.val, 1, 1 << 24)?;
        let train_split = split(&self.data, "train")?;
        let (vit, test_split) = self.backbone_and_test()?;
        let (train_idx, val_idx) = vtab_sample(train_split.len(), self.train, self.val, self.seed)?;
        let classes = train_split.labels.iter().chain(&test_split.labels).map(|&l| l as usize + 1).max().unwrap_or(1);
        let (train, val) = (train_split.select(&train_idx), train_split.select(&val_idx));
        Ok(VisionTask { vit, train, val, test: test_split, classes, sample: Sample { train: train_idx, val: val_idx } })
    }

    /// The backbone and the test images (the first `--test` of the test split), the flags checked.
    fn backbone_and_test(&self) -> Result<(crate::model::vit::Vit, ImageSet)> {
        if let Some(path) = &self.json {
            crate::fsutil::refuse_to_replace(std::slice::from_ref(path), "--json", self.overwrite)?;
        }
        let config = crate::model::vit::VitConfig::dinov2_small();
        if self.image_size == 0 || !self.image_size.is_multiple_of(config.patch_size) {
            return Err(Error::msg(format!("--image-size {}: must be a positive multiple of the patch size {}", self.image_size, config.patch_size)));
        }
        let vit = crate::loading::onnx::load_dinov2(&self.backbone, &self.prefix, config)?;
        let test_split = split(&self.data, "t10k")?;
        let test_n = self.test.unwrap_or(test_split.len()).min(test_split.len());
        Ok((vit, test_split.select(&(0..test_n).collect::<Vec<_>>())))
    }
}

pub fn probe(args: &ProbeArgs) -> Result<ProbeReport> {
    crate::validate::int_in("steps", args.steps, 0, 1_000_000)?;
    let task = &args.task;
    let VisionTask { vit, train, val, test, classes, .. } = task.load()?;
    let started = std::time::Instant::now();
    let take = |set: &ImageSet| features(&vit, set, task.image_size, 16);
    let (train_f, val_f, test_f) = (take(&train)?, take(&val)?, take(&test)?);
    let feature_seconds = started.elapsed().as_secs_f64();
    let cfg = ProbeConfig { steps: args.steps, lr: args.lr, ..Default::default() };
    let probe = Probe::train(&train_f, &train.labels, &val_f, &val.labels, classes, &cfg)?;
    let test_accuracy = probe.accuracy(&test_f, &test.labels)?;
    let report = ProbeReport { train: task.train, val: task.val, test: test.len(), seed: task.seed, step: probe.step, val_accuracy: probe.val_accuracy, test_accuracy, feature_seconds };
    println!(
        "linear probe: {} train / {} val / {} test images, seed {}: validation {:.2}% (step {}), test {:.2}%; features of {} images in {:.0} s",
        report.train,
        report.val,
        report.test,
        report.seed,
        100.0 * report.val_accuracy,
        report.step,
        100.0 * report.test_accuracy,
        task.train + task.val + test.len(),
        feature_seconds
    );
    if let Some(path) = &task.json {
        super::bench_args::write_json(path, &report)?;
    }
    Ok(report)
}

#[derive(Debug, Clone, Serialize)]
pub struct VisionFinetuneReport {
    pub method: String,
    pub train: usize,
    pub val: usize,
    pub test: usize,
    pub seed: u64,
    pub image_size: usize,
    #[serde(flatten)]
    pub result: crate::training::vision::VisionReport,
    pub peak_rss_mib: f64,
    pub sample: Sample,
}

pub fn vision_finetune(args: &VisionFinetuneArgs) -> Result<VisionFinetuneReport> {
    use crate::training::vision::{finetune, Images, VisionConfig};
    crate::validate::int_in("epochs", args.epochs, 1, 100_000)?;
    crate::validate::int_in("batch", args.batch, 1, 1 << 16)?;
    let method = args.adapter.to_config()?;
    let task = &args.task;
    if let Some(dir) = &args.output {
        let files = ["adapter_config.json", "adapter_model.safetensors"].map(|f| dir.join(f));
        crate::fsutil::refuse_to_replace(&files, "--output", task.overwrite)?;
    }
    let VisionTask { mut vit, train, val, test, classes, sample } = task.load()?;
    let size = task.image_size;
    let (train_x, val_x, test_x) = (Images::of(&train, size)?, Images::of(&val, size)?, Images::of(&test, size)?);
    let cfg = VisionConfig { epochs: args.epochs, batch: args.batch, lr: args.lr, weight_decay: args.weight_decay, seed: task.seed };
    let (result, head) = finetune(&mut vit, &method, (&train_x, &val_x, &test_x), classes, &cfg, |e| {
        eprintln!("epoch {}: train loss {:.4}, validation {:.2}% ({:.0} s)", e.epoch, e.train_loss, 100.0 * e.val_accuracy, e.seconds);
    })?;
    let report = VisionFinetuneReport {
        method: args.adapter.method.clone(),
        train: task.train,
        val: task.val,
        test: test.len(),
        seed: task.seed,
        image_size: task.image_size,
        result,
        peak_rss_mib: crate::memory::proc_status_mib("VmHWM")?,
        sample,
    };
    println!(
        "{} on the backbone: {} train / {} val / {} test images at {} px, seed {}: validation {:.2}% (epoch {}), test {:.2}%; {} trainable parameters, {:.2} s a step, peak RSS {:.0} MiB",
        report.method,
        report.train,
        report.val,
        report.test,
        report.image_size,
        report.seed,
        100.0 * report.result.val_accuracy,
        report.result.epoch,
        100.0 * report.result.test_accuracy,
        report.result.trainable_params,
        report.result.step_seconds,
        report.peak_rss_mib
    );
    if let Some(dir) = &args.output {
        crate::training::vision::save(&vit, &head, &method, dir)?;
        eprintln!("saved the adapter of epoch {} to {}", report.result.epoch, dir.display());
    }
    if let Some(path) = &task.json {
        super::bench_args::write_json(path, &report)?;
    }
    Ok(report)
}

#[derive(Debug, Clone, Serialize)]
pub struct VisionEvalReport {
    pub method: String,
    pub test: usize,
    pub image_size: usize,
    pub test_accuracy: f64,
}

/// A saved vision adapter's accuracy on the task's test images.
pub fn vision_eval(args: &VisionEvalArgs) -> Result<VisionEvalReport> {
    use crate::training::vision::{accuracy, load, Images};
    let task = &args.task;
    // Only the test split is read: the adapter's head says how many classes there are.
    let (mut vit, test) = task.backbone_and_test()?;
    let (method, head) = load(&mut vit, &args.adapter)?;
    let head_classes = head.bias.elem_count();
    if let Some(&label) = test.labels.iter().find(|&&l| l as usize >= head_classes) {
        return Err(Error::msg(format!("--adapter {}: its head has {head_classes} classes, the test images a label {label}", args.adapter.display())));
    }
    let images = Images::of(&test, task.image_size)?;
    let report = VisionEvalReport { method: method.peft_type().to_string(), test: test.len(), image_size: task.image_size, test_accuracy: accuracy(&vit, &head, &images, 32)? };
    println!("{} adapter {}: test {:.2}% of {} images at {} px", report.method, args.adapter.display(), 100.0 * report.test_accuracy, report.test, report.image_size);
    if let Some(path) = &task.json {
        super::bench_args::write_json(path, &report)?;
    }
    Ok(report)
}

//! `probe`: the linear probe of a vision backbone on an image classification task in IDX files,
//! VTAB-1k style (`data::images`, `eval::linear_probe`).

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use crate::data::images::{vtab_sample, ImageSet};
use crate::error::{Error, Result};
use crate::eval::linear_probe::{features, Probe, ProbeConfig};

#[derive(Args, Debug, Clone)]
pub struct ProbeArgs {
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
    /// Validation images drawn from the training split (they choose the probe's step).
    #[arg(long, default_value_t = 200)]
    pub val: usize,
    /// Test images: the first N of the test split (default: all of it).
    #[arg(long)]
    pub test: Option<usize>,
    /// The sample's seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images resized to this side (the backbone's input; a multiple of its patch size).
    #[arg(long, default_value_t = 224)]
    pub image_size: usize,
    #[arg(long, default_value_t = 500)]
    pub steps: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Write the result as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Replace the `--json` file when it exists (refused otherwise).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub overwrite: bool,
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

pub fn probe(args: &ProbeArgs) -> Result<ProbeReport> {
    crate::validate::int_in("steps", args.steps, 0, 1_000_000)?;
    crate::validate::int_in("train", args.train, 1, 1 << 24)?;
    crate::validate::int_in("val", args.val, 1, 1 << 24)?;
    if let Some(path) = &args.json {
        crate::fsutil::refuse_to_replace(std::slice::from_ref(path), "--json", args.overwrite)?;
    }
    let config = crate::model::vit::VitConfig::dinov2_small();
    if args.image_size == 0 || !args.image_size.is_multiple_of(config.patch_size) {
        return Err(Error::msg(format!("--image-size {}: must be a positive multiple of the patch size {}", args.image_size, config.patch_size)));
    }
    let vit = crate::loading::onnx::load_dinov2(&args.backbone, &args.prefix, config)?;
    let (train_split, test_split) = (split(&args.data, "train")?, split(&args.data, "t10k")?);
    let (train_idx, val_idx) = vtab_sample(train_split.len(), args.train, args.val, args.seed)?;
    let test_n = args.test.unwrap_or(test_split.len()).min(test_split.len());
    let test_idx: Vec<usize> = (0..test_n).collect();
    let classes = train_split.labels.iter().chain(&test_split.labels).map(|&l| l as usize + 1).max().unwrap_or(1);
    let started = std::time::Instant::now();
    let take = |set: &ImageSet, idx: &[usize]| features(&vit, &set.select(idx), args.image_size, 16);
    let (train_f, val_f, test_f) = (take(&train_split, &train_idx)?, take(&train_split, &val_idx)?, take(&test_split, &test_idx)?);
    let feature_seconds = started.elapsed().as_secs_f64();
    let labels = |set: &ImageSet, idx: &[usize]| -> Vec<u8> { idx.iter().map(|&i| set.labels[i]).collect() };
    let cfg = ProbeConfig { steps: args.steps, lr: args.lr, ..Default::default() };
    let probe = Probe::train(&train_f, &labels(&train_split, &train_idx), &val_f, &labels(&train_split, &val_idx), classes, &cfg)?;
    let test_accuracy = probe.accuracy(&test_f, &labels(&test_split, &test_idx))?;
    let report = ProbeReport { train: args.train, val: args.val, test: test_n, seed: args.seed, step: probe.step, val_accuracy: probe.val_accuracy, test_accuracy, feature_seconds };
    println!(
        "linear probe: {} train / {} val / {} test images, seed {}: validation {:.2}% (step {}), test {:.2}%; features of {} images in {:.0} s",
        report.train,
        report.val,
        report.test,
        report.seed,
        100.0 * report.val_accuracy,
        report.step,
        100.0 * report.test_accuracy,
        args.train + args.val + test_n,
        feature_seconds
    );
    if let Some(path) = &args.json {
        super::bench_args::write_json(path, &report)?;
    }
    Ok(report)
}

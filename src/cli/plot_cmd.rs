//! `plot`: PNG charts of `finetune`'s loss curves and `eval`'s accuracy tables.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::error::{Error, IoContext, Result};
use crate::plot::runs::{accuracy_chart, loss_chart, read_eval_report, read_metrics, short_names};

#[derive(Args, Debug, Clone)]
pub struct PlotArgs {
    /// A `metrics.jsonl` written by `finetune` (repeat, or separate with commas, to overlay
    /// runs): training and held-out loss against step, drawn to OUT/loss.png.
    #[arg(long, value_delimiter = ',')]
    pub metrics: Vec<PathBuf>,
    /// An accuracy JSON written by `eval --output` (repeat to compare): accuracy per task and
    /// the average as grouped bars, drawn to OUT/accuracy.png.
    #[arg(long, value_delimiter = ',')]
    pub eval: Vec<PathBuf>,
    /// Names for the runs, in the order of the files (default: the run folder for metrics, the
    /// file name for eval JSON). Give one per --metrics file and one per --eval file; with both
    /// kinds, the i-th label names the i-th file of each.
    #[arg(long, value_delimiter = ',')]
    pub label: Vec<String>,
    /// Folder for the PNG files (default: the folder of the first input).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace loss.png / accuracy.png when they exist there (refused otherwise).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub overwrite: bool,
}

/// Draw the charts the arguments ask for; returns the files written.
pub fn plot(args: &PlotArgs) -> Result<Vec<PathBuf>> {
    if args.metrics.is_empty() && args.eval.is_empty() {
        return Err(Error::msg("plot: nothing to draw; give --metrics FILE.jsonl and/or --eval FILE.json"));
    }
    for (flag, files) in [("--metrics", &args.metrics), ("--eval", &args.eval)] {
        if !args.label.is_empty() && !files.is_empty() && files.len() != args.label.len() {
            return Err(Error::msg(format!(
                "plot: {} --label given for {} {flag} file(s); give one label per file",
                args.label.len(),
                files.len()
            )));
        }
    }
    let first = args.metrics.first().or(args.eval.first()).expect("checked above");
    let out = match &args.out {
        Some(dir) => dir.clone(),
        None => first.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf(),
    };
    let mut charts = Vec::new();
    if !args.metrics.is_empty() {
        charts.push(out.join("loss.png"));
    }
    if !args.eval.is_empty() {
        charts.push(out.join("accuracy.png"));
    }
    crate::fsutil::refuse_to_replace(&charts, "--out", args.overwrite)?;
    let mut written = Vec::new();
    if !args.metrics.is_empty() {
        let labels = labels(&args.label, &args.metrics)?;
        let curves = args.metrics.iter().zip(labels).map(|(path, label)| read_metrics(path, label)).collect::<Result<Vec<_>>>()?;
        let path = out.join("loss.png");
        std::fs::create_dir_all(&out).at(&out)?;
        crate::plot::line_chart(&path, &loss_chart(&curves))?;
        written.push(path);
    }
    if !args.eval.is_empty() {
        let labels = labels(&args.label, &args.eval)?;
        let reports = args.eval.iter().zip(labels).map(|(path, label)| Ok((label, read_eval_report(path)?))).collect::<Result<Vec<_>>>()?;
        let path = out.join("accuracy.png");
        std::fs::create_dir_all(&out).at(&out)?;
        crate::plot::bar_chart(&path, &accuracy_chart(&reports))?;
        written.push(path);
    }
    Ok(written)
}

/// The labels given, or names made from the files' (absolute) paths.
fn labels(given: &[String], files: &[PathBuf]) -> Result<Vec<String>> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    let absolute = files.iter().map(|f| std::fs::canonicalize(f).at(f)).collect::<Result<Vec<_>>>()?;
    Ok(short_names(&absolute))
}

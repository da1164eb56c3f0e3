//! The engine's own outputs as charts: `finetune`'s `metrics.jsonl` as loss curves, `eval`'s
//! accuracy JSON as grouped bars.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{BarChart, LineChart, LineSeries};
use crate::error::{read_json, Error, IoContext, Result};
use crate::eval::report::EvalReport;

/// The losses of one training run, by optimizer step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossCurve {
    pub label: String,
    /// (step, training loss); NaN where the loss was not finite (logged as null).
    pub train: Vec<(f64, f64)>,
    /// (step, held-out loss).
    pub eval: Vec<(f64, f64)>,
}

/// Read a `metrics.jsonl` written by `finetune`: one JSON object per line, `{"step", "loss", ...}`
/// after each optimizer step and `{"step", "eval_loss"}` after each held-out evaluation; other
/// keys are ignored. A resumed run appends, so a step may appear twice: the later line wins.
/// Errors name the file and line.
pub fn read_metrics(path: &Path, label: impl Into<String>) -> Result<LossCurve> {
    let text = std::fs::read_to_string(path).at(path)?;
    let bad = |line: usize, msg: String| Error::BadFile { path: path.to_path_buf(), msg: format!("line {line}: {msg}") };
    let (mut train, mut eval) = (BTreeMap::new(), BTreeMap::new());
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(n, format!("invalid JSON: {e}")))?;
        let obj = value.as_object().ok_or_else(|| bad(n, "expected a JSON object".into()))?;
        let step = match obj.get("step") {
            Some(s) => s.as_u64().ok_or_else(|| bad(n, format!("`step` must be a non-negative integer, found {s}")))?,
            None => return Err(bad(n, "no `step`".into())),
        };
        for (key, into) in [("loss", &mut train), ("eval_loss", &mut eval)] {
            match obj.get(key) {
                None => {}
                // serde_json writes a NaN or infinite loss as null: a gap in the curve.
                Some(serde_json::Value::Null) => {
                    into.insert(step, f64::NAN);
                }
                Some(v) => {
                    let loss = v.as_f64().ok_or_else(|| bad(n, format!("`{key}` must be a number, found {v}")))?;
                    into.insert(step, loss);
                }
            }
        }
    }
    if train.is_empty() && eval.is_empty() {
        return Err(Error::BadFile { path: path.to_path_buf(), msg: "no `loss` or `eval_loss` records: nothing to plot".into() });
    }
    let points = |m: BTreeMap<u64, f64>| m.into_iter().map(|(s, l)| (s as f64, l)).collect();
    Ok(LossCurve { label: label.into(), train: points(train), eval: points(eval) })
}

/// Training and held-out loss against step. One run: training in blue, held-out in orange;
/// several: one colour per run, training solid, held-out dashed with dots.
pub fn loss_chart(curves: &[LossCurve]) -> LineChart {
    let mut series = Vec::new();
    for (i, c) in curves.iter().enumerate() {
        let name = |what: &str| if curves.len() == 1 { what.to_string() } else { format!("{} {what}", c.label) };
        let (train_color, eval_color) = if curves.len() == 1 { (0, 1) } else { (i, i) };
        if !c.train.is_empty() {
            series.push(LineSeries::new(name("train"), c.train.clone()).color(train_color));
        }
        if !c.eval.is_empty() {
            series.push(LineSeries::new(name("held-out"), c.eval.clone()).color(eval_color).dashed().markers());
        }
    }
    let title = match curves {
        [one] if !one.label.is_empty() => format!("Loss: {}", one.label),
        _ => "Loss".to_string(),
    };
    LineChart { title, x_label: "step".into(), y_label: "loss".into(), series, ..Default::default() }
}

/// Read an accuracy JSON written by `eval --output`; errors name the file.
pub fn read_eval_report(path: &Path) -> Result<EvalReport> {
    let report: EvalReport = read_json(path)?;
    if report.tasks.is_empty() {
        return Err(Error::BadFile { path: path.to_path_buf(), msg: "no task scores: nothing to plot".into() });
    }
    Ok(report)
}

/// Accuracy (%) per task and the average, one bar series per report. The tasks are those of
/// all reports, in the order first seen; a task a report lacks gets no bar.
pub fn accuracy_chart(reports: &[(String, EvalReport)]) -> BarChart {
    let mut tasks = Vec::new();
    for (_, r) in reports {
        for s in &r.tasks {
            if !tasks.contains(&s.task) {
                tasks.push(s.task);
            }
        }
    }
    let mut categories: Vec<String> = tasks.iter().map(|t| t.dir_name().to_string()).collect();
    categories.push("Average".into());
    let series = reports
        .iter()
        .map(|(label, r)| {
            let mut values: Vec<f64> = tasks.iter().map(|&t| r.get(t).map_or(f64::NAN, |s| 100.0 * s.accuracy)).collect();
            let average = r.average.unwrap_or_else(|| r.tasks.iter().map(|s| s.accuracy).sum::<f64>() / r.tasks.len().max(1) as f64);
            values.push(100.0 * average);
            (label.clone(), values)
        })
        .collect();
    BarChart {
        title: "Accuracy per task".into(),
        y_label: "accuracy (%)".into(),
        categories,
        series,
        value_labels: true,
        y_range: Some((0.0, 100.0)),
        ..Default::default()
    }
}

/// Short names that tell the paths apart: the last path component (for `metrics.jsonl`, its
/// folder; otherwise the file stem), with leading folders added until the names differ.
pub fn short_names(paths: &[PathBuf]) -> Vec<String> {
    let parts: Vec<Vec<String>> = paths
        .iter()
        .map(|p| {
            let mut parts: Vec<String> = p.components().map(|c| c.as_os_str().to_string_lossy().to_string()).collect();
            if p.file_name().is_some_and(|n| n == "metrics.jsonl") && parts.len() > 1 {
                parts.pop();
            } else if let (Some(last), Some(stem)) = (parts.last_mut(), p.file_stem()) {
                *last = stem.to_string_lossy().to_string();
            }
            parts
        })
        .collect();
    let longest = parts.iter().map(Vec::len).max().unwrap_or(0);
    let mut names = Vec::new();
    for depth in 1..=longest.max(1) {
        names = parts.iter().map(|p| p[p.len().saturating_sub(depth)..].join("/")).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        if sorted.len() == names.len() {
            break;
        }
    }
    names
}

/// `finetune`'s chart of its own run: `metrics` drawn to `png`.
pub fn write_run_loss_chart(metrics: &Path, label: &str, png: &Path) -> Result<()> {
    let curve = read_metrics(metrics, label)?;
    super::line_chart(png, &loss_chart(&[curve]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_add_folders_until_distinct() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(short_names(&[p("runs/a/metrics.jsonl"), p("runs/b/metrics.jsonl")]), ["a", "b"]);
        assert_eq!(short_names(&[p("x/lora/acc.json"), p("y/lora/acc.json")]), ["x/lora/acc", "y/lora/acc"]);
        assert_eq!(short_names(&[p("lora.json"), p("dora.json")]), ["lora", "dora"]);
        assert_eq!(short_names(&[p("metrics.jsonl")]), ["metrics"]);
    }
}

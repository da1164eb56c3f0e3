//! PNG charts for people who would rather look than read: line charts (loss curves) and grouped
//! bar charts (accuracy per task, kernel timings), with a title, numbered axes, grid and legend.
//!
//! ```no_run
//! use candle_peft::plot::{bar_chart, line_chart, BarChart, LineChart, LineSeries};
//! # fn main() -> candle_peft::Result<()> {
//! line_chart("loss.png".as_ref(), &LineChart {
//!     title: "Training loss".into(),
//!     x_label: "step".into(),
//!     y_label: "loss".into(),
//!     series: vec![LineSeries::new("train", vec![(1.0, 2.3), (2.0, 1.9), (3.0, 1.7)])],
//!     ..Default::default()
//! })?;
//! bar_chart("acc.png".as_ref(), &BarChart {
//!     title: "Accuracy".into(),
//!     y_label: "accuracy (%)".into(),
//!     categories: vec!["boolq".into(), "piqa".into()],
//!     series: vec![("lora".into(), vec![62.0, 71.5]), ("dora".into(), vec![64.0, 70.0])],
//!     value_labels: true,
//!     ..Default::default()
//! })?;
//! # Ok(()) }
//! ```
//!
//! Rendering is self-contained (see `canvas`): no system font, no native library. Files are
//! written atomically; errors name the file.

pub mod canvas;
pub mod runs;

use std::path::Path;

use canvas::{Align, Canvas, Font, Rect, Rgb};

use crate::error::{Error, Result};

/// Series colours, in order (Tableau 10). A series' pixels of full coverage have exactly its
/// colour, which is what the tests look for.
pub const PALETTE: [Rgb; 10] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];

pub const BACKGROUND: Rgb = [255, 255, 255];
const TEXT: Rgb = [34, 34, 34];
const AXIS: Rgb = [90, 90, 90];
const GRID: Rgb = [228, 228, 228];
const PAD: f64 = 14.0;
const TICK: f64 = 5.0;

/// One line of a [`LineChart`]. Points whose y is not finite leave a gap.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LineSeries {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Index into [`PALETTE`] (wraps); `None`: the series' own position.
    pub color: Option<usize>,
    pub dashed: bool,
    /// A dot on every point (a series with a single point always gets one).
    pub markers: bool,
}

impl LineSeries {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.into(), points, ..Default::default() }
    }

    pub fn color(mut self, index: usize) -> Self {
        self.color = Some(index);
        self
    }

    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }

    pub fn markers(mut self) -> Self {
        self.markers = true;
        self
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<LineSeries>,
    /// Fixed y axis range; `None`: fitted to the data, widened to round ticks.
    pub y_range: Option<(f64, f64)>,
    /// Image size in pixels.
    pub size: (u32, u32),
}

impl Default for LineChart {
    fn default() -> Self {
        Self { title: String::new(), x_label: String::new(), y_label: String::new(), series: Vec::new(), y_range: None, size: (960, 560) }
    }
}

/// Grouped bars: one group per category, one bar per series in each group. A value that is
/// not finite (NaN for "missing") draws no bar.
#[derive(Debug, Clone, PartialEq)]
pub struct BarChart {
    pub title: String,
    pub y_label: String,
    pub categories: Vec<String>,
    /// (name, one value per category).
    pub series: Vec<(String, Vec<f64>)>,
    /// Write each bar's value above it.
    pub value_labels: bool,
    /// Fixed y axis range; `None`: from min(0, data) to a round number above the data.
    pub y_range: Option<(f64, f64)>,
    pub size: (u32, u32),
}

impl Default for BarChart {
    fn default() -> Self {
        Self {
            title: String::new(),
            y_label: String::new(),
            categories: Vec::new(),
            series: Vec::new(),
            value_labels: false,
            y_range: None,
            size: (960, 560),
        }
    }
}

/// Render `chart` and write it to `path` as PNG.
pub fn line_chart(path: &Path, chart: &LineChart) -> Result<()> {
    let png = render_line_chart(chart).map_err(|msg| Error::BadFile { path: path.to_path_buf(), msg })?;
    crate::fsutil::write_file_atomic(path, &png)
}

/// Render `chart` and write it to `path` as PNG.
pub fn bar_chart(path: &Path, chart: &BarChart) -> Result<()> {
    let png = render_bar_chart(chart).map_err(|msg| Error::BadFile { path: path.to_path_buf(), msg })?;
    crate::fsutil::write_file_atomic(path, &png)
}

/// The PNG bytes of a line chart; the error says what is wrong with the chart.
pub fn render_line_chart(chart: &LineChart) -> std::result::Result<Vec<u8>, String> {
    let finite: Vec<(f64, f64)> =
        chart.series.iter().flat_map(|s| s.points.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    if finite.is_empty() {
        return Err("nothing to plot: no series has a point with finite coordinates".into());
    }
    check_size(chart.size)?;
    let (xmin, xmax) = bounds(finite.iter().map(|p| p.0));
    let (xmin, xmax) = widen_if_flat(xmin, xmax);
    // Whole-number x (steps, epochs): no ticks between them.
    let mut x_target = axis_tick_count(chart.size.0 as f64, 110.0);
    if finite.iter().all(|p| p.0.fract() == 0.0) {
        x_target = x_target.min((xmax - xmin).round().max(1.0) as usize);
    }
    let x_ticks = ticks(xmin, xmax, x_target);
    let (ylo, yhi, y_ticks) = match chart.y_range {
        Some((lo, hi)) => check_range(lo, hi).map(|(lo, hi)| (lo, hi, ticks(lo, hi, axis_tick_count(chart.size.1 as f64, 60.0))))?,
        None => {
            let (lo, hi) = widen_if_flat(bounds(finite.iter().map(|p| p.1)).0, bounds(finite.iter().map(|p| p.1)).1);
            loose(lo, hi, axis_tick_count(chart.size.1 as f64, 60.0))
        }
    };
    let legend: Vec<LegendEntry> = chart
        .series
        .iter()
        .enumerate()
        .map(|(i, s)| LegendEntry { name: s.name.clone(), color: series_color(s.color, i), kind: LegendKind::Line { dashed: s.dashed, markers: s.markers } })
        .collect();
    let mut frame = Frame::new(chart.size, &chart.title, &legend, &chart.x_label, &chart.y_label, &y_ticks, (0.0, 0.0));
    let area = frame.area;
    frame.draw_y_axis(ylo, yhi, &y_ticks);
    // The data stops short of the left and right edges, so end markers show whole.
    let inset = 6.0;
    let fx = |x: f64| area.x0 + inset + (x - xmin) / (xmax - xmin) * (area.width() - 2.0 * inset);
    let fy = |y: f64| area.y1 - (y - ylo) / (yhi - ylo) * area.height();
    for &t in &x_ticks {
        let x = fx(t).floor();
        frame.canvas.hairline((x, area.y0), (x, area.y1 - 1.0), GRID);
    }
    frame.draw_axes();
    for &t in &x_ticks {
        let x = fx(t).floor();
        frame.canvas.hairline((x, area.y1), (x, area.y1 + TICK), AXIS);
        frame.canvas.text(&tick_label(t, &x_ticks), (x, area.y1 + TICK + 3.0), Font::Small, TEXT, Align::Center, Align::Start, false);
    }
    frame.canvas.set_clip(Some(area));
    for (i, s) in chart.series.iter().enumerate() {
        let color = series_color(s.color, i);
        let pts: Vec<(f64, f64)> =
            s.points.iter().map(|&(x, y)| if x.is_finite() && y.is_finite() { (fx(x), fy(y)) } else { (f64::NAN, f64::NAN) }).collect();
        frame.canvas.polyline(&pts, 2.0, color, s.dashed.then_some((8.0, 5.0)));
        let n_finite = pts.iter().filter(|p| p.0.is_finite()).count();
        if s.markers || n_finite == 1 {
            for &p in &pts {
                frame.canvas.disc(p, 3.5, color);
            }
        }
    }
    frame.canvas.set_clip(None);
    frame.canvas.to_png().map_err(|e| e.to_string())
}

/// The PNG bytes of a grouped bar chart; the error says what is wrong with the chart.
pub fn render_bar_chart(chart: &BarChart) -> std::result::Result<Vec<u8>, String> {
    if chart.categories.is_empty() || chart.series.is_empty() {
        return Err("nothing to plot: a bar chart needs at least one category and one series".into());
    }
    for (name, values) in &chart.series {
        if values.len() != chart.categories.len() {
            return Err(format!("series `{name}` has {} values for {} categories", values.len(), chart.categories.len()));
        }
    }
    check_size(chart.size)?;
    let values: Vec<f64> = chart.series.iter().flat_map(|s| s.1.iter().copied()).filter(|v| v.is_finite()).collect();
    if values.is_empty() {
        return Err("nothing to plot: no bar has a finite value".into());
    }
    let n_cat = chart.categories.len();
    let n_ser = chart.series.len();
    let label_font = Font::Small;
    let value_texts: Vec<Vec<String>> = chart.series.iter().map(|(_, vs)| vs.iter().map(|&v| value_label(v)).collect()).collect();
    let longest_value = value_texts.iter().flatten().map(|t| label_font.text_width(t)).fold(0.0, f64::max);
    let y_target = axis_tick_count(chart.size.1 as f64, 60.0);
    // The y ticks fix the left margin, hence the bar width, hence whether the value labels
    // stand upright above the bars or are turned a quarter (and so the headroom they need).
    let y_axis = |headroom: f64| match chart.y_range {
        Some((lo, hi)) => check_range(lo, hi).map(|(lo, hi)| (lo, hi, ticks(lo, hi, y_target))),
        None => {
            let (lo, hi) = bounds(values.iter().copied());
            let (lo, hi) = widen_if_flat(lo.min(0.0), hi.max(0.0));
            // Leave room above the tallest bar for its label.
            let plot_h = (chart.size.1 as f64 * 0.6).max(1.0);
            let hi = if hi > 0.0 { hi + (hi - lo) * headroom / (plot_h - headroom).max(plot_h / 2.0) } else { hi };
            Ok(loose(lo, hi, y_target))
        }
    };
    let (_, _, rough_ticks) = y_axis(0.0)?;
    let (left, right) = Frame::x_extent(chart.size.0 as f64, &rough_ticks, &chart.y_label);
    let slot_w = (right - left) / n_cat as f64;
    let bar_w = slot_w * 0.8 / n_ser as f64;
    let upright_values = longest_value <= bar_w - 2.0;
    let headroom = if !chart.value_labels {
        0.0
    } else if upright_values {
        label_font.height() + 4.0
    } else {
        longest_value + 6.0
    };
    let (ylo, yhi, y_ticks) = y_axis(headroom)?;
    let legend: Vec<LegendEntry> =
        chart.series.iter().enumerate().map(|(i, (name, _))| LegendEntry { name: name.clone(), color: series_color(None, i), kind: LegendKind::Box }).collect();
    let longest_cat = chart.categories.iter().map(|c| label_font.text_width(c)).fold(0.0, f64::max);
    // Category names: in one row if they fit their slot, in two staggered rows if they fit two
    // slots, else turned a quarter.
    let cat_rows = if longest_cat <= slot_w - 6.0 {
        1
    } else if longest_cat <= 2.0 * slot_w - 10.0 {
        2
    } else {
        0
    };
    let cat_extra = match cat_rows {
        1 => 0.0,
        2 => label_font.height() + 2.0,
        _ => longest_cat - label_font.height(),
    };
    // A fixed range gets room above it for the labels of the tallest bars.
    let top_extra = if chart.y_range.is_some() { headroom } else { 0.0 };
    let mut frame = Frame::new(chart.size, &chart.title, &legend, "", &chart.y_label, &y_ticks, (top_extra, cat_extra));
    let area = frame.area;
    frame.draw_y_axis(ylo, yhi, &y_ticks);
    frame.draw_axes();
    let fy = |y: f64| area.y1 - (y - ylo) / (yhi - ylo) * area.height();
    let slot = area.width() / n_cat as f64;
    let group = slot * 0.8;
    let bar = group / n_ser as f64;
    let base = fy(0.0_f64.clamp(ylo, yhi));
    if ylo < 0.0 && yhi > 0.0 {
        frame.canvas.hairline((area.x0, base.floor()), (area.x1 - 1.0, base.floor()), AXIS);
    }
    for (c, cat) in chart.categories.iter().enumerate() {
        let centre = area.x0 + slot * (c as f64 + 0.5);
        let below = area.y1 + TICK + 3.0;
        match cat_rows {
            0 => frame.canvas.text(cat, (centre - label_font.height() / 2.0, below), label_font, TEXT, Align::End, Align::Start, true),
            _ => {
                let row = (c % cat_rows) as f64 * (label_font.height() + 2.0);
                frame.canvas.text(cat, (centre, below + row), label_font, TEXT, Align::Center, Align::Start, false);
            }
        }
        let tick_end = if cat_rows == 2 && c % 2 == 1 { area.y1 + TICK + label_font.height() } else { area.y1 + TICK };
        frame.canvas.hairline((centre.floor(), area.y1), (centre.floor(), tick_end), AXIS);
        for (s, (_, vals)) in chart.series.iter().enumerate() {
            let v = vals[c];
            if !v.is_finite() {
                continue;
            }
            let x0 = centre - group / 2.0 + bar * s as f64;
            let gap = if bar > 6.0 { 1.0 } else { 0.0 };
            let top = fy(v.clamp(ylo, yhi));
            frame.canvas.set_clip(Some(area));
            frame.canvas.fill_rect(Rect { x0: x0 + gap, y0: top.min(base), x1: x0 + bar - gap, y1: top.max(base) }, PALETTE[s % PALETTE.len()]);
            frame.canvas.set_clip(None);
            if chart.value_labels {
                let text = &value_texts[s][c];
                let above = if v >= 0.0 { top.min(base) - 3.0 } else { top.max(base) + 3.0 };
                let (h, v_al) = if v >= 0.0 { (Align::Start, Align::End) } else { (Align::End, Align::Start) };
                if upright_values {
                    frame.canvas.text(text, (x0 + bar / 2.0, above), label_font, TEXT, Align::Center, v_al, false);
                } else {
                    frame.canvas.text(text, (x0 + bar / 2.0 - label_font.height() / 2.0, above), label_font, TEXT, h, Align::Start, true);
                }
            }
        }
    }
    frame.canvas.to_png().map_err(|e| e.to_string())
}

fn check_size((w, h): (u32, u32)) -> std::result::Result<(), String> {
    if !(200..=8192).contains(&w) || !(150..=8192).contains(&h) {
        return Err(format!("image size {w}x{h} is out of range (200..8192 x 150..8192)"));
    }
    Ok(())
}

fn check_range(lo: f64, hi: f64) -> std::result::Result<(f64, f64), String> {
    if lo.is_finite() && hi.is_finite() && lo < hi {
        Ok((lo, hi))
    } else {
        Err(format!("y range ({lo}, {hi}) must be finite with min < max"))
    }
}

fn series_color(color: Option<usize>, position: usize) -> Rgb {
    PALETTE[color.unwrap_or(position) % PALETTE.len()]
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

fn widen_if_flat(lo: f64, hi: f64) -> (f64, f64) {
    if hi > lo {
        (lo, hi)
    } else {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo - d, hi + d)
    }
}

/// About one tick per `spacing` pixels of a `pixels`-long axis, at least 2.
fn axis_tick_count(pixels: f64, spacing: f64) -> usize {
    ((pixels * 0.8 / spacing) as usize).max(2)
}

/// A round step (1, 2 or 5 times a power of ten) giving about `target` intervals over `span`.
fn nice_step(span: f64, target: usize) -> f64 {
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 + 1e-9 {
        1.0
    } else if f <= 2.0 + 1e-9 {
        2.0
    } else if f <= 5.0 + 1e-9 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Round-numbered ticks inside [lo, hi].
fn ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    ticks_every(lo, hi, nice_step(hi - lo, target))
}

fn ticks_every(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last).map(|k| k as f64 * step).collect()
}

/// [lo, hi] widened outwards to round ticks, and those ticks.
fn loose(lo: f64, hi: f64, target: usize) -> (f64, f64, Vec<f64>) {
    let step = nice_step(hi - lo, target);
    let (lo, hi) = ((lo / step + 1e-9).floor() * step, (hi / step - 1e-9).ceil() * step);
    (lo, hi, ticks_every(lo, hi, step))
}

/// Enough decimals to tell neighbouring ticks apart, and no more.
fn tick_label(v: f64, ticks: &[f64]) -> String {
    let step = if ticks.len() > 1 { (ticks[1] - ticks[0]).abs() } else { v.abs().max(1.0) };
    let decimals = (-step.log10().floor()).clamp(0.0, 9.0) as usize;
    let v = if v.abs() < step * 1e-6 { 0.0 } else { v };
    format!("{v:.decimals$}")
}

/// About three significant digits.
fn value_label(v: f64) -> String {
    if !v.is_finite() {
        return String::new();
    }
    let a = v.abs();
    let decimals = if a >= 100.0 || a == 0.0 {
        0
    } else if a >= 10.0 {
        1
    } else if a >= 1.0 {
        2
    } else {
        ((-a.log10().floor()) as usize + 2).min(9)
    };
    let text = format!("{v:.decimals$}");
    if a < 1.0 && text.contains('.') {
        // 0.610 -> 0.61: below one, trailing zeros only add width.
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

#[derive(Debug, Clone)]
enum LegendKind {
    Line { dashed: bool, markers: bool },
    Box,
}

#[derive(Debug, Clone)]
struct LegendEntry {
    name: String,
    color: Rgb,
    kind: LegendKind,
}

const SWATCH: f64 = 26.0;

impl LegendEntry {
    fn width(&self) -> f64 {
        SWATCH + 6.0 + Font::Small.text_width(&self.name)
    }
}

/// Title, legend rows, axis labels and the plot area they leave.
struct Frame {
    canvas: Canvas,
    area: Rect,
}

impl Frame {
    /// `extra`: (room above the plot area, room under the x tick labels beyond one line of text).
    fn new(size: (u32, u32), title: &str, legend: &[LegendEntry], x_label: &str, y_label: &str, y_ticks: &[f64], extra: (f64, f64)) -> Self {
        let (w, h) = (size.0 as f64, size.1 as f64);
        let mut canvas = Canvas::new(size.0 as usize, size.1 as usize, BACKGROUND);
        let small = Font::Small;
        let mut top = PAD;
        if !title.is_empty() {
            canvas.text(title, (w / 2.0, top), Font::Title, TEXT, Align::Center, Align::Start, false);
            top += Font::Title.height() + 6.0;
        }
        // Legend: rows of entries, each row centred, wrapped to the image width.
        let gap = 20.0;
        let mut rows: Vec<Vec<&LegendEntry>> = Vec::new();
        let mut row_w = f64::INFINITY;
        for e in legend.iter().filter(|e| !e.name.is_empty()) {
            if row_w + gap + e.width() > w - 2.0 * PAD {
                rows.push(Vec::new());
                row_w = -gap;
            }
            rows.last_mut().expect("a row was pushed").push(e);
            row_w += gap + e.width();
        }
        for row in &rows {
            let total: f64 = row.iter().map(|e| e.width()).sum::<f64>() + gap * (row.len() - 1) as f64;
            let mut x = ((w - total) / 2.0).max(PAD);
            let mid = top + small.height() / 2.0;
            for e in row {
                match e.kind {
                    LegendKind::Line { dashed, markers } => {
                        canvas.polyline(&[(x, mid), (x + SWATCH, mid)], 2.0, e.color, dashed.then_some((8.0, 5.0)));
                        if markers {
                            canvas.disc((x + SWATCH / 2.0, mid), 3.5, e.color);
                        }
                    }
                    LegendKind::Box => canvas.fill_rect(Rect { x0: x + 6.0, y0: mid - 6.0, x1: x + SWATCH - 6.0, y1: mid + 6.0 }, e.color),
                }
                canvas.text(&e.name, (x + SWATCH + 6.0, mid), small, TEXT, Align::Start, Align::Center, false);
                x += e.width() + gap;
            }
            top += small.height() + 4.0;
        }
        top += 10.0 + extra.0.max(0.0);
        let (left, right) = Self::x_extent(w, y_ticks, y_label);
        let mut bottom = h - PAD - TICK - 3.0 - small.height() - extra.1.max(0.0);
        if !x_label.is_empty() {
            bottom -= small.height() + 6.0;
        }
        let area = Rect { x0: left.floor(), y0: top.floor(), x1: right.floor(), y1: bottom.floor().max(top + 20.0) };
        if !y_label.is_empty() {
            canvas.text(y_label, (PAD, (area.y0 + area.y1) / 2.0), small, TEXT, Align::Center, Align::Start, true);
        }
        if !x_label.is_empty() {
            canvas.text(x_label, ((area.x0 + area.x1) / 2.0, h - PAD), small, TEXT, Align::Center, Align::End, false);
        }
        Self { canvas, area }
    }

    /// Left and right edges of the plot area in an image `width` wide.
    fn x_extent(width: f64, y_ticks: &[f64], y_label: &str) -> (f64, f64) {
        let small = Font::Small;
        let tick_w = y_ticks.iter().map(|&t| small.text_width(&tick_label(t, y_ticks))).fold(0.0, f64::max);
        let mut left = PAD + tick_w + TICK + 4.0;
        if !y_label.is_empty() {
            left += small.height() + 8.0;
        }
        (left.floor(), (width - PAD - 12.0).floor())
    }

    /// Grid lines, ticks and numbers of the y axis.
    fn draw_y_axis(&mut self, lo: f64, hi: f64, ticks: &[f64]) {
        let a = self.area;
        for &t in ticks {
            let y = (a.y1 - (t - lo) / (hi - lo) * a.height()).floor().min(a.y1 - 1.0);
            self.canvas.hairline((a.x0, y), (a.x1 - 1.0, y), GRID);
            self.canvas.hairline((a.x0 - TICK, y), (a.x0 - 1.0, y), AXIS);
            self.canvas.text(&tick_label(t, ticks), (a.x0 - TICK - 4.0, y), Font::Small, TEXT, Align::End, Align::Center, false);
        }
    }

    /// The left and bottom axis lines.
    fn draw_axes(&mut self) {
        let a = self.area;
        self.canvas.hairline((a.x0 - 1.0, a.y0), (a.x0 - 1.0, a.y1), AXIS);
        self.canvas.hairline((a.x0 - 1.0, a.y1), (a.x1 - 1.0, a.y1), AXIS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_inside() {
        assert_eq!(ticks(0.0, 100.0, 5), vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        assert_eq!(ticks(1.0, 300.0, 6), vec![50.0, 100.0, 150.0, 200.0, 250.0, 300.0]);
        let (lo, hi, t) = loose(0.83, 2.31, 8);
        assert!((lo - 0.8).abs() < 1e-12 && (hi - 2.4).abs() < 1e-12, "{lo} {hi}");
        assert_eq!(t.len(), 9);
        assert_eq!(tick_label(t[1], &t), "1.0");
        assert_eq!(tick_label(0.0000001, &[0.0, 0.5]), "0.0");
    }

    #[test]
    fn value_labels_have_three_digits() {
        assert_eq!(value_label(55.0), "55.0");
        assert_eq!(value_label(100.0), "100");
        assert_eq!(value_label(0.01234), "0.0123");
        assert_eq!(value_label(0.610), "0.61");
        assert_eq!(value_label(4.5678), "4.57");
    }
}

//! Charts: the PNG decodes (with an independent decoder) to the size asked for, each series is
//! drawn in its own colour where its data says, and `candle-peft plot` works end to end and
//! fails clearly on bad input.

use std::path::Path;
use std::process::Command;

use candle_peft::eval::answer::Task;
use candle_peft::eval::report::EvalReport;
use candle_peft::plot::runs::read_metrics;
use candle_peft::plot::{bar_chart, line_chart, BarChart, LineChart, LineSeries, PALETTE};

struct Image {
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

impl Image {
    fn at(&self, x: usize, y: usize) -> [u8; 3] {
        let i = 3 * (y * self.width + x);
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }

    /// (x, y) of every pixel of exactly `color` with y in `rows`.
    fn pixels_of(&self, color: [u8; 3], rows: std::ops::Range<usize>) -> Vec<(usize, usize)> {
        rows.flat_map(|y| (0..self.width).map(move |x| (x, y))).filter(|&(x, y)| self.at(x, y) == color).collect()
    }
}

fn decode(path: &Path) -> Image {
    let bytes = std::fs::read(path).unwrap();
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.color_type, info.bit_depth), (png::ColorType::Rgb, png::BitDepth::Eight));
    buf.truncate(info.line_size * info.height as usize);
    Image { width: info.width as usize, height: info.height as usize, rgb: buf }
}

fn is_text(c: [u8; 3]) -> bool {
    c.iter().all(|&v| v < 110)
}

fn mean_y(points: &[(usize, usize)]) -> f64 {
    points.iter().map(|p| p.1 as f64).sum::<f64>() / points.len().max(1) as f64
}

#[test]
fn line_chart_draws_each_series_where_its_data_is() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("lines.png");
    let rising: Vec<(f64, f64)> = (0..=50).map(|i| (i as f64, i as f64 * 0.2)).collect();
    let falling: Vec<(f64, f64)> = (0..=50).map(|i| (i as f64, 10.0 - i as f64 * 0.2)).collect();
    line_chart(
        &path,
        &LineChart {
            title: "Two lines".into(),
            x_label: "step".into(),
            y_label: "value".into(),
            series: vec![LineSeries::new("up", rising), LineSeries::new("down", falling).dashed()],
            size: (640, 400),
            ..Default::default()
        },
    )
    .unwrap();
    let img = decode(&path);
    assert_eq!((img.width, img.height), (640, 400));
    assert_eq!(img.at(0, 0), [255, 255, 255]);
    // Below the title and legend: the plot area.
    let plot_rows = 75..340;
    let up = img.pixels_of(PALETTE[0], plot_rows.clone());
    let down = img.pixels_of(PALETTE[1], plot_rows.clone());
    assert!(up.len() > 200 && down.len() > 100, "{} {}", up.len(), down.len());
    let third = |pts: &[(usize, usize)], left: bool| -> Vec<(usize, usize)> {
        pts.iter().copied().filter(|p| if left { p.0 < 250 } else { p.0 > 450 }).collect()
    };
    // Image y grows downwards: a rising series is higher (smaller y) on the right.
    assert!(mean_y(&third(&up, true)) > mean_y(&third(&up, false)) + 100.0);
    assert!(mean_y(&third(&down, true)) + 100.0 < mean_y(&third(&down, false)));
    // The dashed series has gaps: fewer pixels than the solid one of the same length.
    assert!(down.len() < up.len() * 9 / 10, "{} {}", down.len(), up.len());
    // Text: the title at the top, the y label at the left edge, numbers under the x axis.
    assert!((0..35).any(|y| (200..440).any(|x| is_text(img.at(x, y)))), "no title");
    assert!((100..300).any(|y| (0..32).any(|x| is_text(img.at(x, y)))), "no y label");
    assert!((350..400).any(|y| (100..600).any(|x| is_text(img.at(x, y)))), "no x numbers");
}

/// Heights of the runs of columns that contain `color` below row 75, left to right.
fn bar_heights(img: &Image, color: [u8; 3]) -> Vec<usize> {
    let column = |x: usize| (75..img.height).filter(|&y| img.at(x, y) == color).count();
    let mut bars = Vec::new();
    let mut in_bar = false;
    for x in 0..img.width {
        let h = column(x);
        if h > 0 && !in_bar {
            bars.push(h);
        }
        in_bar = h > 0;
    }
    bars
}

#[test]
fn bar_heights_follow_the_values_and_missing_values_draw_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bars.png");
    let chart = BarChart {
        title: "Kernels".into(),
        y_label: "ms".into(),
        categories: vec!["a".into(), "b".into(), "c".into()],
        series: vec![("first".into(), vec![10.0, 20.0, 40.0]), ("second".into(), vec![40.0, f64::NAN, 10.0])],
        y_range: Some((0.0, 50.0)),
        size: (600, 400),
        ..Default::default()
    };
    bar_chart(&path, &chart).unwrap();
    let img = decode(&path);
    assert_eq!((img.width, img.height), (600, 400));
    let first = bar_heights(&img, PALETTE[0]);
    let second = bar_heights(&img, PALETTE[1]);
    assert_eq!((first.len(), second.len()), (3, 2), "{first:?} {second:?}");
    let ratio = |a: usize, b: usize| a as f64 / b as f64;
    assert!((ratio(first[1], first[0]) - 2.0).abs() < 0.1 && (ratio(first[2], first[0]) - 4.0).abs() < 0.15, "{first:?}");
    assert!((ratio(second[0], second[1]) - 4.0).abs() < 0.15, "{second:?}");
    assert!((first[2] as i64 - second[0] as i64).abs() <= 1, "equal values, equal bars: {first:?} {second:?}");

    // Value labels are drawn (dark pixels just above the tallest bar) when asked for.
    let labelled = tmp.path().join("labelled.png");
    bar_chart(&labelled, &BarChart { value_labels: true, ..chart.clone() }).unwrap();
    let (plain, with) = (decode(&path), decode(&labelled));
    let dark = |img: &Image| img.rgb.chunks(3).filter(|c| is_text([c[0], c[1], c[2]])).count();
    assert!(dark(&with) > dark(&plain) + 100, "{} vs {}", dark(&with), dark(&plain));
}

#[test]
fn charts_that_cannot_be_drawn_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("empty.png");
    let err = line_chart(&path, &LineChart { series: vec![LineSeries::new("nan", vec![(0.0, f64::NAN)])], ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(err.contains("empty.png") && err.contains("nothing to plot"), "{err}");
    assert!(!path.exists());
    let err = bar_chart(
        &path,
        &BarChart { categories: vec!["a".into(), "b".into()], series: vec![("s".into(), vec![1.0])], ..Default::default() },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("empty.png") && err.contains("series `s` has 1 values for 2 categories"), "{err}");
    let missing = tmp.path().join("no/such/dir/c.png");
    let err = line_chart(&missing, &LineChart { series: vec![LineSeries::new("x", vec![(0.0, 1.0)])], ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("no/such/dir"), "{err}");
}

#[test]
fn metrics_reader_keeps_the_last_line_of_a_step_and_null_as_a_gap() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("metrics.jsonl");
    std::fs::write(
        &path,
        "{\"step\":1,\"loss\":2.0,\"lr\":0.1}\n{\"step\":2,\"loss\":1.5}\n{\"step\":2,\"eval_loss\":1.7}\n\n\
         {\"step\":2,\"loss\":1.4}\n{\"step\":3,\"loss\":null}\n{\"step\":4,\"other\":1}\n",
    )
    .unwrap();
    let curve = read_metrics(&path, "run").unwrap();
    assert_eq!(curve.label, "run");
    assert_eq!(curve.train[..2], [(1.0, 2.0), (2.0, 1.4)]);
    assert!(curve.train[2].0 == 3.0 && curve.train[2].1.is_nan() && curve.train.len() == 3);
    assert_eq!(curve.eval, [(2.0, 1.7)]);
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_candle-peft")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
}

fn write_metrics(path: &Path, scale: f64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut text = String::new();
    for step in 1..=40 {
        let loss = 1.0 + scale * (-(step as f64) / 10.0).exp();
        text += &serde_json::json!({ "step": step, "loss": loss, "lr": 1e-4, "tokens": 64 }).to_string();
        text += "\n";
        if step % 10 == 0 {
            text += &serde_json::json!({ "step": step, "eval_loss": loss + 0.1 }).to_string();
            text += "\n";
        }
    }
    std::fs::write(path, text).unwrap();
}

fn write_report(path: &Path, correct: [usize; 3]) {
    let mut r = EvalReport::new();
    for (task, c) in [Task::BoolQ, Task::Piqa, Task::ArcChallenge].into_iter().zip(correct) {
        r.add(task, c, 10);
    }
    r.save_json(path).unwrap();
}

#[test]
fn plot_command_draws_loss_and_accuracy() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let p = |s: &str| d.join(s).to_str().unwrap().to_string();
    write_metrics(&d.join("runs/lora/metrics.jsonl"), 1.5);
    write_metrics(&d.join("runs/dora/metrics.jsonl"), 1.0);
    write_report(&d.join("lora.json"), [6, 7, 5]);
    write_report(&d.join("dora.json"), [7, 8, 4]);

    let (ok, stdout, stderr) = cli(&[
        "plot", "--metrics", &p("runs/lora/metrics.jsonl"), "--metrics", &p("runs/dora/metrics.jsonl"),
        "--eval", &format!("{},{}", p("lora.json"), p("dora.json")), "--out", &p("charts"),
    ]);
    assert!(ok, "{stdout}{stderr}");
    for name in ["loss.png", "accuracy.png"] {
        assert!(stdout.contains(&format!("wrote {}", p(&format!("charts/{name}")))), "{stdout}");
        let img = decode(&d.join("charts").join(name));
        assert_eq!((img.width, img.height), (960, 560));
        for color in [PALETTE[0], PALETTE[1]] {
            assert!(img.pixels_of(color, 80..500).len() > 50, "{name}: too few pixels of {color:?}");
        }
    }

    // Default output folder: beside the first input; labels from --label.
    let (ok, stdout, stderr) = cli(&["plot", "--metrics", &p("runs/lora/metrics.jsonl"), "--label", "mine"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains(&p("runs/lora/loss.png")) && d.join("runs/lora/loss.png").is_file(), "{stdout}");

    let (ok, _, stderr) = cli(&["plot", "--metrics", &p("runs/lora/metrics.jsonl"), "--metrics", &p("runs/dora/metrics.jsonl"), "--label", "one"]);
    assert!(!ok && stderr.contains("one label per file"), "{stderr}");
}

#[test]
fn plot_command_names_the_file_and_line_of_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{\"step\":1,\"loss\":2.0}\n\n{\"step\":3,\"loss\":\n").unwrap();
    let (ok, _, stderr) = cli(&["plot", "--metrics", bad.to_str().unwrap()]);
    assert!(!ok && stderr.contains("bad.jsonl: line 3: invalid JSON"), "{stderr}");
    std::fs::write(&bad, "{\"step\":1,\"loss\":2.0}\n{\"step\":\"two\",\"loss\":1.0}\n").unwrap();
    let (ok, _, stderr) = cli(&["plot", "--metrics", bad.to_str().unwrap()]);
    assert!(!ok && stderr.contains("bad.jsonl: line 2: `step` must be a non-negative integer"), "{stderr}");
    std::fs::write(&bad, "{\"step\":1,\"loss\":\"low\"}\n").unwrap();
    let (ok, _, stderr) = cli(&["plot", "--metrics", bad.to_str().unwrap()]);
    assert!(!ok && stderr.contains("bad.jsonl: line 1: `loss` must be a number"), "{stderr}");

    let eval = d.join("acc.json");
    std::fs::write(&eval, "{\"tasks\": [{\"task\": \"boolq\"}]}").unwrap();
    let (ok, _, stderr) = cli(&["plot", "--eval", eval.to_str().unwrap()]);
    assert!(!ok && stderr.contains("acc.json: invalid JSON"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn plot_command_rejects_empty_inputs_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let empty = d.join("metrics.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    let (ok, _, stderr) = cli(&["plot", "--metrics", empty.to_str().unwrap()]);
    assert!(!ok && stderr.contains("metrics.jsonl: no `loss` or `eval_loss` records"), "{stderr}");

    let eval = d.join("acc.json");
    std::fs::write(&eval, "{\"tasks\": [], \"average\": null}").unwrap();
    let (ok, _, stderr) = cli(&["plot", "--eval", eval.to_str().unwrap()]);
    assert!(!ok && stderr.contains("acc.json: no task scores"), "{stderr}");

    let (ok, _, stderr) = cli(&["plot"]);
    assert!(!ok && stderr.contains("nothing to draw"), "{stderr}");

    let (ok, _, stderr) = cli(&["plot", "--metrics", d.join("absent.jsonl").to_str().unwrap()]);
    assert!(!ok && stderr.contains("absent.jsonl"), "{stderr}");
    assert!(!d.join("loss.png").exists());
}

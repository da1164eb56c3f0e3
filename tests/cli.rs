//! The `candle-peft` command end to end on a small model the test writes: finetune driven by a
//! TOML config, eval, generate, merge, and `bench methods`.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device};

fn cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_candle-peft")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "candle-peft {args:?} failed:\n{text}");
    text
}

/// A model directory (config, safetensors, tokenizer) and a dataset in the demo task's format.
fn setup(dir: &Path) {
    let (train, test) = common::write_tiny_model_dir(&dir.join("model"));
    std::fs::write(dir.join("train.json"), serde_json::to_string(&train[..60]).unwrap()).unwrap();
    std::fs::create_dir_all(dir.join("dataset/winogrande")).unwrap();
    std::fs::write(dir.join("dataset/winogrande/test.json"), serde_json::to_string(&test).unwrap()).unwrap();
}

#[test]
fn finetune_eval_generate_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    let p = |s: &str| d.join(s).to_str().unwrap().to_string();
    std::fs::write(
        d.join("run.toml"),
        format!(
            "model = \"{}\"\ndata = \"{}\"\noutput_dir = \"{}\"\nmethod = \"lora\"\nr = 4\ntarget_modules = [\"q_proj\", \"v_proj\"]\nbatch_size = 8\nmicro_batch_size = 4\nmax_steps = 3\nval_set_size = 8\neval_steps = 2\nwarmup_steps = 1\n",
            p("model"), p("train.json"), p("run")
        ),
    )
    .unwrap();
    // The command line overrides the file: r = 2, not 4.
    cli(&["finetune", "--config", &p("run.toml"), "--r", "2"]);
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("run/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["r"], 2);
    assert_eq!(cfg["target_modules"], serde_json::json!(["q_proj", "v_proj"]));
    let metrics = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"loss\"")).count(), 3);
    assert!(metrics.contains("eval_loss"));
    assert!(d.join("run/loss.png").is_file(), "finetune draws its loss curve");

    let out = cli(&["eval", "--model", &p("model"), "--adapter", &p("run"), "--dataset-dir", &p("dataset"), "--tasks", "winogrande", "--max-new-tokens", "6", "--output", &p("acc.json")]);
    assert!(out.contains("winogrande"), "{out}");
    let acc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("acc.json")).unwrap()).unwrap();
    assert!(acc.to_string().contains("winogrande"), "{acc}");
    assert!(d.join("acc.png").is_file(), "eval draws its accuracy chart: {out}");

    cli(&["generate", "--model", &p("model"), "--adapter", &p("run"), "--prompt", "She painted the old door", "--max-new-tokens", "4", "--num-beams", "2"]);

    cli(&["merge", "--model", &p("model"), "--adapter", &p("run"), "--output", &p("merged")]);
    let merged = candle_peft::loading::load_model(&p("merged"), DType::F32, &Device::Cpu).unwrap();
    assert!(merged.tokenizer.is_some());
    // merge refuses to overwrite a directory with contents
    let out = Command::new(env!("CARGO_BIN_EXE_candle-peft")).args(["merge", "--model", &p("model"), "--adapter", &p("run"), "--output", &p("merged")]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not empty"));
}

#[test]
fn bench_methods_reports_every_method_asked_for() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("bench.json");
    cli(&["bench", "methods", "--shape", "tiny", "--batch", "2", "--seq", "16", "--steps", "2", "--methods", "lora,control", "--output", json.to_str().unwrap()]);
    let reports: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[1]["method"], "control");
    assert!(reports.iter().all(|r| r["trainable_params"].as_u64().unwrap() > 0 && r["step_seconds"].as_f64().unwrap() > 0.0));
}

/// The methods on a ViT (`--shape vit-s14`, random weights; 2 blocks, 28 px images): LoRA on the
/// query maps, Parallel Control and SNELL, each with its own parameter count and the head's.
#[test]
fn bench_methods_runs_the_vision_methods_on_a_vit() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("bench.json");
    let shape = ["--shape", "vit-s14", "--layers", "2", "--batch", "2", "--seq", "28", "--steps", "2"];
    let flags = ["--r", "4", "--target-modules", "query", "--control-rank", "8", "--snell-heads", "2"];
    cli(&[&["bench", "methods", "--methods", "lora,control,snell", "--output", json.to_str().unwrap()][..], &shape, &flags].concat());
    let reports: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    let trainable: Vec<u64> = reports.iter().map(|r| r["trainable_params"].as_u64().unwrap()).collect();
    let head = 384 * 10 + 10;
    // LoRA and SNELL: 2 blocks x r 4 x (384 + 384); Control: 2 blocks x (A [8, 384] + B [384, 8]).
    assert_eq!(trainable, [2 * 4 * 768 + head, 2 * 2 * 8 * 384 + head, 2 * 4 * 768 + head]);
    assert!(reports.iter().all(|r| r["step_seconds"].as_f64().unwrap() > 0.0 && r["last_loss"].as_f64().unwrap().is_finite()));
    // Not on a GPU, nor in another dtype.
    let out = Command::new(env!("CARGO_BIN_EXE_candle-peft")).args(["bench", "step", "--dtype", "bf16"]).args(shape).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--shape vit-s14 runs on the CPU in f32 only"));
}

/// Each method runs in a `bench step` child: the adapter flags must reach it (a flag left behind
/// used to run the child with its default, e.g. SNELL's `--sparsity`).
#[test]
fn bench_methods_passes_the_adapter_flags_to_each_method() {
    let tmp = tempfile::tempdir().unwrap();
    let trainable = |extra: &[&str]| -> u64 {
        let json = tmp.path().join("bench.json");
        let base = ["bench", "methods", "--shape", "tiny", "--batch", "2", "--seq", "16", "--steps", "1", "--methods", "adalora"];
        cli(&[&base[..], extra, &["--output", json.to_str().unwrap(), "--overwrite"]].concat());
        let reports: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        reports[0]["trainable_params"].as_u64().unwrap()
    };
    let (default, three) = (trainable(&[]), trainable(&["--adalora-init-r", "3", "--adalora-target-r", "2"]));
    assert_ne!(default, three, "--adalora-init-r did not reach the method's process");
}

#[test]
fn bench_kernels_on_the_cpu_writes_a_row_per_variant_and_a_chart() {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("kernels.json");
    let args = ["--device", "cpu", "--allow-cpu", "--dtype", "f32", "--dims", "48x40", "--ranks", "4", "--tokens", "24", "--seqs", "8,24", "--attention-heads", "2", "--kv-heads", "1", "--head-dim", "8"];
    let text = cli(&[&["bench", "kernels"][..], &args, &["--iters", "1", "--warmup", "0", "--json", json.to_str().unwrap()]].concat());
    assert!(text.contains("fused LoRA"), "{text}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    // lora: frozen, unfused, fused, and (on the CPU in f32) frozen with a bf16 W; control, dora
    // and attention (two sequence lengths): unfused,
    // fused; nf4: dequantize, then at
    // one row of x the GEMV and dequantize + matmul, and at each of five row counts the few-row
    // kernel and dequantize + matmul; snell: the frozen linear, then plain and fused for each of
    // the two default sparsities.
    assert_eq!(rows.len(), 4 + 2 + 2 + 2 * 2 + (1 + 2 + 2 * 5) + 5, "{rows:?}");
    assert!(rows.iter().any(|r| r["op"] == "lora_linear" && r["variant"] == "frozen, bf16 W"));
    let attention: Vec<_> = rows.iter().filter(|r| r["op"] == "attention").collect();
    assert_eq!(attention.iter().map(|r| r["shape"].as_str().unwrap()).collect::<Vec<_>>(), ["b3 h2 g1 t8 d8", "b3 h2 g1 t8 d8", "b1 h2 g1 t24 d8", "b1 h2 g1 t24 d8"]);
    assert!(attention.iter().all(|r| r["tflops"].is_number() && r["peak_extra_mib"].is_number()));
    let nf4: Vec<_> = rows.iter().filter(|r| r["op"] == "nf4").collect();
    assert_eq!(nf4.iter().filter(|r| r["variant"] == "matmul_few").count(), 5);
    let snell: Vec<_> = rows.iter().filter(|r| r["op"] == "snell").collect();
    assert_eq!(snell.iter().filter(|r| r["variant"] == "fused").count(), 2);
    assert!(snell.iter().all(|r| r["peak_extra_mib"].is_number()));
    assert!(rows.iter().all(|r| r["ms"].as_f64().unwrap() > 0.0));
    assert!(json.with_extension("png").exists());
    // Without a GPU and without --allow-cpu, a clear refusal.
    let out = Command::new(env!("CARGO_BIN_EXE_candle-peft")).args(["bench", "kernels", "--device", "cpu"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-cpu"));
    let text = cli(&["bench", "snell", "--device", "cpu", "--allow-cpu", "--dtype", "f32", "--dims", "40x56", "--tokens", "8", "--sparsities", "0.9", "--snell-rank", "8", "--iters", "1", "--warmup", "0"]);
    assert!(text.contains("40x56 r8 s0.9 T8") && text.contains("plain candle ops") && text.contains("fused"), "{text}");
}

/// `--unfused` reaches the model's own layer ops on the CPU too (RMSNorm, SwiGLU, rotary,
/// attention, cross-entropy), not only the adapters': IA3 has no fused adapter op, so the two runs
/// differ only there. The fused ops keep less for backward (attention: no probabilities) and give
/// the same losses.
#[test]
fn unfused_reaches_the_models_layer_ops_on_the_cpu() {
    let step = |extra: &[&str]| -> serde_json::Value {
        let args = [&["bench", "step", "--shape", "tiny", "--batch", "2", "--seq", "512", "--steps", "2", "--method", "ia3"][..], extra].concat();
        let text = cli(&args);
        serde_json::from_str(text.lines().rev().find(|l| l.starts_with('{')).unwrap()).unwrap()
    };
    let (fused, unfused) = (step(&[]), step(&["--unfused"]));
    let peak = |r: &serde_json::Value| r["peak_extra_mib"].as_f64().unwrap();
    // Measured 85-95 MiB fused against 250-265 MiB unfused alone; beside other tests the fused
    // run has reached 1.5x its usual peak (RSS), hence a margin this wide.
    assert!(peak(&unfused) > 1.5 * peak(&fused), "--unfused did not change the layer ops: {fused} against {unfused}");
    for key in ["first_loss", "last_loss"] {
        let (a, b) = (fused[key].as_f64().unwrap(), unfused[key].as_f64().unwrap());
        assert!((a - b).abs() < 1e-4 * a.abs(), "{key}: {a} against {b}");
    }
}

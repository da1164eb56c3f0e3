//! Bad input through the command line, as a user gives it: each case must end in a clean error
//! (exit code 1, a message naming the flag, file or record), never a panic (101) or an abort
//! (134), and must leave every file the user had exactly as it was.

mod common;

use std::path::Path;
use std::process::Command;

/// Runs the CLI; returns (exit code, stdout + stderr).
fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_candle-peft")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// The command fails cleanly and says `needle`.
fn refused(args: &[&str], needle: &str) {
    let (code, text) = run(args);
    assert_eq!(code, 1, "candle-peft {args:?} should fail with a clean error, got exit {code}:\n{text}");
    assert!(text.contains(needle), "candle-peft {args:?}: the error should say `{needle}`:\n{text}");
    assert!(!text.contains("panicked"), "candle-peft {args:?} panicked:\n{text}");
}

fn setup(dir: &Path) {
    let (train, _) = common::write_tiny_model_dir(&dir.join("model"));
    std::fs::write(dir.join("train.json"), serde_json::to_string(&train[..24]).unwrap()).unwrap();
}

#[test]
fn finetune_numbers_out_of_range_are_refused_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    let (model, data, out) = (d.join("model"), d.join("train.json"), d.join("run"));
    let base = ["finetune", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--output-dir", out.to_str().unwrap(), "--max-steps", "1", "--val-set-size", "0"];
    let cases: &[(&[&str], &str)] = &[
        (&["--batch-size", "0"], "--batch-size 0"),
        (&["--micro-batch-size", "3"], "--batch-size 16 must be a multiple of --micro-batch-size 3"),
        (&["--lora-dropout", "1"], "--lora-dropout 1"),
        (&["--max-grad-norm", "0"], "--max-grad-norm 0"),
        (&["--learning-rate=-1"], "--learning-rate -1"),
        (&["--learning-rate", "NaN"], "--learning-rate NaN"),
        (&["--learning-rate", "inf"], "--learning-rate inf"),
        (&["--num-epochs", "1e300"], "--num-epochs"),
        (&["--cutoff-len", "0"], "--cutoff-len 0"),
        (&["--r", "1099511627776"], "--r 1099511627776"),
        (&["--r", "0"], "--r 0"),
        (&["--sparsity", "1", "--method", "snell"], "--sparsity 1"),
        (&["--control-rank", "8"], "--control-rank is not a flag of --method lora"),
        (&["--pad-token-id", "4000000000"], "--pad-token-id 4000000000"),
    ];
    for (extra, needle) in cases {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        refused(&args, needle);
        assert!(!out.join("adapter_model.safetensors").exists(), "{extra:?} trained anyway");
    }
}

#[test]
fn a_rank_past_the_layers_width_is_refused_before_it_is_allocated() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    let model = d.join("model");
    // From the command line: a rank of 2^20 fits the flag's range but not the model (width 64).
    let (data, out) = (d.join("train.json"), d.join("run"));
    refused(
        &["finetune", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--output-dir", out.to_str().unwrap(), "--r", "65536"],
        "r = 65536 is larger than the layer itself",
    );
    // From an adapter file: 2^40 aborted the process before the shapes were compared.
    let adapter = d.join("huge-r");
    std::fs::create_dir_all(&adapter).unwrap();
    let config = serde_json::json!({"peft_type": "LORA", "r": 1u64 << 40, "lora_alpha": 16, "target_modules": ["q_proj"]});
    std::fs::write(adapter.join("adapter_config.json"), config.to_string()).unwrap();
    std::fs::write(adapter.join("adapter_model.safetensors"), b"").unwrap();
    refused(&["generate", "--model", model.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--prompt", "a"], "larger than the layer itself");
}

#[test]
fn outputs_never_replace_what_the_user_has() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    let model = d.join("model");
    let (data, run_dir) = (d.join("train.json"), d.join("run"));
    let train = |extra: &[&str]| {
        let mut args = vec!["finetune", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--output-dir", run_dir.to_str().unwrap()];
        args.extend_from_slice(&["--r", "2", "--max-steps", "1", "--batch-size", "4", "--micro-batch-size", "4", "--val-set-size", "0"]);
        args.extend_from_slice(extra);
        run(&args)
    };
    let (code, text) = train(&[]);
    assert_eq!(code, 0, "{text}");
    let adapter = std::fs::read(run_dir.join("adapter_model.safetensors")).unwrap();

    // A second run into the finished run's folder, without --resume.
    let (code, text) = train(&[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("--resume"), "{text}");
    assert_eq!(std::fs::read(run_dir.join("adapter_model.safetensors")).unwrap(), adapter);

    // merge --output onto a file, and onto a folder that holds something.
    let file = d.join("notes.txt");
    std::fs::write(&file, "mine").unwrap();
    refused(&["merge", "--model", model.to_str().unwrap(), "--adapter", run_dir.to_str().unwrap(), "--output", file.to_str().unwrap()], "is a file");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    let folder = d.join("folder");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("config.json"), "{}").unwrap();
    refused(&["merge", "--model", model.to_str().unwrap(), "--adapter", run_dir.to_str().unwrap(), "--output", folder.to_str().unwrap()], "is not empty");
    assert_eq!(std::fs::read_to_string(folder.join("config.json")).unwrap(), "{}");
    assert_eq!(std::fs::read_dir(d).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.')).count(), 0, "no hidden leftovers");

    // eval --output onto an existing report.
    let report = d.join("acc.json");
    std::fs::write(&report, "earlier").unwrap();
    refused(&["eval", "--model", model.to_str().unwrap(), "--output", report.to_str().unwrap()], "--overwrite");
    assert_eq!(std::fs::read_to_string(&report).unwrap(), "earlier");
}

#[test]
fn a_prompt_past_the_models_context_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    let model = d.join("model");
    // The tiny model's context is 512 tokens; every word of the demo's vocabulary is one token.
    let prompt = vec!["door"; 600].join(" ");
    refused(&["generate", "--model", model.to_str().unwrap(), "--prompt", &prompt], "past the model's context of 512 tokens");
    refused(&["generate", "--model", model.to_str().unwrap(), "--prompt", "door", "--max-new-tokens", "1000"], "past the model's context");
    refused(&["generate", "--model", model.to_str().unwrap(), "--prompt", "door", "--num-beams", "0"], "--num-beams 0");
}

#[test]
fn bench_numbers_out_of_range_are_refused_naming_the_flag() {
    let cpu = ["--allow-cpu", "--device", "cpu", "--dtype", "f32", "--ops", "lora", "--dims", "64x64", "--tokens", "8", "--ranks", "2", "--warmup", "0"];
    let cases: &[(&[&str], &str)] = &[
        (&["bench", "step", "--shape", "tiny", "--steps", "0"], "--steps 0"),
        (&["bench", "step", "--shape", "tiny", "--batch", "0"], "--batch 0"),
        (&["bench", "step", "--shape", "tiny", "--seq", "1"], "--seq 1"),
        (&["bench", "step", "--shape", "tiny", "--layers", "0"], "--layers 0"),
        (&["bench", "methods", "--shape", "tiny", "--methods", "lorra"], "unknown method `lorra`"),
    ];
    for (args, needle) in cases {
        refused(args, needle);
    }
    for (flag, value) in [("--iters", "0"), ("--tokens", "0"), ("--ranks", "0")] {
        let mut args = vec!["bench", "kernels"];
        args.extend_from_slice(&cpu);
        args.extend_from_slice(&[flag, value]);
        refused(&args, &format!("{flag} 0"));
    }
}

#[test]
fn report_files_are_replaced_only_when_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let metrics = d.join("run/metrics.jsonl");
    std::fs::create_dir_all(metrics.parent().unwrap()).unwrap();
    std::fs::write(&metrics, "{\"step\":1,\"loss\":2.0}\n{\"step\":2,\"loss\":1.5}\n").unwrap();
    let chart = d.join("run/loss.png");
    std::fs::write(&chart, "my chart").unwrap();
    refused(&["plot", "--metrics", metrics.to_str().unwrap()], "--overwrite");
    assert_eq!(std::fs::read_to_string(&chart).unwrap(), "my chart");
    let (code, text) = run(&["plot", "--metrics", metrics.to_str().unwrap(), "--overwrite"]);
    assert_eq!(code, 0, "{text}");
    assert_ne!(std::fs::read(&chart).unwrap(), b"my chart", "replaced when asked");

    let json = d.join("kernels.json");
    std::fs::write(&json, "earlier").unwrap();
    let cpu = ["bench", "kernels", "--allow-cpu", "--device", "cpu", "--dtype", "f32", "--ops", "lora", "--dims", "64x64", "--tokens", "8", "--ranks", "2", "--warmup", "0", "--iters", "1"];
    let mut args = cpu.to_vec();
    args.extend_from_slice(&["--json", json.to_str().unwrap()]);
    refused(&args, "--overwrite");
    assert_eq!(std::fs::read_to_string(&json).unwrap(), "earlier");
}

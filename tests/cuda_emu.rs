//! The CUDA training path end to end, on the CPU emulator of the CUDA path (kernels/emu): a few
//! training steps of each method with `--device cuda` give the losses of the same steps on the
//! CPU. This runs the model's CUDA ops (flash-style attention, frozen linears, the fused adapter
//! ops, NF4 on the device, gradient checkpointing) and the trainer on CUDA tensors, which the
//! selftest's per-kernel checks do not.
//!
//! Ignored by a plain `cargo test`: it needs a `--features cuda` binary and the emulator built
//! for it, and fails (never skips) without them:
//!
//!   cargo build --release --features cuda --target-dir target/cuda
//!   scripts/cuda_emu.sh target/cuda/release/candle-peft target/cuda-emu
//!   CANDLE_PEFT_CUDA_BIN=target/cuda/release/candle-peft CANDLE_PEFT_CUDA_EMU=target/cuda-emu \
//!       cargo test --release --test cuda_emu -- --ignored

mod common;

use std::path::PathBuf;
use std::process::Command;

/// Max |CUDA − CPU| of a loss in f32 (seen: about 1e-6, the order of the reductions).
const TOLERANCE: f64 = 1e-5;

fn env_path(name: &str) -> PathBuf {
    let v = std::env::var_os(name).unwrap_or_else(|| panic!("{name} is not set (see the top of tests/cuda_emu.rs)"));
    let p = PathBuf::from(v);
    assert!(p.exists(), "{name}={} does not exist", p.display());
    std::fs::canonicalize(&p).unwrap()
}

/// The stdout of the CUDA build run with `args` on the emulator; a failure shows both streams.
fn run_emulated(args: &[&str]) -> String {
    run_emulated_with(args, &[])
}

/// `run_emulated` with extra environment variables (the emulator's settings).
fn run_emulated_with(args: &[&str], env: &[(&str, &str)]) -> String {
    let (bin, emu) = (env_path("CANDLE_PEFT_CUDA_BIN"), env_path("CANDLE_PEFT_CUDA_EMU"));
    let out = Command::new(&bin).args(args).env("LD_LIBRARY_PATH", &emu).envs(env.iter().copied()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "candle-peft {args:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// (first_loss, last_loss) of `bench step` on `device`.
fn losses(device: &str, args: &[&str]) -> (f64, f64) {
    let common = ["bench", "step", "--shape", "tiny", "--batch", "2", "--seq", "32", "--steps", "3", "--device", device];
    let stdout = run_emulated(&[&common[..], args].concat());
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON summary in:\n{stdout}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    (v["first_loss"].as_f64().unwrap(), v["last_loss"].as_f64().unwrap())
}

fn same_losses(args: &[&str]) {
    let (cpu, cuda) = (losses("cpu", args), losses("cuda", args));
    assert!((cpu.0 - cpu.1).abs() > TOLERANCE, "{args:?}: the steps did not move the loss ({cpu:?}), the comparison would prove nothing");
    assert!(
        (cpu.0 - cuda.0).abs() <= TOLERANCE && (cpu.1 - cuda.1).abs() <= TOLERANCE,
        "{args:?}: CPU losses {cpu:?}, CUDA (emulated) {cuda:?}"
    );
}

#[test]
#[ignore = "needs a --features cuda binary and scripts/cuda_emu.sh (see the top of this file)"]
fn every_method_trains_on_the_cuda_path_as_on_the_cpu() {
    for method in [
        "lora", "rslora", "dora", "ia3", "control", "double_control", "control_lora", "nonlinear_control", "pissa", "olora", "eva",
        "adalora", "sift", "full", "galore", "snell",
    ] {
        same_losses(&["--method", method]);
    }
}

#[test]
#[ignore = "needs a --features cuda binary and scripts/cuda_emu.sh (see the top of this file)"]
fn nf4_bases_checkpointing_and_the_unfused_path_train_on_cuda_as_on_the_cpu() {
    for method in ["lora", "dora", "control", "snell"] {
        same_losses(&["--method", method, "--quantize", "nf4"]);
        same_losses(&["--method", method, "--gradient-checkpointing"]);
        same_losses(&["--method", method, "--unfused"]);
    }
    // What the GPU session's QLoRA / QControl step runs.
    for method in ["lora", "control"] {
        same_losses(&["--method", method, "--quantize", "nf4", "--gradient-checkpointing"]);
    }
    same_losses(&["--method", "snell", "--sparsity", "0.99"]);
}

#[test]
#[ignore = "needs a --features cuda binary and scripts/cuda_emu.sh (see the top of this file)"]
fn the_cublas_attention_trains_on_cuda_as_on_the_cpu() {
    // The model's attention and the nonlinear controller's token mixing, whole and recomputed.
    for method in ["lora", "nonlinear_control"] {
        same_losses(&["--method", method, "--attention-kernel", "gemm"]);
    }
    same_losses(&["--method", "lora", "--attention-kernel", "gemm", "--quantize", "nf4", "--gradient-checkpointing"]);
}

/// What `generate` prints for one prompt on `device`.
fn generated(model: &std::path::Path, device: &str, args: &[&str]) -> String {
    let common = ["generate", "--model", model.to_str().unwrap(), "--prompt", "She painted the old door", "--max-new-tokens", "6", "--device", device];
    run_emulated(&[&common[..], args].concat())
}

#[test]
#[ignore = "needs a --features cuda binary and scripts/cuda_emu.sh (see the top of this file)"]
fn decoding_on_an_nf4_base_generates_on_cuda_what_it_generates_on_the_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    common::write_tiny_model_dir(&model);
    // Greedy decoding takes the NF4 GEMV (one row), four beams the few-row matmul.
    for beams in ["1", "4"] {
        let args = ["--quantize", "nf4", "--num-beams", beams];
        let (cpu, cuda) = (generated(&model, "cpu", &args), generated(&model, "cuda", &args));
        assert!(!cpu.trim().is_empty(), "nothing generated");
        assert_eq!(cpu, cuda, "{args:?}");
    }
}

/// The rows of one `bench` command's JSON report on the emulated CUDA device.
fn bench_rows(args: &[&str]) -> Vec<serde_json::Value> {
    let tmp = tempfile::tempdir().unwrap();
    let json = tmp.path().join("bench.json");
    let common = ["--dtype", "f32", "--warmup", "0", "--iters", "1", "--json", json.to_str().unwrap()];
    run_emulated(&[&["bench"][..], args, &common].concat());
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    report["rows"].as_array().unwrap().clone()
}

/// The peak extra device memory (MiB) of the row of `variant` whose shape contains `shape`.
fn peak(rows: &[serde_json::Value], variant: &str, shape: &str) -> f64 {
    let row = rows
        .iter()
        .find(|r| r["variant"] == variant && r["shape"].as_str().unwrap().contains(shape))
        .unwrap_or_else(|| panic!("no {variant} {shape} row in {rows:?}"));
    row["peak_extra_mib"].as_f64().unwrap()
}

const MIB: f64 = 1048576.0;

/// Issue #7's memory target on the CUDA path, counted exactly by the emulator: SNELL's fused op
/// keeps no [d_in, d_out] buffer from forward to backward and holds at most one such transient
/// at a time (dense apply), none at all at 1% survivors (sparse apply); its plain candle ops hold
/// many.
#[test]
#[ignore = "needs a --features cuda binary and scripts/cuda_emu.sh (see the top of this file)"]
fn snells_fused_op_on_cuda_holds_at_most_one_update_sized_buffer() {
    let (d_in, d_out) = (512usize, 768usize);
    let rows = bench_rows(&["snell", "--dims", &format!("{d_in}x{d_out}"), "--tokens", "16", "--sparsities", "0.5,0.99", "--snell-rank", "32"]);
    let update = (d_in * d_out * 4) as f64 / MIB;
    let frozen = peak(&rows, "frozen linear", "T16");
    let (dense, sparse) = (peak(&rows, "fused", "s0.5"), peak(&rows, "fused", "s0.99"));
    assert!(dense - frozen <= 1.5 * update, "dense fused apply: {dense} MiB against the frozen linear's {frozen}, one update is {update}");
    assert!(sparse - frozen <= 0.5 * update, "sparse fused apply: {sparse} MiB against the frozen linear's {frozen}, one update is {update}");
    assert!(peak(&rows, "plain candle ops", "s0.5") >= 4.0 * update, "the plain ops should hold several updates (or the count is broken)");
}

/// Issue #3's LoRA linear on the CUDA path, counted by the emulator: besides what the frozen
/// linear holds (x, y, dx), the fused op holds only its [T, r] intermediates and the adapter's
/// gradients, no [T, d_out] buffer; the unfused candle graph holds several.
#[test]
#[ignore = "needs a --features cuda binary and scripts/cuda_emu.sh (see the top of this file)"]
fn the_fused_lora_linear_on_cuda_writes_no_output_sized_intermediate() {
    let (d_in, d_out, t) = (512usize, 768usize, 256usize);
    let rows = bench_rows(&["kernels", "--ops", "lora", "--dims", &format!("{d_in}x{d_out}"), "--ranks", "16", "--tokens", &t.to_string()]);
    let output = (t * d_out * 4) as f64 / MIB;
    let frozen = peak(&rows, "frozen linear", "r16");
    let (fused, unfused) = (peak(&rows, "fused LoRA", "r16"), peak(&rows, "unfused LoRA", "r16"));
    assert!(fused - frozen <= 0.5 * output, "fused: {fused} MiB against the frozen linear's {frozen}, one [T, d_out] is {output}");
    assert!(unfused - frozen >= output, "unfused: {unfused} MiB against {frozen}: the plain graph should hold [T, d_out] intermediates");
}

/// Issue #3's DoRA norms on the CUDA path, counted by the emulator: `‖W + s·B A‖` per row without
/// `W + s·B A` in memory (the unfused graph holds it, and more).
#[test]
#[ignore = "needs a --features cuda binary and scripts/cuda_emu.sh (see the top of this file)"]
fn doras_fused_row_norms_on_cuda_never_hold_the_updated_weight() {
    let (d_in, d_out) = (512usize, 768usize);
    let rows = bench_rows(&["kernels", "--ops", "dora", "--dims", &format!("{d_in}x{d_out}")]);
    let weight = (d_in * d_out * 4) as f64 / MIB;
    let (fused, unfused) = (peak(&rows, "fused", "r64"), peak(&rows, "unfused", "r64"));
    assert!(fused <= 0.1 * weight, "fused: {fused} MiB, one [out, in] in f32 is {weight}");
    assert!(unfused >= weight, "unfused: {unfused} MiB: the plain graph should hold W + s·B A");
}

/// The JSON report of one `bench step` on the emulated device.
fn step_report(args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let stdout = run_emulated_with(&[&["bench", "step", "--device", "cuda", "--dtype", "bf16"][..], args].concat(), env);
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON summary in:\n{stdout}"));
    serde_json::from_str(line).unwrap()
}

/// `CUDA_EMU_MEMORY_ONLY=1` (no kernel runs, allocations only) counts the device memory the full
/// emulation counts, to the byte: what the BENCHMARKS' LLaMA-7B memory figures rest on.
#[test]
#[ignore = "needs a --features cuda binary and scripts/cuda_emu.sh (see the top of this file)"]
fn counting_allocations_only_gives_the_full_emulations_device_memory() {
    let tiny = ["--shape", "tiny", "--batch", "2", "--seq", "32", "--steps", "2"];
    for method in [
        &["--method", "lora", "--quantize", "nf4", "--gradient-checkpointing"][..],
        &["--method", "control", "--quantize", "nf4"],
        &["--method", "dora"],
        &["--method", "adalora"],
    ] {
        let args = [&tiny[..], method].concat();
        let (full, counted) = (step_report(&args, &[]), step_report(&args, &[("CUDA_EMU_MEMORY_ONLY", "1")]));
        for key in ["gpu_peak_extra_mib", "gpu_loaded_mib"] {
            assert!(full[key].as_f64().unwrap() > 0.0, "{method:?}: no {key} in {full}");
            assert_eq!(full[key], counted[key], "{method:?}: {key}");
        }
        assert_ne!(full["first_loss"], counted["first_loss"], "{method:?}: the counting run should not have computed the loss");
    }
}

/// The training loss never holds the [tokens, vocab] logits on the CUDA path (LLaMA-2-7B's
/// vocabulary and width, one decoder layer, batch 16 x 256, counted by the emulator without
/// running kernels): at the step's peak no buffer of the f32 logits' size is live (the
/// logits-then-loss graph held eleven of them there, 5.4 GiB).
#[test]
#[ignore = "needs a --features cuda binary and scripts/cuda_emu.sh (see the top of this file)"]
fn the_loss_on_cuda_never_holds_the_whole_logits() {
    let args = ["bench", "step", "--device", "cuda", "--dtype", "bf16", "--shape", "llama2-7b", "--layers", "1", "--quantize", "nf4"];
    let args = [&args[..], &["--batch", "16", "--seq", "256", "--steps", "1", "--method", "lora", "--r", "32", "--gradient-checkpointing"]].concat();
    let (bin, emu) = (env_path("CANDLE_PEFT_CUDA_BIN"), env_path("CANDLE_PEFT_CUDA_EMU"));
    let out = Command::new(&bin)
        .args(&args)
        .env("LD_LIBRARY_PATH", &emu)
        .envs([("CUDA_EMU_MEMORY_ONLY", "1"), ("CUDA_EMU_PEAK_REPORT", "1")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "candle-peft {args:?} failed:\n{stderr}");
    // "cuda-emu:     250.00 x 2 = 500.0 MiB, first launch after: ...": the buffers at the peak.
    let sizes: Vec<f64> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("cuda-emu:"))
        .filter(|l| l.contains(" x "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(sizes.len() > 5, "no peak report in:\n{stderr}");
    let logits = (16.0 * 255.0 * 32000.0 * 4.0) / MIB;
    let largest = sizes.iter().cloned().fold(0.0, f64::max);
    assert!(largest < logits, "a {largest:.1} MiB buffer is live at the peak; the f32 logits are {logits:.1} MiB:\n{stderr}");
}

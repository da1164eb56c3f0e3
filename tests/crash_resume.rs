//! A real `candle-peft finetune` killed with SIGKILL at random instants (inside a step, inside a
//! checkpoint save, inside the final save) and resumed each time must end with the adapter, the
//! optimizer state and the metrics of a run that was never interrupted, bit for bit.
//!
//! `CRASH_TRIALS` sets how many killed-and-resumed runs (default 3; the benchmark document records
//! a long run). Each trial kills the run until it completes.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::{Rng, SeedableRng};

fn finetune(dir: &Path, out: &Path, resume: bool) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_candle-peft"));
    let (model, data) = (dir.join("model"), dir.join("train.json"));
    cmd.args(["finetune", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--output-dir", out.to_str().unwrap()]);
    cmd.args(["--r", "4", "--max-steps", "12", "--batch-size", "4", "--micro-batch-size", "2", "--val-set-size", "4"]);
    cmd.args(["--eval-steps", "4", "--save-steps", "1", "--warmup-steps", "2", "--learning-rate", "1e-2", "--lora-dropout", "0.1"]);
    if resume {
        cmd.arg("--resume");
    }
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("stderr.log")).unwrap();
    cmd.stdout(Stdio::null()).stderr(Stdio::from(log));
    cmd
}

/// What must match: the final adapter, the newest checkpoint's optimizer state and trainer
/// state, and the training lines of the metrics (their timings aside).
fn outcome(out: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![
        ("adapter_model.safetensors".to_string(), std::fs::read(out.join("adapter_model.safetensors")).unwrap()),
        ("adapter_config.json".to_string(), std::fs::read(out.join("adapter_config.json")).unwrap()),
    ];
    let last = out.join("checkpoints/step-000000012");
    for f in ["optimizer.safetensors", "trainer_state.json", "adapter_model.safetensors"] {
        files.push((format!("checkpoint {f}"), std::fs::read(last.join(f)).unwrap_or_else(|e| panic!("{}: {e}", last.join(f).display()))));
    }
    let metrics: String = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for timing in ["tokens_per_s", "elapsed_s"] {
                v.as_object_mut().unwrap().remove(timing);
            }
            format!("{v}\n")
        })
        .collect();
    files.push(("metrics.jsonl".to_string(), metrics.into_bytes()));
    files
}

#[test]
fn killed_and_resumed_runs_equal_the_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (train, _) = common::write_tiny_model_dir(&d.join("model"));
    std::fs::write(d.join("train.json"), serde_json::to_string(&train[..40]).unwrap()).unwrap();

    let whole = d.join("whole");
    let status = finetune(d, &whole, false).status().unwrap();
    assert!(status.success());
    let expected = outcome(&whole);
    // How long a whole run takes bounds the kill instants.
    let start = std::time::Instant::now();
    let status = finetune(d, &d.join("timing"), false).status().unwrap();
    assert!(status.success());
    let span = start.elapsed().as_millis().max(20) as u64;

    let trials: usize = std::env::var("CRASH_TRIALS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut kills = 0;
    for trial in 0..trials {
        let out = d.join(format!("trial-{trial}"));
        let mut resume = false;
        loop {
            let mut child = finetune(d, &out, resume).spawn().unwrap();
            std::thread::sleep(Duration::from_millis(rng.random_range(0..span)));
            let finished = child.try_wait().unwrap();
            if finished.is_none() {
                child.kill().unwrap(); // SIGKILL
                kills += 1;
            }
            let status = child.wait().unwrap();
            if finished.is_some() {
                let log = std::fs::read_to_string(d.join("stderr.log")).unwrap_or_default();
                assert!(status.success(), "trial {trial}: the run failed by itself:\n{log}");
                break;
            }
            resume = true;
        }
        let got = outcome(&out);
        for ((name, a), (_, b)) in got.iter().zip(&expected) {
            assert!(a == b, "trial {trial}: {name} differs from the uninterrupted run's");
        }
    }
    eprintln!("{trials} trials, {kills} kills, every result bit for bit the uninterrupted run's");
    assert!(kills > 0 || trials == 0, "no run was ever killed: the kill instants are wrong");
}

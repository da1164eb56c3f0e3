//! A corpus of malformed user files, made here from real ones, each given to the `candle-peft`
//! command the way a user would: a GGUF to `convert`, a model folder (config, weights, tokenizer)
//! and an adapter folder to `generate`, a dataset and a run config to `finetune`. Every run must
//! end in success or a clean error (exit 0, 1, or clap's 2 for a flag value it cannot parse): never
//! a panic (101), an abort (134) or a signal,
//! which an in-process fuzzer cannot survive to report. `CORPUS_SIZE` sets the inputs per kind
//! (default 40, 320 in all).

mod common;

use std::path::Path;
use std::process::Command;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A few byte-level damages of `seed`: flips, extreme integers, cuts, repeats.
fn damage(seed: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..rng.random_range(1..4) {
        if b.len() < 16 {
            break;
        }
        let at = rng.random_range(0..b.len() - 8);
        match rng.random_range(0..4) {
            0 => b[at] ^= 1 << rng.random_range(0..8),
            1 => {
                let v: u64 = [0, u32::MAX as u64, 1 << 40, 1 << 62, u64::MAX][rng.random_range(0..5)];
                b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            2 => b.truncate(at),
            _ => {
                let piece = b[at..(at + 16).min(b.len())].to_vec();
                b.splice(at..at, piece);
            }
        }
    }
    b
}

/// Exit code, or a description of how the process ended otherwise.
fn outcome(args: &[&str]) -> Result<i32, String> {
    let out = Command::new(env!("CARGO_BIN_EXE_candle-peft")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    match out.status.code() {
        // 2: clap's usage error for a value it cannot parse, which names the flag.
        Some(c @ (0..=2)) if !text.contains("panicked") => Ok(c),
        Some(c) => Err(format!("exit {c}: {}", text.lines().rev().take(3).collect::<Vec<_>>().join(" | "))),
        None => Err(format!("killed by a signal ({:?}): {}", out.status, text.lines().last().unwrap_or(""))),
    }
}

#[test]
fn every_malformed_file_ends_in_success_or_a_clean_error() {
    let n: usize = std::env::var("CORPUS_SIZE").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (train, _) = common::write_tiny_model_dir(&d.join("model"));
    std::fs::write(d.join("train.json"), serde_json::to_string(&train[..8]).unwrap()).unwrap();
    let model = d.join("model");
    let fixtures = common::fixture("");
    let mut rng = StdRng::seed_from_u64(11);
    let mut failures = Vec::new();
    let mut cleanly_refused = 0;
    let mut check = |what: String, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match outcome(&args) {
            Ok(1 | 2) => cleanly_refused += 1,
            Ok(_) => {}
            Err(e) => failures.push(format!("{what}: {e}")),
        }
    };
    let s = |p: &Path| p.to_str().unwrap().to_string();

    // A model folder whose one file is damaged: config.json, model.safetensors or tokenizer.json.
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        let seed = std::fs::read(model.join(file)).unwrap();
        for i in 0..n {
            let dir = d.join(format!("model-{file}-{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in ["config.json", "model.safetensors", "tokenizer.json"] {
                std::fs::copy(model.join(f), dir.join(f)).unwrap();
            }
            std::fs::write(dir.join(file), damage(&seed, &mut rng)).unwrap();
            check(format!("{file} #{i}"), ["generate", "--model", &s(&dir), "--prompt", "the door", "--max-new-tokens", "2"].map(String::from).to_vec());
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
    // A pre-quantized bitsandbytes checkpoint whose weights file is damaged.
    let bnb = fixtures.join("nf4/tiny-llama-bnb-4bit");
    let seed = std::fs::read(bnb.join("model.safetensors")).unwrap();
    for i in 0..n {
        let dir = d.join(format!("bnb-{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(bnb.join(f), dir.join(f)).unwrap();
        }
        std::fs::write(dir.join("model.safetensors"), damage(&seed, &mut rng)).unwrap();
        check(format!("bnb-4bit model.safetensors #{i}"), ["generate", "--model", &s(&dir), "--prompt", "the lazy fox", "--max-new-tokens", "2"].map(String::from).to_vec());
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // An adapter folder whose config or tensors are damaged, on PEFT's fixture model.
    let peft = fixtures.join("peft");
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        let seed = std::fs::read(peft.join("lora_r4_all").join(file)).unwrap();
        for i in 0..n {
            let dir = d.join(format!("adapter-{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in ["adapter_config.json", "adapter_model.safetensors"] {
                std::fs::copy(peft.join("lora_r4_all").join(f), dir.join(f)).unwrap();
            }
            std::fs::write(dir.join(file), damage(&seed, &mut rng)).unwrap();
            // The fixture model has no tokenizer: merge exercises the adapter without one.
            let out = d.join(format!("merged-{i}"));
            check(format!("{file} #{i}"), ["merge", "--model", &s(&peft.join("tiny-llama")), "--adapter", &s(&dir), "--output", &s(&out)].map(String::from).to_vec());
            let _ = std::fs::remove_dir_all(&out);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
    // A dataset and a run config, given to finetune.
    let data_seed = std::fs::read(d.join("train.json")).unwrap();
    let toml_seed = b"learning_rate = 1e-3\nr = 2\nmax_steps = 1\nbatch_size = 4\nmicro_batch_size = 4\nval_set_size = 0\n".to_vec();
    for i in 0..n {
        let data = d.join(format!("data-{i}.json"));
        std::fs::write(&data, damage(&data_seed, &mut rng)).unwrap();
        let out = d.join(format!("run-d{i}"));
        check(format!("dataset #{i}"), ["finetune", "--model", &s(&model), "--data", &s(&data), "--output-dir", &s(&out), "--r", "2", "--max-steps", "1", "--batch-size", "4", "--micro-batch-size", "4", "--val-set-size", "0"].map(String::from).to_vec());
        let config = d.join(format!("run-{i}.toml"));
        std::fs::write(&config, damage(&toml_seed, &mut rng)).unwrap();
        let out = d.join(format!("run-t{i}"));
        check(format!("run config #{i}"), ["finetune", "--config", &s(&config), "--model", &s(&model), "--data", &s(&d.join("train.json")), "--output-dir", &s(&out)].map(String::from).to_vec());
    }
    // GGUF files given to convert.
    let gguf = d.join("seed.gguf");
    candle_peft::loading::convert::gguf_to_hf_dir(&gguf, &d.join("unused")).unwrap_err(); // not there yet: an error, not a panic
    common::write_tiny_gguf(&gguf);
    let seed = std::fs::read(&gguf).unwrap();
    for i in 0..n {
        let bad = d.join(format!("bad-{i}.gguf"));
        std::fs::write(&bad, damage(&seed, &mut rng)).unwrap();
        let out = d.join(format!("converted-{i}"));
        check(format!("gguf #{i}"), ["convert", "--gguf", &s(&bad), "--output", &s(&out)].map(String::from).to_vec());
        let _ = std::fs::remove_dir_all(&out);
    }
    eprintln!("{} inputs, {cleanly_refused} refused with a clean error, {} failures", 8 * n, failures.len());
    assert!(failures.is_empty(), "{} inputs did not end cleanly:\n{}", failures.len(), failures.join("\n"));
    assert!(cleanly_refused > n, "too few inputs were refused ({cleanly_refused}): the damage does not reach the parsers");
}

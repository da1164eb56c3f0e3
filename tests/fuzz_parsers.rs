//! A mutation fuzzer over every parser a user's file goes through, on stable Rust: each target
//! starts from real files (the PEFT and bitsandbytes fixtures, a GGUF written here, the demo's
//! dataset, a run config) and feeds the parser mutated copies (bit flips, extreme integers at
//! aligned offsets, truncation, duplicated and inserted bytes). Any panic fails the test with the
//! target, the iteration and the input saved under `target/fuzz-failures/`; a clean error is
//! what the parser must give.
//!
//! `FUZZ_ITERS` sets the mutations per target (default 200, a few seconds in all; the benchmark
//! document records a long run).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One mutation of `seed`.
fn mutate(seed: &[u8], rng: &mut StdRng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..rng.random_range(1..4) {
        if b.is_empty() {
            b.push(rng.random());
            continue;
        }
        let at = rng.random_range(0..b.len());
        match rng.random_range(0..7) {
            0 => b[at] ^= 1 << rng.random_range(0..8),
            1 => b[at] = [0u8, 0xff, 0x7f, 0x80, b'"', b'{', b'9'][rng.random_range(0..7)],
            2 => {
                // An extreme integer where a length, a count, a dimension or an offset may sit.
                let at = at & !3;
                let v: u64 = [0, 1, u32::MAX as u64, 1 << 31, 1 << 40, 1 << 62, u64::MAX][rng.random_range(0..7)];
                let n = if rng.random() { 8 } else { 4 }.min(b.len() - at);
                b[at..at + n].copy_from_slice(&v.to_le_bytes()[..n]);
            }
            3 => b.truncate(at),
            4 => {
                let end = (at + rng.random_range(1..64)).min(b.len());
                let piece = b[at..end].to_vec();
                b.splice(at..at, piece);
            }
            5 => {
                let junk: Vec<u8> = (0..rng.random_range(1..16)).map(|_| rng.random()).collect();
                b.splice(at..at, junk);
            }
            _ => {
                let end = (at + rng.random_range(1..32)).min(b.len());
                b.drain(at..end);
            }
        }
    }
    b
}

/// A parser under test: it reads the file at the path it is given; errors are fine, panics not.
struct Target {
    name: &'static str,
    seed: PathBuf,
    parse: Box<dyn Fn(&Path)>,
}

fn targets(dir: &Path) -> Vec<Target> {
    let fixtures = common::fixture("");
    let gguf = dir.join("seed.gguf");
    common::write_tiny_gguf(&gguf);
    let (train, _) = candle_peft::demo::task(0, 4);
    let dataset = dir.join("seed.json");
    std::fs::write(&dataset, serde_json::to_string(&train[..6]).unwrap()).unwrap();
    let toml = dir.join("seed.toml");
    std::fs::write(&toml, "learning_rate = 3e-4\ntarget_modules = [\"q_proj\", \"v_proj\"]\nresume = true\nr = 8\n").unwrap();
    vec![
        Target {
            name: "gguf",
            seed: gguf,
            parse: Box::new(|p| {
                let _ = candle_peft::loading::gguf::load_gguf(p, DType::F32, &Device::Cpu);
            }),
        },
        Target {
            name: "safetensors",
            seed: fixtures.join("peft/lora_r4_all/adapter_model.safetensors"),
            parse: Box::new(|p| {
                if let Ok(w) = candle_peft::weights::Weights::from_safetensors(&[p.to_path_buf()]) {
                    for n in w.names() {
                        let _ = w.get_any(&n, DType::F32, &Device::Cpu);
                    }
                }
            }),
        },
        Target {
            name: "nf4 checkpoint (safetensors)",
            seed: fixtures.join("nf4/tiny-llama-bnb-4bit/model.safetensors"),
            parse: Box::new(|p| {
                if let Ok(w) = candle_peft::weights::Weights::from_safetensors(&[p.to_path_buf()]) {
                    let _ = candle_peft::quant::Nf4Tensor::from_bnb(&w, "model.layers.0.mlp.down_proj.weight", &Device::Cpu)
                        .and_then(|q| q.dequantize(DType::F32));
                }
            }),
        },
        Target {
            name: "model config.json",
            seed: fixtures.join("nf4/tiny-llama-bnb-4bit/config.json"),
            parse: Box::new(|p| {
                let _ = candle_peft::model::LlamaConfig::from_file(p);
            }),
        },
        Target {
            name: "adapter_config.json",
            seed: fixtures.join("peft/dora_r4_all/adapter_config.json"),
            parse: Box::new(|p| {
                if let Ok(v) = candle_peft::error::read_json::<serde_json::Value>(p) {
                    let _ = candle_peft::adapters::AdapterConfig::from_peft_json(&v, p);
                }
            }),
        },
        Target {
            name: "tokenizer.json",
            seed: fixtures.join("nf4/tiny-llama-bf16/tokenizer.json"),
            parse: Box::new(|p| {
                if let Ok(text) = std::fs::read_to_string(p) {
                    if let Ok(t) = candle_peft::loading::parse_tokenizer(&text) {
                        let _ = t.encode("the quick brown fox", true);
                    }
                }
            }),
        },
        Target {
            name: "dataset",
            seed: dataset,
            parse: Box::new(|p| {
                let _ = candle_peft::data::dataset::load_examples(p);
            }),
        },
        Target {
            name: "run config (TOML)",
            seed: toml,
            parse: Box::new(|p| {
                let _ = candle_peft::cli::config_file::config_flags(p);
            }),
        },
    ]
}

/// Every input that once made a parser panic (`tests/fixtures/fuzz-regressions`, named after the
/// target and the iteration that found it), replayed on every run.
#[test]
fn the_inputs_that_once_panicked_are_clean_errors() {
    let dir = common::fixture("fuzz-regressions");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let result = if name.starts_with("gguf-") {
            candle_peft::loading::gguf::load_gguf(&path, DType::F32, &Device::Cpu).map(|_| ())
        } else if name.starts_with("tokenizer-") {
            candle_peft::loading::parse_tokenizer(&std::fs::read_to_string(&path).unwrap()).map(|_| ())
        } else {
            panic!("{name}: no target for it");
        };
        let e = result.expect_err(&name).to_string();
        assert!(!e.is_empty(), "{name}");
        seen += 1;
    }
    assert!(seen >= 8, "only {seen} regression inputs in {}", dir.display());
}

#[test]
fn the_seeds_parse() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("seed.gguf");
    common::write_tiny_gguf(&gguf);
    // A seed that fails at once would leave the parser behind its first check untested.
    candle_peft::loading::gguf::load_gguf(&gguf, DType::F32, &Device::Cpu).unwrap();
}

#[test]
fn no_parser_panics_on_mutated_files() {
    let iters: usize = std::env::var("FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let tmp = tempfile::tempdir().unwrap();
    let failures_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
    // Panics are caught here: the hook keeps each one's message and place instead of printing it.
    static LAST_PANIC: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());
    std::panic::set_hook(Box::new(|info| *LAST_PANIC.lock().unwrap() = info.to_string()));
    let mut failures = Vec::new();
    for (t, target) in targets(tmp.path()).into_iter().enumerate() {
        let seed = std::fs::read(&target.seed).unwrap_or_else(|e| panic!("{}: {e}", target.seed.display()));
        let mut rng = StdRng::seed_from_u64(t as u64);
        let input = tmp.path().join(format!("input-{t}"));
        let start = std::time::Instant::now();
        for i in 0..iters {
            let bytes = mutate(&seed, &mut rng);
            std::fs::write(&input, &bytes).unwrap();
            if catch_unwind(AssertUnwindSafe(|| (target.parse)(&input))).is_err() {
                std::fs::create_dir_all(&failures_dir).unwrap();
                let saved = failures_dir.join(format!("{}-{i}", target.name.replace([' ', '(', ')', '.'], "_")));
                std::fs::write(&saved, &bytes).unwrap();
                let what = LAST_PANIC.lock().unwrap().clone();
                failures.push(format!("{} iteration {i}: {what}; input saved as {}", target.name, saved.display()));
            }
        }
        eprintln!("{}: {iters} inputs in {:.1} s", target.name, start.elapsed().as_secs_f64());
    }
    let _ = std::panic::take_hook();
    assert!(failures.is_empty(), "{} panics:\n{}", failures.len(), failures.join("\n"));
}

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

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
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
    write_gguf(&gguf);
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

/// A small LLaMA GGUF: the metadata a loader reads and a few quantized tensors.
fn write_gguf(path: &Path) {
    use gguf_file::Value as V;
    let md = [
        ("general.architecture", V::String("llama".into())),
        ("llama.block_count", V::U32(1)),
        ("llama.embedding_length", V::U32(32)),
        ("llama.feed_forward_length", V::U32(64)),
        ("llama.attention.head_count", V::U32(4)),
        ("llama.attention.head_count_kv", V::U32(2)),
        ("llama.context_length", V::U32(128)),
        ("tokenizer.ggml.model", V::String("gpt2".into())),
        ("tokenizer.ggml.tokens", V::Array(["<s>", "</s>", "a", "b", "ab"].map(|t| V::String(t.into())).to_vec())),
        ("tokenizer.ggml.merges", V::Array(vec![V::String("a b".into())])),
        ("tokenizer.ggml.eos_token_id", V::U32(1)),
    ];
    let w = |rows: usize, cols: usize, ty| QTensor::quantize(&Tensor::randn(0f32, 0.1, (rows, cols), &Device::Cpu).unwrap(), ty).unwrap();
    let norm = || QTensor::quantize(&Tensor::ones(32, DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
    let tensors = [
        ("token_embd.weight", w(5, 32, GgmlDType::Q8_0)),
        ("blk.0.attn_q.weight", w(32, 32, GgmlDType::F32)),
        ("blk.0.attn_k.weight", w(16, 32, GgmlDType::F16)),
        ("blk.0.attn_v.weight", w(16, 32, GgmlDType::Q4_1)),
        ("blk.0.attn_output.weight", w(32, 32, GgmlDType::Q8_0)),
        ("blk.0.ffn_gate.weight", w(64, 32, GgmlDType::Q4_0)),
        ("blk.0.ffn_up.weight", w(64, 32, GgmlDType::Q4_0)),
        ("blk.0.ffn_down.weight", w(32, 64, GgmlDType::Q4_0)),
        ("blk.0.attn_norm.weight", norm()),
        ("blk.0.ffn_norm.weight", norm()),
        ("output_norm.weight", norm()),
    ];
    let md: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut std::fs::File::create(path).unwrap(), &md, &ts).unwrap();
}

#[test]
fn the_seeds_parse() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("seed.gguf");
    write_gguf(&gguf);
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

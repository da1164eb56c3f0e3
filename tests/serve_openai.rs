//! The official `openai` Python client and curl against `serve`: completions and chat, streamed
//! and whole, for the base and two adapters interleaved, each answer equal to `generate`'s greedy
//! answer for its adapter; an unknown model is the client's NotFoundError (404).
//!
//! Needs a Python with `openai` (tests/reference/openai-requirements.txt; .ci/run makes it):
//! `CANDLE_PEFT_OPENAI_PYTHON=... cargo test --release --test serve_openai -- --ignored`.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

#[test]
#[ignore = "needs the openai Python client: see the file's doc comment"]
fn the_openai_client_and_curl_get_generates_answers() {
    let python = std::env::var_os("CANDLE_PEFT_OPENAI_PYTHON").expect("CANDLE_PEFT_OPENAI_PYTHON is not set (a python with tests/reference/openai-requirements.txt)");
    let dir = tempfile::tempdir().unwrap();
    let (model, one, two) = (dir.path().join("model"), dir.path().join("one"), dir.path().join("two"));
    common::write_tiny_model_dir(&model);
    common::write_lora_adapter(&model, &one, 1, &["q_proj", "v_proj", "down_proj"]);
    common::write_lora_adapter(&model, &two, 2, &["k_proj", "o_proj", "up_proj"]);
    let spec = |name: &str, p: &Path| format!("{name}={}", p.display());
    let s = common::start_server(&["--model", model.to_str().unwrap(), "--name", "base", "--adapter", &spec("one", &one), "--adapter", &spec("two", &two)]);

    let prompts = ["She painted the old door", "The river ran"];
    let models: [(&str, Option<&Path>); 3] = [("base", None), ("one", Some(&one)), ("two", Some(&two))];
    // Interleaved: base, one, two, base, ... each prompt, streamed and whole.
    let mut requests = Vec::new();
    let mut want = Vec::new();
    for p in prompts {
        for stream in [false, true] {
            for (name, adapter) in models {
                requests.push(json!({ "model": name, "prompt": p, "max_tokens": 10, "chat": false, "stream": stream }));
                want.push(json!(common::generate_greedy(&model, adapter, p, 10)));
            }
        }
    }
    // Chat, whole and streamed, agree with each other.
    for stream in [false, true] {
        requests.push(json!({ "model": "one", "prompt": prompts[1], "max_tokens": 8, "chat": true, "stream": stream }));
    }
    requests.push(json!({ "model": "three", "prompt": "x", "max_tokens": 4, "chat": false, "stream": false }));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/openai_client.py");
    let out = Command::new(python).arg(script).arg(&s.url).arg(Value::from(requests.clone()).to_string()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let n = want.len();
    assert_eq!(got[..n], want[..], "{requests:?}");
    assert!(got[n].is_string() && got[n] == got[n + 1], "chat whole {} against streamed {}", got[n], got[n + 1]);
    assert_eq!(got[n + 2], json!({ "error": 404 }));

    // curl, streamed: the data lines' text is the answer.
    let body = json!({ "model": "two", "prompt": prompts[0], "max_tokens": 10, "temperature": 0, "stream": true }).to_string();
    let curl = Command::new("curl").args(["-sSN", &format!("{}/v1/completions", s.url), "-H", "Content-Type: application/json", "-d", &body]).output().unwrap();
    assert!(curl.status.success(), "{}", String::from_utf8_lossy(&curl.stderr));
    let text: String = String::from_utf8(curl.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    // want[2]: the first prompt, adapter two.
    assert_eq!(json!(text), want[2]);
}

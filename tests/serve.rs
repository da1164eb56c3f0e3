//! `serve` end to end on a tiny model directory with two LoRA adapters the test writes: the
//! OpenAI endpoints whole and streamed, each answer equal to `generate`'s greedy answer for its
//! adapter, 32 concurrent clients over mixed adapters each getting its single-request answer,
//! every error case with the server healthy afterwards, a client that leaves mid-stream or while
//! waiting for a whole answer, a full queue, and SIGTERM.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;

use common::{start_server as start, write_lora_adapter as write_adapter, Server};
use serde_json::{json, Value};

/// POST `body`: the status and the JSON answer (error statuses included).
fn post(s: &Server, path: &str, body: &str) -> (u16, Value) {
    let r = ureq::post(&format!("{}{path}", s.url)).set("Content-Type", "application/json").send_string(body);
    let response = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("POST {path}: {e}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}")))
}

fn get(s: &Server, path: &str) -> (u16, String) {
    let r = ureq::get(&format!("{}{path}", s.url)).call().unwrap();
    (r.status(), r.into_string().unwrap())
}

/// The text of a non-streamed answer.
fn completion(s: &Server, model: &str, prompt: &str, max_tokens: usize) -> String {
    let (status, body) = post(s, "/v1/completions", &json!({ "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0 }).to_string());
    assert_eq!(status, 200, "{body}");
    body["choices"][0]["text"].as_str().unwrap().to_string()
}

/// The data lines of a streamed answer, `[DONE]` last.
fn streamed(s: &Server, path: &str, body: Value) -> Vec<String> {
    let r = ureq::post(&format!("{}{path}", s.url)).set("Content-Type", "application/json").send_string(&body.to_string()).unwrap();
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    BufReader::new(r.into_reader()).lines().map(Result::unwrap).filter_map(|l| l.strip_prefix("data: ").map(str::to_string)).collect()
}

fn metric(s: &Server, name: &str) -> f64 {
    let (_, text) = get(s, "/metrics");
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or_else(|| panic!("{name} not in {text}"))
}

/// A tiny model directory and two LoRA adapters on different layers, in `dir`.
fn tiny_model_with_two_adapters(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let (model, one, two) = (dir.join("model"), dir.join("one"), dir.join("two"));
    common::write_tiny_model_dir(&model);
    write_adapter(&model, &one, 1, &["q_proj", "v_proj", "down_proj"]);
    write_adapter(&model, &two, 2, &["k_proj", "o_proj", "up_proj"]);
    (model, one, two)
}

/// `serve` over the model with the adapters as `one` and `two`, batches of up to 8, and `flags`.
fn serve_two(model: &Path, one: &Path, two: &Path, flags: &[&str]) -> Server {
    let spec = |name: &str, p: &Path| format!("{name}={}", p.display());
    let (one, two) = (spec("one", one), spec("two", two));
    start(&[&["--model", model.to_str().unwrap(), "--adapter", &one, "--adapter", &two, "--max-batch", "8"], flags].concat())
}

/// `clients` greedy requests of 10 tokens at once, client i asking `pick(i)` = (model, prompt):
/// each client's model, prompt and answer.
fn concurrent(s: &Server, clients: usize, pick: impl Fn(usize) -> (&'static str, &'static str)) -> Vec<(&'static str, &'static str, String)> {
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (name, p) = pick(i);
            let url = s.url.clone();
            std::thread::spawn(move || {
                let body = json!({ "model": name, "prompt": p, "max_tokens": 10, "temperature": 0 }).to_string();
                let r: Value = ureq::post(&format!("{url}/v1/completions")).set("Content-Type", "application/json").send_string(&body).unwrap().into_json().unwrap();
                (name, p, r["choices"][0]["text"].as_str().unwrap().to_string())
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn adapters_kept_in_bf16_answer_as_generate_does_with_the_same_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (model, one, two) = tiny_model_with_two_adapters(dir.path());
    let s = serve_two(&model, &one, &two, &["--adapter-dtype", "bf16"]);
    let prompts = ["She painted the old door", "The river ran"];
    let mut answers = std::collections::HashMap::new();
    for (name, adapter) in [("one", &one), ("two", &two)] {
        for p in prompts {
            let got = completion(&s, name, p, 10);
            assert_eq!(got, common::generate_greedy_with(&model, Some(adapter), p, 10, &["--adapter-dtype", "bf16"]), "{name}, {p:?}");
            answers.insert((name, p), got);
        }
    }
    // Mixed in one batch, each still its single-request answer.
    for (name, p, got) in concurrent(&s, 12, |i| (["one", "two"][i % 2], prompts[(i / 2) % 2])) {
        assert_eq!(got, answers[&(name, p)], "{name}, {p:?} among 12 clients");
    }
    drop(s);
    // A dtype it does not know is refused at the start, naming the flag.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_candle-peft")).args(["serve", "--model", model.to_str().unwrap(), "--adapter-dtype", "f8", "--port", "0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--adapter-dtype") && err.contains("f8"), "{err}");
}

#[test]
fn serves_the_base_and_two_adapters_like_generate_and_survives_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (model, one, two) = tiny_model_with_two_adapters(dir.path());
    let s = serve_two(&model, &one, &two, &["--name", "base"]);

    let (status, body) = get(&s, "/v1/models");
    let ids: Vec<String> = serde_json::from_str::<Value>(&body).unwrap()["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    assert_eq!((status, ids), (200, vec!["base".to_string(), "one".into(), "two".into()]));

    // Each model's greedy answer is generate's, and the adapters change it.
    let prompts = ["She painted the old door", "The river ran", "A small red"];
    let mut answers = std::collections::HashMap::new();
    for (name, adapter) in [("base", None), ("one", Some(one.as_path())), ("two", Some(two.as_path()))] {
        for p in prompts {
            let got = completion(&s, name, p, 10);
            assert_eq!(got, common::generate_greedy(&model, adapter, p, 10), "{name}, {p:?}");
            answers.insert((name, p), got);
        }
    }
    assert!(prompts.iter().any(|p| answers[&("one", *p)] != answers[&("base", *p)]), "adapter one changes nothing: {answers:?}");
    assert!(prompts.iter().any(|p| answers[&("two", *p)] != answers[&("one", *p)]), "adapters one and two agree: {answers:?}");

    // Streamed: the pieces make the same text; the last chunk says why it ended, then the usage, then [DONE].
    let events = streamed(&s, "/v1/completions", json!({ "model": "two", "prompt": prompts[0], "max_tokens": 10, "temperature": 0, "stream": true, "stream_options": { "include_usage": true } }));
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"].get(0).and_then(|c| c["text"].as_str())).collect();
    assert_eq!(text, answers[&("two", prompts[0])]);
    let usage = &chunks.last().unwrap()["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 0 && usage["total_tokens"].as_u64() == Some(usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()), "{usage}");
    assert!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"].is_string());

    // Chat, whole and streamed, agree (ChatML: the tiny model has no template of its own).
    let chat = json!({ "model": "one", "messages": [{ "role": "user", "content": "The river ran" }], "max_tokens": 8, "temperature": 0 });
    let (status, whole) = post(&s, "/v1/chat/completions", &chat.to_string());
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    let mut stream_req = chat.clone();
    stream_req["stream"] = json!(true);
    let events = streamed(&s, "/v1/chat/completions", stream_req);
    let text: String = events.iter().filter(|e| *e != "[DONE]").filter_map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"].as_str().map(str::to_string)).collect();
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());

    // 32 concurrent clients over the three models: each gets its single-request answer.
    for (name, p, got) in concurrent(&s, 32, |i| (["base", "one", "two"][i % 3], prompts[(i / 3) % 3])) {
        assert_eq!(got, answers[&(name, p)], "{name}, {p:?} among 32 clients");
    }
    assert!(metric(&s, "candle_peft_batch_rows_bucket{le=\"1\"}") < metric(&s, "candle_peft_batch_rows_count"), "no step ever decoded more than one row");

    // Seeded sampling is reproducible.
    let sampled = |seed: u64| {
        let (_, b) = post(&s, "/v1/completions", &json!({ "model": "one", "prompt": "The river ran", "max_tokens": 12, "temperature": 1.5, "seed": seed }).to_string());
        b["choices"][0]["text"].as_str().unwrap().to_string()
    };
    assert_eq!(sampled(5), sampled(5));

    // Bad requests: the status, OpenAI's error object, and a healthy server afterwards.
    let long = "door ".repeat(600);
    let cases: [(&str, String, u16, &str); 7] = [
        ("/v1/completions", json!({ "model": "three", "prompt": "x" }).to_string(), 404, "model `three` does not exist"),
        ("/v1/completions", "{\"model\": \"base\", \"prompt\": ".into(), 400, "not a valid request"),
        ("/v1/completions", json!({ "model": "base", "prompt": long, "max_tokens": 4 }).to_string(), 400, "context of 512 tokens"),
        ("/v1/completions", json!({ "model": "base", "prompt": "x", "max_tokens": 100000 }).to_string(), 400, "`max_tokens` is 100000"),
        ("/v1/completions", json!({ "model": "base", "prompt": "x", "top_p": 0 }).to_string(), 400, "top-p"),
        ("/v1/completions", json!({ "model": "base", "prompt": "x", "n": 2 }).to_string(), 400, "`n` must be 1"),
        ("/v1/chat/completions", json!({ "model": "base", "messages": [] }).to_string(), 400, "`messages` is empty"),
    ];
    for (path, body, want, says) in cases {
        let (status, answer) = post(&s, path, &body);
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(status == want && message.contains(says), "{body:.80}: {status} {answer}");
        assert_eq!(get(&s, "/health").0, 200);
    }
    assert!(metric(&s, "candle_peft_requests_total{status=\"4xx\"}") >= 7.0);

    // A client that leaves mid-stream frees its row: the answer stops short of its 500 tokens.
    let generated = metric(&s, "candle_peft_generation_tokens_total");
    let mut conn = std::net::TcpStream::connect(s.url.strip_prefix("http://").unwrap()).unwrap();
    let body = json!({ "model": "one", "prompt": "She painted", "max_tokens": 500, "temperature": 1.0, "ignore_eos": true, "stream": true }).to_string();
    write!(conn, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut first = [0u8; 64];
    conn.read_exact(&mut first).unwrap();
    drop(conn);
    let freed = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        metric(&s, "candle_peft_requests_cancelled_total") >= 1.0 && metric(&s, "candle_peft_running_requests") == 0.0
    });
    assert!(freed, "the row of the client that left is still decoding");
    let spent = metric(&s, "candle_peft_generation_tokens_total") - generated;
    assert!(spent < 500.0, "the answer went on to its end ({spent} tokens) after the client left");
    eprintln!("the client left; its row decoded {spent} tokens");

    // So does a client that leaves while waiting for a whole (non-streamed) answer.
    let (generated, cancelled) = (metric(&s, "candle_peft_generation_tokens_total"), metric(&s, "candle_peft_requests_cancelled_total"));
    let mut conn = std::net::TcpStream::connect(s.url.strip_prefix("http://").unwrap()).unwrap();
    let body = json!({ "model": "two", "prompt": "She painted", "max_tokens": 500, "temperature": 1.0, "ignore_eos": true }).to_string();
    write!(conn, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let started = (0..200).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(5));
        metric(&s, "candle_peft_running_requests") >= 1.0
    });
    assert!(started, "the request never started");
    drop(conn);
    let freed = (0..100).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        metric(&s, "candle_peft_requests_cancelled_total") > cancelled && metric(&s, "candle_peft_running_requests") == 0.0
    });
    assert!(freed, "the row of the client that left a whole answer is still decoding");
    let spent = metric(&s, "candle_peft_generation_tokens_total") - generated;
    assert!(spent < 500.0, "the whole answer went on to its end ({spent} tokens) after the client left");
    assert_eq!(completion(&s, "base", prompts[1], 10), answers[&("base", prompts[1])]);

    // SIGTERM: the server stops by itself.
    let mut s = s;
    // SAFETY: a plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) }, 0);
    let stopped = (0..100).find_map(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        s.child.try_wait().unwrap()
    });
    assert!(stopped.is_some_and(|st| st.success()), "after SIGTERM: {stopped:?}");
}

#[test]
fn a_full_queue_is_answered_429() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    common::write_tiny_model_dir(&model);
    let s = start(&["--model", model.to_str().unwrap(), "--name", "base", "--max-batch", "1", "--queue-size", "1"]);
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let url = s.url.clone();
            std::thread::spawn(move || {
                let body = json!({ "model": "base", "prompt": "She painted the old door", "max_tokens": 200, "temperature": 1.0 }).to_string();
                match ureq::post(&format!("{url}/v1/completions")).set("Content-Type", "application/json").send_string(&body) {
                    Ok(r) => (r.status(), String::new()),
                    Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
                    Err(e) => panic!("{e}"),
                }
            })
        })
        .collect();
    let answers: Vec<(u16, String)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(answers.iter().any(|(c, _)| *c == 200), "{answers:?}");
    let full: Vec<_> = answers.iter().filter(|(c, _)| *c == 429).collect();
    assert!(!full.is_empty() && full.iter().all(|(_, b)| b.contains("the queue is full")), "{answers:?}");
    assert_eq!(get(&s, "/health").0, 200);
}

fn delete(s: &Server, path: &str) -> (u16, Value) {
    let r = match ureq::delete(&format!("{}{path}", s.url)).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("DELETE {path}: {e}"),
    };
    (r.status(), serde_json::from_str(&r.into_string().unwrap()).unwrap())
}

#[test]
fn adapters_load_unload_and_take_turns_in_a_bounded_resident_set() {
    let dir = tempfile::tempdir().unwrap();
    let (model, one, two, three) = (dir.path().join("model"), dir.path().join("one"), dir.path().join("two"), dir.path().join("three"));
    common::write_tiny_model_dir(&model);
    write_adapter(&model, &one, 1, &["q_proj", "v_proj", "down_proj"]);
    write_adapter(&model, &two, 2, &["k_proj", "o_proj", "up_proj"]);
    write_adapter(&model, &three, 3, &["gate_proj", "q_proj"]);
    let spec = |name: &str, p: &Path| format!("{name}={}", p.display());
    // One adapter resident at a time: every switch evicts the other.
    let s = start(&["--model", model.to_str().unwrap(), "--name", "base", "--adapter", &spec("one", &one), "--adapter", &spec("two", &two), "--max-resident-adapters", "1"]);
    let p = "She painted the old door";
    let want = |adapter: &Path| common::generate_greedy(&model, Some(adapter), p, 10);
    let (want_one, want_two, want_three) = (want(&one), want(&two), want(&three));
    assert_ne!(want_one, want_two);
    for (name, w) in [("one", &want_one), ("two", &want_two), ("one", &want_one)] {
        assert_eq!(&completion(&s, name, p, 10), w, "{name}");
    }
    let (_, list) = get(&s, "/v1/adapters");
    let list: Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["data"], json!([{ "id": "one", "resident": true }, { "id": "two", "resident": false }]));
    // Concurrent requests for both: they take turns, each with its own answer.
    let threads: Vec<_> = (0..6)
        .map(|i| {
            let url = s.url.clone();
            std::thread::spawn(move || {
                let name = ["one", "two"][i % 2];
                let body = json!({ "model": name, "prompt": "She painted the old door", "max_tokens": 10, "temperature": 0 }).to_string();
                let r: Value = ureq::post(&format!("{url}/v1/completions")).set("Content-Type", "application/json").send_string(&body).unwrap().into_json().unwrap();
                (name, r["choices"][0]["text"].as_str().unwrap().to_string())
            })
        })
        .collect();
    for t in threads {
        let (name, got) = t.join().unwrap();
        assert_eq!(got, if name == "one" { want_one.clone() } else { want_two.clone() }, "{name}");
    }

    // Loaded at run time from a directory: listed, and answering as generate does.
    let load = |name: &str, path: &str| post(&s, "/v1/adapters", &json!({ "name": name, "path": path }).to_string());
    let (status, answer) = load("three", three.to_str().unwrap());
    assert_eq!(status, 200, "{answer}");
    assert!(get(&s, "/v1/models").1.contains("\"three\""));
    assert_eq!(completion(&s, "three", p, 10), want_three);
    let (status, answer) = load("three", three.to_str().unwrap());
    assert!(status == 409 && answer["error"]["message"].as_str().unwrap().contains("taken"), "{answer}");
    let (status, answer) = load("four", dir.path().join("nowhere").to_str().unwrap());
    assert!(status == 400 && answer["error"]["message"].as_str().unwrap().contains("nowhere"), "{answer}");
    // Unloaded: gone from the models, its requests 404.
    assert_eq!(delete(&s, "/v1/adapters/three").0, 200);
    let (status, _) = post(&s, "/v1/completions", &json!({ "model": "three", "prompt": p }).to_string());
    assert_eq!(status, 404);
    assert_eq!(delete(&s, "/v1/adapters/three").0, 404);
    assert_eq!(completion(&s, "two", p, 10), want_two);
    assert_eq!(get(&s, "/health").0, 200);
}

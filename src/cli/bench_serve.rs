//! `candle-peft bench serve`: the server under concurrent clients, the base alone against
//! `--adapters` LoRA adapters mixed in every batch (request i asks for adapter i mod N), in one
//! run: generated tokens per second over all clients, and each request's latency (p50, p99).
//!
//! The server runs in this process as `serve` runs it (the engine on this thread, HTTP on its
//! own), the clients on threads of their own over loopback, each sending `--requests` requests
//! one after another. Every request generates exactly `--max-tokens` tokens (`ignore_eos`), so
//! the modes do the same work. The adapters are random LoRA pairs of rank `--rank` on the seven
//! linear layers: what is measured is their cost, not their answers.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde::Serialize;
use serde_json::json;

use super::commands::require_tokenizer;
use super::ModelArgs;
use crate::adapters::{inject, AdapterConfig, LoraConfig, Targets};
use crate::error::{Error, Result};

#[derive(Args, Debug, Clone)]
pub struct BenchServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub adapter_dtype: super::AdapterDtypeArgs,
    /// LoRA adapters served beside the base.
    #[arg(long, default_value_t = 8)]
    pub adapters: usize,
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    /// Concurrent clients of each measurement.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub clients: Vec<usize>,
    /// Requests each client sends, one after another.
    #[arg(long, default_value_t = 2)]
    pub requests: usize,
    /// Tokens each request generates.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// Write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Replace an existing --json file.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServeFigure {
    pub clients: usize,
    /// "base" or "mixed".
    pub mode: String,
    pub tokens_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Random LoRA pairs on every linear layer of a model over `base`'s weights.
fn random_adapter(base: &crate::model::Llama, rank: usize, seed: u64, dtype: &super::AdapterDtypeArgs) -> Result<crate::model::Llama> {
    let mut m = base.share_base();
    let targets = crate::model::llama::LINEAR_NAMES.iter().map(|s| s.to_string()).collect();
    let cfg = AdapterConfig::new(LoraConfig { r: rank, lora_alpha: 2.0 * rank as f64, lora_dropout: 0.0, target_modules: Targets::List(targets), use_rslora: false, use_dora: false });
    inject(&mut m, &cfg, seed)?;
    for (_, var) in m.trainable_params() {
        let noise = candle_core::Tensor::randn(0f32, 0.01, var.shape(), var.device())?;
        var.set(&(var.as_tensor() + noise)?)?;
    }
    dtype.apply(&mut m)?;
    Ok(m)
}

/// One POST over its own connection: the status and the body.
fn post(addr: SocketAddr, body: &str) -> Result<(u16, String)> {
    let io = |e: std::io::Error| Error::msg(format!("bench serve: {addr}: {e}"));
    let mut s = std::net::TcpStream::connect(addr).map_err(io)?;
    write!(s, "POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).map_err(io)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(io)?;
    let status = answer.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((status, body))
}

/// `clients` clients sending `requests` requests each to `model_of(client, request)`.
fn measure(addr: SocketAddr, args: &BenchServeArgs, clients: usize, model_of: impl Fn(usize, usize) -> String + Sync) -> Result<(f64, Vec<f64>)> {
    let prompts = ["The history of the city", "Write a story about a lighthouse", "The three primary colors are", "A recipe for bread:"];
    let start = Instant::now();
    let results: Vec<Result<Vec<f64>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let model_of = &model_of;
                scope.spawn(move || {
                    let mut latencies = Vec::new();
                    for r in 0..args.requests {
                        let body = json!({ "model": model_of(c, r), "prompt": prompts[(c + r) % prompts.len()], "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": true }).to_string();
                        let t = Instant::now();
                        let (status, answer) = post(addr, &body)?;
                        if status != 200 {
                            return Err(Error::msg(format!("bench serve: status {status}: {answer}")));
                        }
                        latencies.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                    Ok(latencies)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(Error::msg("bench serve: a client panicked")))).collect()
    });
    let seconds = start.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    for r in results {
        latencies.extend(r?);
    }
    let tokens = (clients * args.requests * args.max_tokens) as f64;
    Ok((tokens / seconds, latencies))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((p * (sorted.len() - 1) as f64).round() as usize).min(sorted.len() - 1)]
}

pub fn serve(args: &BenchServeArgs) -> Result<Vec<ServeFigure>> {
    crate::validate::int_in("adapters", args.adapters, 1, 256)?;
    crate::validate::int_in("rank", args.rank, 1, 1024)?;
    crate::validate::int_in("requests", args.requests, 1, 10_000)?;
    crate::validate::int_in("max-tokens", args.max_tokens, 1, 1 << 16)?;
    args.adapter_dtype.dtype()?;
    if args.clients.is_empty() || args.clients.iter().any(|&c| c == 0 || c > 1024) {
        return Err(Error::msg("--clients: each between 1 and 1024"));
    }
    if let Some(path) = &args.json {
        crate::fsutil::refuse_to_replace(std::slice::from_ref(path), "--json", args.overwrite)?;
    }
    let loaded = super::commands::load_with_adapter(&args.model, None, true)?;
    let tokenizer = require_tokenizer(&loaded)?.clone();
    let template = super::eval_cmd::chat_template(&args.model.model, &loaded.model.config, &tokenizer)?;
    let rank = args.rank;
    let adapters: Vec<(String, crate::serving::registry::Loader)> = (0..args.adapters)
        .map(|i| {
            let dtype = args.adapter_dtype.clone();
            (format!("adapter-{i}"), std::sync::Arc::new(move |base: &crate::model::Llama| random_adapter(base, rank, i as u64, &dtype)) as crate::serving::registry::Loader)
        })
        .collect();
    let most = args.clients.iter().copied().max().unwrap_or(1);
    let eos = loaded.model.config.eos_token_ids.clone();
    let config = crate::serving::ServerConfig {
        base_name: "base".into(),
        base: loaded.model,
        adapters,
        max_resident: args.adapters,
        path_loader: None,
        tokenizer,
        template,
        eos_token_ids: eos.clone(),
        chat_eos_token_ids: eos,
        host: "127.0.0.1".into(),
        port: 0,
        max_batch: most,
        queue_size: most.max(8),
        max_tokens_limit: args.max_tokens,
    };
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let n = args.adapters;
    let clients = std::thread::scope(|scope| {
        let clients = scope.spawn(move || -> Result<Vec<ServeFigure>> {
            let addr: SocketAddr = addr_rx.recv().map_err(|_| Error::msg("bench serve: the server did not start"))?;
            let run = || -> Result<Vec<ServeFigure>> {
                // Warm-up: pages, the thread pool, every adapter once.
                measure(addr, args, n.min(8), |c, _| format!("adapter-{c}"))?;
                let mut out = Vec::new();
                for &c in &args.clients {
                    for mode in ["base", "mixed"] {
                        let (tok_s, mut lat) = if mode == "base" {
                            measure(addr, args, c, |_, _| "base".to_string())?
                        } else {
                            measure(addr, args, c, |c, r| format!("adapter-{}", (c + r * 7) % n))?
                        };
                        lat.sort_by(f64::total_cmp);
                        let figure = ServeFigure { clients: c, mode: mode.into(), tokens_per_s: tok_s, p50_ms: percentile(&lat, 0.5), p99_ms: percentile(&lat, 0.99) };
                        eprintln!("{c} clients, {mode}: {tok_s:.1} tokens/s");
                        out.push(figure);
                    }
                }
                Ok(out)
            };
            let out = run();
            let _ = stop_tx.send(());
            out
        });
        let served = crate::serving::serve_with(
            config,
            |addr| {
                let _ = addr_tx.send(addr);
            },
            async {
                let _ = stop_rx.await;
            },
        );
        let figures = clients.join().unwrap_or_else(|_| Err(Error::msg("bench serve: the clients panicked")));
        served.and(figures)
    })?;
    print!("{}", table(&clients, args));
    if let Some(path) = &args.json {
        super::bench_args::write_json(path, &clients)?;
    }
    Ok(clients)
}

pub fn table(figures: &[ServeFigure], args: &BenchServeArgs) -> String {
    let mut out = format!(
        "{} ({} LoRA adapters of rank {} in {}, {} requests per client of {} tokens, {} threads)\n{:>8} {:>6} {:>10} {:>9} {:>9} {:>12}\n",
        args.model.model,
        args.adapters,
        args.rank,
        args.adapter_dtype.adapter_dtype,
        args.requests,
        args.max_tokens,
        rayon::current_num_threads(),
        "clients",
        "mode",
        "tokens/s",
        "p50 ms",
        "p99 ms",
        "mixed/base"
    );
    for f in figures {
        let base = figures.iter().find(|b| b.clients == f.clients && b.mode == "base").map(|b| b.tokens_per_s);
        let ratio = match (f.mode.as_str(), base) {
            ("mixed", Some(b)) => format!("{:.2}", f.tokens_per_s / b),
            _ => "-".into(),
        };
        out += &format!("{:>8} {:>6} {:>10.1} {:>9.0} {:>9.0} {:>12}\n", f.clients, f.mode, f.tokens_per_s, f.p50_ms, f.p99_ms, ratio);
    }
    out
}

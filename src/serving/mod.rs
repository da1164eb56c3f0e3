//! `candle-peft serve`: an OpenAI-compatible HTTP server over one base model and any number of
//! adapters attached to it without merging.
//!
//! Why: an adapter is trained to be served, usually beside others over the same base. PEFT runs
//! one adapter at a time; here the adapters attach to the base's frozen weights, shared by
//! reference (`Llama::share_base`), so N adapters cost their own small tensors only, and a
//! request's `model` field picks the base or an adapter.
//!
//! Two parts, one thread each side:
//! - `http` (axum on a one-thread tokio runtime): `GET /health`, `GET /metrics` (Prometheus),
//!   `GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions` (the model's chat
//!   template), whole or streamed as server-sent events, with OpenAI's error object. A request is
//!   checked completely, then queued in a bounded queue (429 when full).
//! - `engine` (the calling thread, with the rayon pool for the model's products): continuous
//!   batching, a request joining the running batch at a token boundary and leaving it when it
//!   ends or its client goes away; rows of every adapter in one batch (`Llama::mixed`: the base
//!   product once for all rows, each adapter's low-rank term on its own rows).
//! - `registry`: the adapters by name, at most `max_resident` attached at once (least recently
//!   used goes), loaded and unloaded at run time by `POST /v1/adapters` and
//!   `DELETE /v1/adapters/NAME` (`GET /v1/adapters` lists them).
//!
//! SIGTERM or Ctrl-C stops accepting connections, lets the requests in flight finish, and ends.

pub mod engine;
pub mod http;
pub mod metrics;
pub mod openai;
pub mod registry;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::eval::chat::ChatTemplate;
use crate::model::Llama;
use crate::{Error, Result};

/// What `serve` needs, loaded by the caller.
pub struct ServerConfig {
    /// The name the base answers to, and the base.
    pub base_name: String,
    pub base: Llama,
    /// Each adapter's name and how to build its model over the base.
    pub adapters: Vec<(String, registry::Loader)>,
    /// Adapters attached at once; a request for another brings it in, the least recently used
    /// one without requests in flight goes.
    pub max_resident: usize,
    /// How `POST /v1/adapters` builds an adapter from a directory (`None`: it is refused).
    pub path_loader: Option<registry::PathLoader>,
    pub tokenizer: tokenizers::Tokenizer,
    pub template: ChatTemplate,
    pub eos_token_ids: Vec<u32>,
    pub chat_eos_token_ids: Vec<u32>,
    pub host: String,
    pub port: u16,
    /// Rows decoded at once.
    pub max_batch: usize,
    /// Requests that may wait for a place in the batch.
    pub queue_size: usize,
    pub max_tokens_limit: usize,
}

/// Serve until SIGTERM / Ctrl-C; prints `listening on http://ADDR` once the port is bound (port 0
/// picks a free one).
pub fn serve(config: ServerConfig) -> Result<()> {
    serve_with(
        config,
        |addr| {
            println!("listening on http://{addr}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
        },
        shutdown_signal(),
    )
}

/// Serve until `shutdown` completes, calling `bound` with the address once the port is bound.
pub fn serve_with(
    config: ServerConfig,
    bound: impl FnOnce(std::net::SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let ServerConfig {
        base_name,
        base,
        adapters,
        max_resident,
        path_loader,
        tokenizer,
        template,
        eos_token_ids,
        chat_eos_token_ids,
        host,
        port,
        max_batch,
        queue_size,
        max_tokens_limit,
    } = config;
    let context = base.config.max_position_embeddings;
    let metrics = Arc::new(metrics::Metrics::default());
    let tokenizer = Arc::new(tokenizer);
    let names = Arc::new(std::sync::RwLock::new(vec![Some(base_name)]));
    let registry = registry::Registry::new(base, adapters, max_resident, path_loader, names.clone())?;
    let (queue, jobs) = mpsc::channel(queue_size.max(1));
    let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let state = Arc::new(http::AppState {
        names,
        tokenizer: tokenizer.clone(),
        template,
        eos_token_ids,
        chat_eos_token_ids,
        context,
        max_tokens_limit: max_tokens_limit.min(context),
        queue,
        metrics: metrics.clone(),
        created,
        next_id: AtomicU64::new(0),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::msg(format!("serve: cannot start the runtime: {e}")))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind((host.as_str(), port)))
        .map_err(|e| Error::msg(format!("serve: cannot listen on {host}:{port}: {e}")))?;
    let addr = listener.local_addr().map_err(|e| Error::msg(format!("serve: {e}")))?;
    bound(addr);
    // HTTP on its own thread; the engine here, where the rayon pool is. When the server stops,
    // the state and with it the queue's sender go, and the engine ends after the last answer.
    let http = std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let app = http::router(state);
                axum::serve(listener, app).with_graceful_shutdown(shutdown).await
            })
        })
        .map_err(|e| Error::msg(format!("serve: cannot start the HTTP thread: {e}")))?;
    engine::Engine { registry, tokenizer, max_batch: max_batch.max(1), metrics }.run(jobs);
    match http.join() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::msg(format!("serve: {e}"))),
        Err(_) => Err(Error::msg("serve: the HTTP thread panicked")),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("serve: stopping: finishing the requests in flight");
}

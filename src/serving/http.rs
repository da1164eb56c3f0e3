//! The HTTP side of the server (axum): each handler checks its request completely before it
//! queues a job, so that a bad request costs no model time and gets OpenAI's error object with
//! the status a client expects (400 bad body or limits, 404 unknown model, 429 queue full).

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::engine::{Event, Job, Work};
use super::registry::Admin;
use super::metrics::Metrics;
use super::openai::{error_body, usage, Answer, ChatRequest, Common, CompletionRequest, Endpoint, OneOrMany};
use crate::eval::chat::ChatTemplate;

/// What the handlers share.
pub struct AppState {
    /// The base's name, then each adapter slot's (`None`: unloaded): a request's `model` picks
    /// one. The engine's registry changes it.
    pub names: Arc<std::sync::RwLock<Vec<Option<String>>>>,
    pub tokenizer: Arc<tokenizers::Tokenizer>,
    pub template: ChatTemplate,
    /// A completion ends at these; a chat answer also at the template's end of turn.
    pub eos_token_ids: Vec<u32>,
    pub chat_eos_token_ids: Vec<u32>,
    /// The model's context, in tokens: prompt + max_tokens must fit.
    pub context: usize,
    /// The most `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    pub queue: mpsc::Sender<Work>,
    pub metrics: Arc<Metrics>,
    pub created: u64,
    pub next_id: AtomicU64,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/adapters", get(list_adapters).post(load_adapter))
        .route("/v1/adapters/{name}", delete(unload_adapter))
        .with_state(state)
}

/// A refused request: its status and message.
struct Refusal {
    status: StatusCode,
    message: String,
    code: Option<&'static str>,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal { status, message: message.into(), code: None }
}

impl Refusal {
    fn into_response(self, metrics: &Metrics) -> Response {
        let kind = match self.status {
            StatusCode::TOO_MANY_REQUESTS => {
                metrics.rejected_queue_full.inc();
                "rate_limit_error"
            }
            s if s.is_server_error() => {
                metrics.server_errors.inc();
                "server_error"
            }
            _ => {
                metrics.client_errors.inc();
                "invalid_request_error"
            }
        };
        (self.status, Json(error_body(&self.message, kind, self.code))).into_response()
    }
}

async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

impl AppState {
    fn names(&self) -> Vec<Option<String>> {
        self.names.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = s.names().into_iter().flatten().map(|n| json!({ "id": n, "object": "model", "created": s.created, "owned_by": "candle-peft" })).collect();
    Json(json!({ "object": "list", "data": data }))
}

/// An admin command through the engine's queue (waiting for room, never refused as full).
async fn admin<T>(s: &AppState, command: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> Admin) -> Result<T, Refusal> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    let gone = || refuse(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down");
    s.queue.send(Work::Admin(command(reply))).await.map_err(|_| gone())?;
    answer.await.map_err(|_| gone())
}

async fn list_adapters(State(s): State<Arc<AppState>>) -> Response {
    match admin(&s, |reply| Admin::List { reply }).await {
        Ok(list) => {
            let data: Vec<Value> = list.into_iter().map(|(name, resident)| json!({ "id": name, "resident": resident })).collect();
            Json(json!({ "object": "list", "data": data })).into_response()
        }
        Err(r) => r.into_response(&s.metrics),
    }
}

#[derive(serde::Deserialize)]
struct LoadAdapter {
    name: String,
    path: String,
}

async fn load_adapter(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let request = match parse::<LoadAdapter>(&body) {
        Ok(r) if !r.name.is_empty() && !r.path.is_empty() => r,
        Ok(_) => return refuse(StatusCode::BAD_REQUEST, "`name` and `path` must not be empty").into_response(&s.metrics),
        Err(r) => return r.into_response(&s.metrics),
    };
    let name = request.name.clone();
    let done = admin(&s, |reply| Admin::Load { name: request.name, path: request.path, reply }).await;
    admin_answer(&s, done, json!({ "id": name, "loaded": true }))
}

async fn unload_adapter(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> Response {
    let done = admin(&s, |reply| Admin::Unload { name: name.clone(), reply }).await;
    admin_answer(&s, done, json!({ "id": name, "unloaded": true }))
}

fn admin_answer(s: &AppState, done: Result<Result<(), super::registry::AdminError>, Refusal>, ok: Value) -> Response {
    match done {
        Ok(Ok(())) => {
            s.metrics.ok.inc();
            Json(ok).into_response()
        }
        Ok(Err(e)) => refuse(StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST), e.message).into_response(&s.metrics),
        Err(r) => r.into_response(&s.metrics),
    }
}

/// What both endpoints hand to `answer` once their body is read.
struct Prepared {
    endpoint: Endpoint,
    prompt: Vec<u32>,
    common: Common,
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("the request body is not a valid request: {e}")))
}

fn encode(s: &AppState, text: &str, special: bool) -> Result<Vec<u32>, Refusal> {
    crate::data::tokenize::encode_ids(&s.tokenizer, text, special).map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("the prompt cannot be tokenized: {e}")))
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let prepared = parse::<CompletionRequest>(&body).and_then(|mut r| {
        let mut prompts = r.prompt.into_vec();
        if prompts.len() != 1 {
            return Err(refuse(StatusCode::BAD_REQUEST, format!("`prompt` must be one string here, not {}", prompts.len())));
        }
        let prompt = encode(&s, &prompts.remove(0), true)?;
        // OpenAI's default for completions.
        r.common.max_tokens = Some(r.common.max_tokens.unwrap_or(16));
        Ok(Prepared { endpoint: Endpoint::Completions, prompt, common: r.common })
    });
    answer(s, prepared).await
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let prepared = parse::<ChatRequest>(&body).and_then(|mut r| {
        if r.messages.is_empty() {
            return Err(refuse(StatusCode::BAD_REQUEST, "`messages` is empty"));
        }
        let text = s.template.render(&r.messages(), true).map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("the chat template failed on these messages: {e}")))?;
        // The template writes the special tokens itself.
        let prompt = encode(&s, &text, false)?;
        r.common.max_tokens = r.max_completion_tokens.or(r.common.max_tokens);
        Ok(Prepared { endpoint: Endpoint::Chat, prompt, common: r.common })
    });
    answer(s, prepared).await
}

/// Check the limits, queue the job, and answer whole or as a stream of server-sent events.
async fn answer(s: Arc<AppState>, prepared: Result<Prepared, Refusal>) -> Response {
    let p = match prepared {
        Ok(p) => p,
        Err(r) => return r.into_response(&s.metrics),
    };
    let queued = queue(&s, &p);
    let (model, rx) = match queued {
        Ok(q) => q,
        Err(r) => return r.into_response(&s.metrics),
    };
    let id = format!("{}-{}", if p.endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" }, s.next_id.fetch_add(1, Ordering::Relaxed));
    let prompt_tokens = p.prompt.len();
    if p.common.stream {
        s.metrics.ok.inc();
        let include_usage = p.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
        return stream(s.created, p.endpoint, id, model, prompt_tokens, include_usage, rx).into_response();
    }
    // A client that leaves drops this handler's future (hyper drops it when the connection
    // closes), and with it `rx`: the engine sees the receiver closed and frees the row.
    let mut rx = rx;
    let mut text = String::new();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Text(piece) => text.push_str(&piece),
            Event::Done { finish, completion_tokens } => {
                s.metrics.ok.inc();
                let a = Answer { endpoint: p.endpoint, id: &id, created: s.created, model: &model };
                return Json(a.body(&text, finish.as_str(), usage(prompt_tokens, completion_tokens))).into_response();
            }
            Event::Failed(why) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, why).into_response(&s.metrics),
        }
    }
    refuse(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down").into_response(&s.metrics)
}

/// The job for a prepared request, queued: the model's name and the receiver of its events.
fn queue(s: &AppState, p: &Prepared) -> Result<(String, mpsc::UnboundedReceiver<Event>), Refusal> {
    let names = s.names();
    let c = &p.common;
    let Some(model) = names.iter().position(|n| n.as_deref() == Some(c.model.as_str())) else {
        let known = names.into_iter().flatten().collect::<Vec<_>>().join(", ");
        return Err(Refusal { status: StatusCode::NOT_FOUND, message: format!("model `{}` does not exist; this server has {known}", c.model), code: Some("model_not_found") });
    };
    if c.n.is_some_and(|n| n != 1) {
        return Err(refuse(StatusCode::BAD_REQUEST, "`n` must be 1: one answer per request"));
    }
    if p.prompt.is_empty() {
        return Err(refuse(StatusCode::BAD_REQUEST, "the prompt is empty"));
    }
    let room = s.context.saturating_sub(p.prompt.len());
    let max_tokens = c.max_tokens.unwrap_or(room.min(s.max_tokens_limit));
    if max_tokens == 0 || max_tokens > s.max_tokens_limit {
        return Err(refuse(StatusCode::BAD_REQUEST, format!("`max_tokens` is {max_tokens}; it must be between 1 and {}", s.max_tokens_limit)));
    }
    if p.prompt.len() + max_tokens > s.context {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!("the prompt has {} tokens and `max_tokens` is {max_tokens}: past the model's context of {} tokens", p.prompt.len(), s.context),
        ));
    }
    let fresh_seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64) ^ s.next_id.load(Ordering::Relaxed);
    let sampling = c.sampling.config(fresh_seed);
    sampling.validate().map_err(|e| refuse(StatusCode::BAD_REQUEST, e.to_string()))?;
    let eos_token_ids = match p.endpoint {
        _ if c.sampling.ignore_eos => Vec::new(),
        Endpoint::Completions => s.eos_token_ids.clone(),
        Endpoint::Chat => s.chat_eos_token_ids.clone(),
    };
    let stop = c.stop.clone().map(OneOrMany::into_vec).unwrap_or_default();
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job { model, model_name: c.model.clone(), prompt: p.prompt.clone(), max_new_tokens: max_tokens, eos_token_ids, stop, sampling, events: tx, queued_at: Instant::now() };
    match s.queue.try_send(Work::Job(job)) {
        Ok(()) => Ok((c.model.clone(), rx)),
        Err(mpsc::error::TrySendError::Full(_)) => Err(refuse(StatusCode::TOO_MANY_REQUESTS, "the queue is full: try again shortly")),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down")),
    }
}

/// The answer as server-sent events: a chunk per piece of text, the last with its finish
/// reason, the usage when asked, then `[DONE]`. When the client goes away the response is
/// dropped, and with it the receiver: the engine sees it closed and frees the row.
fn stream(
    created: u64,
    endpoint: Endpoint,
    id: String,
    model: String,
    prompt_tokens: usize,
    include_usage: bool,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> Sse<impl tokio_stream::Stream<Item = Result<SseEvent, Infallible>>> {
    let (out, events) = mpsc::channel::<Result<SseEvent, Infallible>>(16);
    tokio::spawn(async move {
        let a = Answer { endpoint, id: &id, created, model: &model };
        let send = |v: Value| SseEvent::default().data(v.to_string());
        let mut first = true;
        if endpoint == Endpoint::Chat {
            // The role comes first, as OpenAI's stream starts.
            if out.send(Ok(send(a.chunk(None, None, true)))).await.is_err() {
                return;
            }
            first = false;
        }
        loop {
            // The response gone (the client left) ends the task at once, and with it `rx`.
            let event = tokio::select! {
                event = rx.recv() => match event {
                    Some(e) => e,
                    None => break,
                },
                _ = out.closed() => return,
            };
            let chunk = match &event {
                Event::Text(piece) => a.chunk(Some(piece), None, first),
                Event::Done { finish, .. } => a.chunk(None, Some(finish.as_str()), first),
                Event::Failed(why) => error_body(why, "server_error", None),
            };
            first = false;
            if out.send(Ok(send(chunk))).await.is_err() {
                return;
            }
            match event {
                Event::Text(_) => continue,
                Event::Done { completion_tokens, .. } if include_usage => {
                    let _ = out.send(Ok(send(a.usage_chunk(usage(prompt_tokens, completion_tokens))))).await;
                }
                _ => {}
            }
            break;
        }
        let _ = out.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(events)).keep_alive(KeepAlive::default())
}

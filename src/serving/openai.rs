//! The OpenAI API's request bodies as the server reads them, its error object, and the response
//! bodies it writes (`/v1/completions`, `/v1/chat/completions`, their streamed chunks).
//!
//! Fields the engine has no use for (`user`, `logit_bias`, ...) are accepted and ignored, as
//! vLLM and llama.cpp's server do; fields that would change the answer in a way it cannot
//! honour (`n` above 1, several prompts) are refused.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::eval::chat::Message;
use crate::eval::generate::sampling::SamplingConfig;

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The sampling fields both endpoints share; `top_k`, `min_p` and `repetition_penalty` are the
/// extensions vLLM and llama.cpp accept too.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    /// Generate `max_tokens` whatever the EOS (vLLM's extension; benchmarks use it).
    #[serde(default)]
    pub ignore_eos: bool,
}

impl Sampling {
    /// OpenAI's defaults where a field is absent (temperature 1, top_p 1); an unseeded request
    /// gets `fresh_seed`.
    pub fn config(&self, fresh_seed: u64) -> SamplingConfig {
        let d = SamplingConfig::default();
        SamplingConfig {
            temperature: self.temperature.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            seed: self.seed.unwrap_or(fresh_seed),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The fields both endpoints share.
#[derive(Debug, Clone, Deserialize)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<usize>,
    #[serde(flatten)]
    pub sampling: Sampling,
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: OneOrMany,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    #[serde(flatten)]
    pub common: Common,
}

impl ChatRequest {
    pub fn messages(&self) -> Vec<Message> {
        self.messages.iter().map(|m| Message::new(&m.role, &m.content)).collect()
    }
}

/// OpenAI's error body.
pub fn error_body(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({ "error": { "message": message, "type": kind, "param": Value::Null, "code": code } })
}

/// Which endpoint a response belongs to: the names of its objects and where its text goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// What every body of one answer carries.
pub struct Answer<'a> {
    pub endpoint: Endpoint,
    pub id: &'a str,
    pub created: u64,
    pub model: &'a str,
}

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({ "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens })
}

impl Answer<'_> {
    /// The whole answer (a non-streamed request).
    pub fn body(&self, text: &str, finish: &str, usage: Value) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({ "index": 0, "text": text, "finish_reason": finish, "logprobs": Value::Null }),
            Endpoint::Chat => json!({ "index": 0, "message": { "role": "assistant", "content": text }, "finish_reason": finish, "logprobs": Value::Null }),
        };
        let object = match self.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion",
        };
        json!({ "id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice], "usage": usage })
    }

    /// A streamed chunk: a piece of text, or the last one with its finish reason. A chat stream's
    /// first chunk names the role.
    pub fn chunk(&self, text: Option<&str>, finish: Option<&str>, first: bool) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({ "index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": Value::Null }),
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({ "index": 0, "delta": delta, "finish_reason": finish, "logprobs": Value::Null })
            }
        };
        self.wrap(json!([choice]))
    }

    /// The chunk after the last one that `stream_options.include_usage` asks for.
    pub fn usage_chunk(&self, usage: Value) -> Value {
        let mut chunk = self.wrap(json!([]));
        chunk["usage"] = usage;
        chunk
    }

    fn wrap(&self, choices: Value) -> Value {
        let object = match self.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion.chunk",
        };
        json!({ "id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices })
    }
}

//! candle-peft: parameter-efficient fine-tuning of LLaMA-family models on candle.
//!
//! Layout: `model` (the trainable LLaMA), `adapters` (one file per method, injected by name),
//! `loading` (Hugging Face directories, the hub cache, GGUF), `data` (LLM-Adapters format),
//! `training` (optimizer, schedule, loop, checkpoints), `eval` (generation, answer extraction),
//! `cli` (the `candle-peft` command).

pub mod error;
pub mod loading;
pub mod model;

pub use error::{Error, Result};

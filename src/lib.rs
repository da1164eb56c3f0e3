//! candle-peft: parameter-efficient fine-tuning of LLaMA-family models on candle.
//!
//! Layout: `model` (the trainable LLaMA), `adapters` (one file per method, injected by name),
//! `loading` (Hugging Face directories, the hub cache, GGUF), `data` (LLM-Adapters format),
//! `training` (optimizer, schedule, loop, checkpoints), `eval` (generation, answer extraction),
//! `plot` (PNG charts),
//! `cli` (the `candle-peft` command).

pub mod adapters;
pub mod alloc;
pub mod cli;
pub mod data;
pub mod demo;
pub mod error;
pub mod eval;
pub mod fsutil;
pub mod kernels;
pub mod loading;
pub mod memory;
pub mod model;
pub mod plot;
pub mod quant;
pub mod training;

pub use error::{Error, Result};

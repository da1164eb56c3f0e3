//! The trainable LLaMA-family model.

pub mod config;

pub use config::{LlamaConfig, RopeScaling};

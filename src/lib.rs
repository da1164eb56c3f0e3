//! candle-peft: parameter-efficient fine-tuning of LLaMA-family models on candle.
//!
//! Layers, lowest first; a module uses its own layer and those below it, never one above
//! (`tests/layers.rs` holds the table and checks every `crate::` path):
//!
//! | layer | modules |
//! |---|---|
//! | core | `error`, `fsutil` (atomic writes), `alloc`, `memory`, `weights` (safetensors I/O), `hub` (local directories, the hub cache), `cuda` (launch plumbing) |
//! | quant | `quant`: NF4 as bitsandbytes stores it, and the frozen `BaseWeight` |
//! | ops | `ops`: each custom op with its CPU reference, its backward and its CUDA launcher |
//! | model | `model`: the trainable LLaMA |
//! | methods | `adapters`: one module per method, listed in `registry::METHODS`, injected by module name; `docs/METHODS.md` |
//! | loading, data | `loading` (Hugging Face directories, GGUF), `data` (LLM-Adapters format) |
//! | training | `training`: optimizer, schedule, step, loop, checkpoints |
//! | eval | `eval`: generation, answer extraction, accuracy |
//! | reports | `plot`: PNG charts |
//! | serving | `serving`: the OpenAI-compatible server, continuous batching over adapters |
//! | cli | `cli`, `demo`: the `candle-peft` command |

pub mod adapters;
pub mod alloc;
pub mod cli;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod demo;
pub mod error;
pub mod eval;
pub mod fsutil;
pub mod hub;
pub mod kernel_bench;
pub mod ops;
pub mod loading;
pub mod memory;
pub mod model;
pub mod plot;
pub mod quant;
pub mod selftest;
pub mod serving;
pub mod simd;
pub mod threads;
pub mod training;
pub mod validate;
pub mod weights;

pub use error::{Error, Result};

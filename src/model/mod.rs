//! The trainable LLaMA-family model.

pub mod config;
pub mod fused;
pub mod linear;
pub mod linear_cross_entropy;
pub mod llama;
pub mod ops;

pub use config::{LlamaConfig, RopeScaling};
pub use linear::{FrozenLinear, Linear, LinearAdapter};
pub use llama::{BlockControl, ControlContext, KvCache, Llama, Positions};

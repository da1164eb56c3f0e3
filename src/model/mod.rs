//! The trainable LLaMA-family model.

pub mod batch;
pub mod config;
pub mod linear;
pub mod linear_cross_entropy;
pub mod llama;
pub mod mixed;
pub mod vit;

pub use batch::TrainBatch;
pub use config::{LlamaConfig, RopeScaling};
pub use linear::{FrozenLinear, Linear, LinearAdapter};
pub use llama::{adapter_params, BlockControl, ControlContext, ControlSlots, KvCache, Llama, Positions};
pub use mixed::RowModels;

//! Where models come from: Hugging Face directories (local or in the hub cache), GGUF files.

pub mod hub;
pub mod weights;

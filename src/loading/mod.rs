//! Where models come from: Hugging Face directories (local or in the hub cache) and GGUF files,
//! and the conversion from GGUF to a Hugging Face directory.

pub mod convert;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod hub;
pub mod weights;

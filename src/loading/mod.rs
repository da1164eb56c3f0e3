//! Loading checkpoints that were not written by the engine: llama.cpp GGUF files (dequantized,
//! renamed to Hugging Face names) and their conversion to a Hugging Face model directory.

pub mod convert;
pub mod gguf;
pub mod gguf_tokenizer;

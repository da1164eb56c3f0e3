//! Quantized base weights. `nf4`: the bitsandbytes NF4 format (QLoRA), quantize-at-load and
//! pre-quantized `*-bnb-4bit` checkpoints. `ggml`: GGUF's block types kept packed at inference.

pub mod base_weight;
pub mod ggml;
pub mod nf4;
#[cfg(feature = "cuda")]
mod nf4_cuda;
pub mod nf4_kernels;

pub use base_weight::BaseWeight;
pub use nf4::Nf4Tensor;

/// How to quantize the frozen linear weights at load (`--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// NF4, blocks of 64, double quantization: what `BitsAndBytesConfig(load_in_4bit=True,
    /// bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)` does.
    Nf4,
}

impl std::str::FromStr for Quantization {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "nf4" => Ok(Self::Nf4),
            other => Err(crate::Error::msg(format!("unknown quantization `{other}` (nf4)"))),
        }
    }
}

//! `candle-peft selftest`: every fused op on the GPU against its CPU reference, on random shapes
//! with odd sizes (no multiple of any tile), in f32, f16 and bf16, forward and backward:
//! the adapter ops of `src/ops` (the DoRA linear included: candle ops on the device, but its own
//! forward and backward), the model's attention (flash-style, `kernels/attention.cu`, and on
//! cuBLAS, `kernels/attention_gemm.cu`) and the decoder layer's RMSNorm (`kernels/rms_norm.cu`),
//! SwiGLU (`kernels/swiglu.cu`) and the attention heads split with RoPE (`kernels/rope.cu`, alone
//! and inside the q, k, v projections) as training runs them, the adapters' dropout masks
//! (`kernels/dropout.cu`), AdamW's update (`kernels/adamw.cu`) and the mixed batch's LoRA rows
//! (`kernels/lora_rows.cu`).
//!
//! Each op's cases live beside the op (its `selftest` function), on the harness of
//! `crate::selftest` (inputs, bounds, the table); this is the list the command runs.

use candle_core::{DType, Device};

pub use crate::selftest::{table, Check};
use crate::selftest::Case;
use crate::Result;

/// Every op's cases, in the order the table reports them.
const OPS: &[fn(&mut Case) -> Result<()>] = &[
    crate::ops::lowrank_add::selftest,
    crate::ops::lora_linear::selftest,
    crate::ops::dora_linear::selftest,
    crate::ops::control_branch::selftest,
    crate::ops::row_norms::selftest,
    crate::quant::nf4_kernels::selftest,
    crate::ops::snell::selftest,
    crate::ops::fused::attention::selftest,
    crate::ops::fused::rms_norm::selftest,
    crate::ops::fused::swiglu::selftest,
    crate::ops::fused::frozen_matmul::selftest,
    crate::ops::dropout::selftest,
    crate::ops::fused::heads::selftest,
    crate::ops::adamw::selftest,
    crate::ops::lora_rows::selftest,
];

/// Runs every check on `device` (a CUDA device), `rounds` random shapes per op and dtype.
pub fn run(device: &Device, seed: u64, rounds: usize) -> Result<Vec<Check>> {
    if !device.is_cuda() {
        return Err(crate::Error::msg("selftest compares the CUDA kernels with their CPU references: it needs a CUDA device"));
    }
    let mut checks = Vec::new();
    for (i, dtype) in [DType::F32, DType::F16, DType::BF16].into_iter().enumerate() {
        let mut case = Case::new(device, dtype, seed + i as u64);
        for _ in 0..rounds {
            for op in OPS {
                op(&mut case)?;
            }
        }
        checks.extend(case.checks);
    }
    Ok(checks)
}

//! The highest SIMD level the hand-written CPU kernels may use. Each kernel detects what the CPU
//! has at run time and takes the best path up to this cap; `CANDLE_PEFT_SIMD=scalar|avx2`
//! lowers it, so that the fallbacks are tested on a CPU that has more (CI runs the tests once
//! with `scalar`).

use std::sync::OnceLock;

/// A cap on the instruction sets, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Cap {
    /// Plain Rust only.
    Scalar,
    /// Up to AVX2, FMA and F16C.
    Avx2,
    /// Anything the CPU has (AVX-512 and its extensions included).
    Any,
}

/// The cap `CANDLE_PEFT_SIMD` sets (`Any` when unset or unknown), read once.
pub fn cap() -> Cap {
    static CAP: OnceLock<Cap> = OnceLock::new();
    *CAP.get_or_init(|| match std::env::var("CANDLE_PEFT_SIMD").as_deref() {
        Ok("scalar") => Cap::Scalar,
        Ok("avx2") => Cap::Avx2,
        _ => Cap::Any,
    })
}

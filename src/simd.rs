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

/// A kernel's own level `cpu` (the best this CPU runs) lowered to the cap: `scalar` under
/// `Cap::Scalar`, at most `avx2` under `Cap::Avx2`.
pub fn capped<L: Ord>(cpu: L, scalar: L, avx2: L) -> L {
    match cap() {
        Cap::Scalar => scalar,
        Cap::Avx2 => cpu.min(avx2),
        Cap::Any => cpu,
    }
}

/// [`avx2_fma`], and F16C (every AVX2 CPU has it; checked all the same).
pub fn avx2_fma_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2_fma() && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether a kernel may use AVX-512 F, BW and VL (with AVX2, FMA and F16C): the CPU has them
/// and the cap allows them.
pub fn avx512() -> bool {
    cap() == Cap::Any && avx2_fma_f16c() && cpu_has_avx512()
}

/// Whether the CPU has AVX-512 F, BW and VL, whatever the cap (a kernel's own level list, for
/// its tests of every level).
pub fn cpu_has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether a kernel may use AVX2 and FMA: the CPU has them and the cap allows them.
pub fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        cap() >= Cap::Avx2 && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Asks the CPU to bring the `bytes` at `at` into its caches, a line at a time: a hint, which
/// reads nothing and never faults (an address past an allocation's end is fine). The products
/// over packed weights prefetch what they read a few KiB later, since the hardware's own
/// prefetchers stop at each 4 KiB page. (The K-quant products, bound by their instructions at
/// a row of x, gained nothing from it: 42-43% of the bandwidth on LLaMA-7B's shape either way.)
#[inline(always)]
pub fn prefetch(at: *const u8, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..bytes).step_by(64) {
        // SAFETY: SSE is part of x86-64, and a prefetch has no effect on memory.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.wrapping_add(line) as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (at, bytes);
}

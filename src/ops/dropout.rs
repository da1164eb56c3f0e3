//! Inverted dropout whose masks are a function of a seed, not of a stored tensor: the fused
//! adapter ops (LoRA, DoRA, control) draw a mask in forward and draw it again in backward
//! instead of keeping it, and a resumed run draws the masks the uninterrupted run would have.
//! CPU: [`dropout_mask_values`]; CUDA: `kernels/dropout.cu`, the same counter-based draw.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::Rng;

use crate::Result;
use candle_core::DType;
use crate::selftest::Case;

thread_local! {
    /// Which forward pass dropout masks are drawn for: the trainer sets it to (step, micro-batch)
    /// before each forward, so a mask depends only on the adapter's seed and the position in
    /// training, and a resumed run draws the masks the uninterrupted run would have drawn. Per
    /// thread: trainers running side by side (the test harness runs tests in parallel) must not
    /// change each other's masks.
    static DROPOUT_KEY: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

pub fn set_dropout_key(step: usize, micro_batch: usize) {
    DROPOUT_KEY.with(|k| k.set(((step as u64) << 20) | micro_batch as u64));
}

/// Inverted dropout whose masks are a function of its seed and the dropout key.
pub(crate) struct Dropout {
    pub p: f64,
    seed: u64,
}

impl Dropout {
    pub fn new(p: f64, rng: &mut StdRng) -> Self {
        Self { p, seed: rng.random() }
    }

    /// `x ⊙ mask` as differentiable candle ops (the mask a constant).
    pub fn apply(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self.mask(train) {
            Some(mask) => Ok((x * mask.tensor(x)?)?),
            None => Ok(x.clone()),
        }
    }

    /// This forward pass's mask, or None when dropout is off.
    pub fn mask(&self, train: bool) -> Option<DropoutMask> {
        if !train || self.p <= 0.0 {
            return None;
        }
        let key = DROPOUT_KEY.with(std::cell::Cell::get);
        Some(DropoutMask { seed: self.seed ^ key.wrapping_mul(0x9E37_79B9_7F4A_7C15), keep: (1.0 - self.p) as f32 })
    }
}

/// One inverted-dropout mask, held as its seed: the fused adapter ops draw it in forward and
/// again in backward rather than keep it (and the dropped input) from one to the other, which
/// on a LLaMA-7B step is two [tokens, d_in] tensors per adapted matrix. Element i of the
/// contiguous input is kept, scaled by 1 / keep, by the draw of `dropout_mask_values`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutMask {
    pub seed: u64,
    pub keep: f32,
}

impl DropoutMask {
    /// The mask (kept entries 1 / keep, dropped 0) for an input like `x`, in x's dtype and on
    /// its device.
    pub fn tensor(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = x.device() {
            return Ok(crate::ops::cuda::dropout::mask(dev, x.shape(), x.dtype(), self.seed, self.keep)?);
        }
        let values = dropout_mask_values(self.seed, x.elem_count(), self.keep);
        Ok(Tensor::from_vec(values, x.shape(), &Device::Cpu)?.to_device(x.device())?.to_dtype(x.dtype())?)
    }

    /// `x ⊙ mask` in x's dtype, not tracked by autograd (the fused ops define their own
    /// backward); on CUDA one kernel, with no mask in memory.
    pub fn dropped(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.detach();
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return Ok(crate::ops::cuda::dropout::apply(&x.contiguous()?, self.seed, self.keep)?);
        }
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            // One pass over x, the mask drawn in registers (`kernels/dropout.cu` on the CPU).
            use rayon::prelude::*;
            let mut values: Vec<f32> = x.flatten_all()?.to_vec1()?;
            values.par_chunks_mut(MASK_TASK).enumerate().for_each(|(task, chunk)| apply_mask(self.seed, task * MASK_TASK, self.keep, chunk));
            return Ok(Tensor::from_vec(values, x.shape(), x.device())?);
        }
        Ok((&x * self.tensor(&x)?)?)
    }
}

/// Elements a task of the CPU mask takes.
const MASK_TASK: usize = 1 << 14;

/// Whether element i is kept: the top 24 bits of `splitmix64(seed + (i + 1)·φ)` as a fraction
/// of 2^24 are under `keep`.
#[inline(always)]
fn kept(seed: u64, i: usize, keep: f32) -> bool {
    let mut z = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    ((z >> 40) as f32 * (1.0 / 16_777_216.0)) < keep
}

/// `values[j] *= mask[first + j]`: the mask of [`dropout_mask_values`] applied in place, 8
/// elements at a time on AVX-512 (F, DQ: its 64-bit multiplies) where the CPU has it.
pub fn apply_mask(seed: u64, first: usize, keep: f32, values: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::cap() == crate::simd::Cap::Any && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq") {
        // SAFETY: the CPU has AVX-512 F and DQ.
        unsafe { x86::apply_mask(seed, first, keep, values) };
        return;
    }
    apply_mask_scalar(seed, first, keep, values);
}

/// [`apply_mask`] one element at a time: the reference, and the path of other CPUs.
pub fn apply_mask_scalar(seed: u64, first: usize, keep: f32, values: &mut [f32]) {
    let scale = 1.0 / keep;
    for (j, v) in values.iter_mut().enumerate() {
        // A product even where dropped, as `x * mask` and the CUDA kernel do: NaN stays NaN.
        *v *= if kept(seed, first + j, keep) { scale } else { 0.0 };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU has AVX-512 F and DQ.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn apply_mask(seed: u64, first: usize, keep: f32, values: &mut [f32]) {
        let body = values.len() / 8 * 8;
        let lanes = _mm512_setr_epi64(1, 2, 3, 4, 5, 6, 7, 8);
        let mul = |a: __m512i, c: u64| _mm512_mullo_epi64(a, _mm512_set1_epi64(c as i64));
        let (keep_v, scale) = (_mm256_set1_ps(keep), _mm256_set1_ps(1.0 / keep));
        for j in (0..body).step_by(8) {
            let i = _mm512_add_epi64(_mm512_set1_epi64((first + j) as i64), lanes);
            let mut z = _mm512_add_epi64(_mm512_set1_epi64(seed as i64), mul(i, 0x9E37_79B9_7F4A_7C15));
            z = mul(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), 0xBF58_476D_1CE4_E5B9);
            z = mul(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), 0x94D0_49BB_1331_11EB);
            z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
            // The top 24 bits, exact in f32.
            let u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm512_cvtepi64_epi32(_mm512_srli_epi64(z, 40))), _mm256_set1_ps(1.0 / 16_777_216.0));
            let v = _mm256_loadu_ps(values.as_ptr().add(j));
            let out = _mm256_mul_ps(v, _mm256_and_ps(scale, _mm256_cmp_ps::<_CMP_LT_OQ>(u, keep_v)));
            _mm256_storeu_ps(values.as_mut_ptr().add(j), out);
        }
        super::apply_mask_scalar(seed, first + body, keep, &mut values[body..]);
    }
}

/// The mask values `kernels/dropout.cu` draws, on the CPU: element i is kept (`1/keep`) when
/// the top 24 bits of `splitmix64(seed + (i + 1)·φ)` as a fraction of 2^24 are under `keep`.
/// Counter-based, so any element can be drawn alone (in parallel here, one thread each there).
pub fn dropout_mask_values(seed: u64, n: usize, keep: f32) -> Vec<f32> {
    use rayon::prelude::*;
    let mut values = vec![1f32; n];
    values.par_chunks_mut(MASK_TASK).enumerate().for_each(|(task, chunk)| apply_mask(seed, task * MASK_TASK, keep, chunk));
    values
}

#[cfg(test)]
mod dropout_tests {
    use super::dropout_mask_values;

    #[test]
    fn the_mask_keeps_the_asked_fraction_and_follows_its_seed() {
        let n = 200_000;
        let (a, b) = (dropout_mask_values(7, n, 0.7), dropout_mask_values(8, n, 0.7));
        let kept = a.iter().filter(|&&m| m > 0.0).count() as f64 / n as f64;
        assert!((kept - 0.7).abs() < 0.005, "kept {kept}");
        assert!(a.iter().all(|&m| m == 0.0 || m == 1.0 / 0.7f32));
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count() as f64 / n as f64;
        assert!(same < 0.65, "two seeds agree on {same} of the elements (independent: 0.58)");
        assert_eq!(a, dropout_mask_values(7, n, 0.7));
    }

    /// The mask applied in place (vectorized where the CPU can, from any first element, with a
    /// remainder) is `x ⊙ mask`, bit for bit.
    #[test]
    fn the_mask_applied_in_place_is_x_times_the_mask() {
        let mut x: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin()).collect();
        x[500] = f32::NAN;
        let mask = dropout_mask_values(99, 1003 + 13, 0.8);
        let scale = 1.0 / 0.8f32;
        assert!(mask.iter().enumerate().all(|(i, &m)| m == if super::kept(99, i, 0.8) { scale } else { 0.0 }));
        let want: Vec<f32> = x.iter().zip(&mask[13..]).map(|(x, m)| x * m).collect();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for apply in [super::apply_mask, super::apply_mask_scalar] {
            let mut got = x.clone();
            apply(99, 13, 0.8, &mut got);
            assert_eq!(bits(&got), bits(&want));
        }
        let t = candle_core::Tensor::from_vec(x.clone(), (17, 59), &candle_core::Device::Cpu).unwrap();
        let m = super::DropoutMask { seed: 99, keep: 0.8 };
        let fused: Vec<f32> = m.dropped(&t).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(bits(&fused), bits(&x.iter().zip(&mask).map(|(x, m)| x * m).collect::<Vec<_>>()));
    }
}

// The op on a device against its CPU reference (`candle-peft selftest`).

/// The adapters' dropout mask (`kernels/dropout.cu` on CUDA) is the CPU's, bit for bit: one
/// element off is an error of 1. Then `x ⊙ mask` without the mask (the fused adapter ops'
/// forward and backward): the product in the dtype, as candle's `x * mask` computes it.
pub fn selftest(c: &mut Case) -> Result<()> {
    let (rows, width) = (c.odd(33, 300), c.odd(65, 1100));
    let shape = format!("{rows}x{width} p0.3");
    let dropout = Dropout::new(0.3, &mut c.rng);
    let mask = dropout.mask(true).ok_or_else(|| crate::Error::msg("no dropout mask"))?;
    let like = |device: &Device, dtype: DType| Tensor::zeros((rows, width), dtype, device);
    let got = mask.tensor(&like(c.device, c.dtype)?)?;
    let reference = mask.tensor(&like(&Device::Cpu, DType::F64)?)?;
    c.record("dropout mask", &shape, "mask", &got, &reference)?;
    let x = c.draw(&[rows, width], 1.0)?;
    let got = mask.dropped(&c.on_device(&x)?)?;
    let reference = (&x * mask.tensor(&x)?)?;
    c.record("dropout apply", &shape, "x*mask", &got, &reference)
}

#[cfg(test)]
mod selftest_tests {
    use super::*;

    /// The checks run and pass with the CPU on both sides, so a failure on a GPU is the kernel's.
    #[test]
    fn the_selftest_checks_pass_on_the_cpu_reference() {
        crate::selftest::passes_on_the_cpu(selftest, 2);
    }
}

//! NF4 ("4-bit NormalFloat", QLoRA) weights, stored exactly as bitsandbytes stores them, with a
//! CPU reference for quantize, dequantize and the quantized linear.
//!
//! # The format (bitsandbytes 0.50: `bitsandbytes/functional.py` `quantize_4bit`, `dequantize_4bit`,
//! `create_dynamic_map`, and the torch kernels in `bitsandbytes/backends/default/ops.py`;
//! Dettmers et al., QLoRA, arXiv 2305.14314). Checked bit for bit against bitsandbytes' output
//! (`tests/nf4.rs`, fixtures made by `tests/fixtures/make_nf4_fixtures.py`).
//!
//! - The matrix W is flattened row-major to n values and cut into blocks of `blocksize` (64)
//!   values; the last block may be partial. Each block b has a scale `absmax_b = max |w|`.
//! - Each value is normalised, `s = clamp(w · (1 / absmax_b), -1, 1)` (f32; bitsandbytes
//!   multiplies by the reciprocal), and replaced by the index of the nearest entry of the 16-value
//!   NF4 code [`NF4_CODE`] (the quantiles of N(0,1) scaled to [-1, 1], with an exact 0), the
//!   first index on a tie (`torch.argmin`).
//! - Two 4-bit indices per byte, the first value in the high nibble: `byte = q[2i] << 4 | q[2i+1]`;
//!   an odd n pads the last low nibble with 7, the code of 0.0. The packed buffer has `ceil(n / 2)` bytes.
//! - An all-zero block (absmax 0) stores code 7 (0.0) for every value.
//! - Double quantization (`compress_statistics=True`): `offset = mean(absmax)` (we sum in f64 and
//!   round once; equal to torch's f32 mean on every fixture), then the
//!   `absmax − offset` values are quantized to 8 bits blockwise (blocks of 256, one f32 scale
//!   `nested_absmax` per block) with the signed dynamic map [`dynamic_map_signed`]
//!   (`create_dynamic_map(signed=True)`):
//!   `q8 = nearest(code8, clamp((a − offset) · (1 / nested_absmax), −1, 1))`, the first index
//!   on a tie (`backends/default/ops.py`).
//! - Dequantization: `absmax_b = code8[q8_b] · nested_absmax_{b/256} + offset` (f32), then
//!   `w = NF4_CODE[q] · absmax_b` in f32, rounded to the stored dtype.
//!
//! Memory per matrix of n weights: `ceil(n/2)` packed bytes, plus per 64-block one byte (double
//! quant) or four (plain f32 absmax), plus 4 bytes per 256 blocks, the offset and the code tables
//! (see [`Nf4Tensor::storage_bytes`]). A LLaMA-2-7B's linears: 3.11 GiB (`tests/nf4.rs`).
//!
//! The buffers live on the host; on a GPU they are also uploaded once, and the kernels of
//! `kernels/nf4.cu` (src/ops/nf4.rs) dequantize them there and run the batch-1 GEMV of
//! decoding straight from the packed codes.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The NF4 code, `bitsandbytes.functional.get_4bit_type("nf4")` (same in `csrc/kernels.cu`).
#[allow(clippy::excessive_precision)] // the digits bitsandbytes lists
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// The block sizes bitsandbytes accepts for 4-bit quantization.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
/// The default 4-bit block size and the nested (double-quant) block size of bitsandbytes.
pub const BLOCKSIZE: usize = 64;
pub const NESTED_BLOCKSIZE: usize = 256;

/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)` of bitsandbytes: 0, 1,
/// and for i = 0..7 the midpoints of `linspace(0.1, 1, 2^i + 1)` times `±10^(i−6)`, sorted
/// (`bitsandbytes/functional.py`). The values are the f32 bits bitsandbytes 0.50 produces
/// (`name2qmap["dynamic"]`, as saved in `nested_quant_map`): recomputing the formula in f32
/// differs from torch's `linspace` rounding in the last bit of some entries, and the 8-bit codes
/// depend on those bits.
pub fn dynamic_map_signed() -> [f32; 256] {
    DYNAMIC_MAP_SIGNED_BITS.map(f32::from_bits)
}

const DYNAMIC_MAP_SIGNED_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000, 0xbf616666,
    0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000,
    0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a,
    0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333,
    0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, 0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a,
    0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999,
    0xbe6f3333, 0xbe60cccd, 0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000,
    0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d, 0xbd5b851f,
    0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15,
    0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418, 0xbc0ccccd,
    0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a,
    0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d, 0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01,
    0xb9c7e283, 0xb98ce705, 0xb923d70b, 0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94,
    0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b,
    0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b,
    0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3, 0x3c8b851f,
    0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148, 0x3d166667, 0x3d21eb85, 0x3d2d70a3,
    0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d,
    0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667,
    0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000,
    0x3e526666, 0x3e60cccd, 0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc,
    0x3eaa0000, 0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a, 0x3f123334,
    0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666, 0x3f2f0000, 0x3f32999a,
    0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000,
    0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666,
    0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The per-block scales: plain f32, or 8-bit with a nested f32 scale per 256 blocks.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    F32(Vec<f32>),
    Double { quantized: Vec<u8>, nested_absmax: Vec<f32>, nested_code: Vec<f32>, offset: f32, nested_blocksize: usize },
}

/// An NF4-quantized matrix: one packed buffer plus its scales, on the host.
#[derive(Debug, Clone)]
pub struct Nf4Tensor {
    pub shape: Vec<usize>,
    /// The dtype the weights had (and dequantize rounds to), as bitsandbytes' `quant_state.dtype`.
    pub dtype: DType,
    pub blocksize: usize,
    /// The 16 values the 4-bit codes index (`quant_map`; NF4_CODE for NF4).
    pub code: Vec<f32>,
    /// `ceil(n/2)` bytes, first value in the high nibble.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
    /// Where dequantized tensors are put.
    pub device: Device,
    /// The buffers on `device` when it is a GPU, uploaded on first use (`kernels/nf4.cu`).
    pub on_device: Arc<OnceLock<Nf4DeviceBuffers>>,
}

/// The NF4 buffers as the CUDA kernels read them (`kernels/nf4.cu`): packed codes (u8), the
/// 8-bit absmax codes (u8; one unused byte without double quantization), the f32 scales
/// (nested_absmax, or the plain absmax), and the NF4 code followed by the nested code (f32, 272).
#[derive(Debug, Clone)]
pub struct Nf4DeviceBuffers {
    pub packed: Tensor,
    pub absmax_q: Tensor,
    pub scales: Tensor,
    pub tables: Tensor,
    pub offset: f32,
    pub double_quant: bool,
    pub nested_blocksize: usize,
}

fn check_blocksize(blocksize: usize) -> Result<()> {
    if !BLOCKSIZES.contains(&blocksize) {
        return Err(Error::msg(format!("NF4 block size {blocksize} is not one of {BLOCKSIZES:?}")));
    }
    Ok(())
}

/// The index of the nearest NF4 code value, first on a tie (`torch.argmin`). An all-zero block
/// (absmax 0, so 0 · (1/0) = NaN) gets the code of 0.0, index 7, as bitsandbytes writes it.
fn nearest_nf4(s: f32) -> u8 {
    if s.is_nan() {
        return 7;
    }
    let mut best = 0usize;
    let mut best_d = f32::INFINITY;
    for (j, &c) in NF4_CODE.iter().enumerate() {
        let d = (s - c).abs();
        if d < best_d {
            best = j;
            best_d = d;
        }
    }
    best as u8
}

/// Blockwise 8-bit quantization with `code` as bitsandbytes' default (torch) kernel does it
/// (`backends/default/ops.py`, `quantize_blockwise`): per block the absmax, then each value
/// times its reciprocal, clamped to [-1, 1], goes to the nearest code entry, the first on a tie.
pub fn quantize_blockwise_8bit(a: &[f32], code: &[f32; 256], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let mut out = Vec::with_capacity(a.len());
    let mut scales = Vec::with_capacity(a.len().div_ceil(blocksize));
    for block in a.chunks(blocksize) {
        let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        scales.push(m);
        let r = 1.0 / m;
        for &v in block {
            let x = (v * r).clamp(-1.0, 1.0);
            out.push(argmin_distance(code, x) as u8);
        }
    }
    (out, scales)
}

/// The first index of the entry of `code` nearest to `x` (`torch.argmin(|x - code|)`).
fn argmin_distance(code: &[f32], x: f32) -> usize {
    let mut best = 0;
    let mut best_d = f32::INFINITY;
    for (j, &c) in code.iter().enumerate() {
        let d = (x - c).abs();
        if d < best_d {
            best = j;
            best_d = d;
        }
    }
    best
}

impl Nf4Tensor {
    /// Quantize `w` (any float dtype, any shape) to NF4 as `bitsandbytes.functional.quantize_4bit(w,
    /// blocksize, quant_type="nf4", compress_statistics=double_quant)`.
    pub fn quantize(w: &Tensor, blocksize: usize, double_quant: bool) -> Result<Self> {
        check_blocksize(blocksize)?;
        use rayon::prelude::*;
        let values = w.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let n = values.len();
        // Blocks are independent, so they are quantized in parallel (same values as in order).
        let mut absmax = vec![0f32; n.div_ceil(blocksize)];
        let mut codes = vec![7u8; n + n % 2]; // bitsandbytes pads an odd count with a zero weight, code 7
        codes[..n].par_chunks_mut(blocksize).zip(values.par_chunks(blocksize)).zip(absmax.par_iter_mut()).for_each(|((c, block), m)| {
            *m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let r = 1.0 / *m;
            for (c, &v) in c.iter_mut().zip(block) {
                *c = nearest_nf4((v * r).clamp(-1.0, 1.0));
            }
        });
        let packed = codes.par_chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
        let absmax = if double_quant { double_quantize(&absmax) } else { Absmax::F32(absmax) };
        Ok(Self {
            shape: w.dims().to_vec(),
            dtype: w.dtype(),
            blocksize,
            code: NF4_CODE.to_vec(),
            packed,
            absmax,
            device: w.device().clone(),
            on_device: Default::default(),
        })
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn num_blocks(&self) -> usize {
        self.elem_count().div_ceil(self.blocksize)
    }

    /// The per-block scales in f32 (undoing the double quantization).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::F32(a) => a.clone(),
            Absmax::Double { quantized, nested_absmax, nested_code, offset, nested_blocksize } => quantized
                .iter()
                .enumerate()
                .map(|(i, &q)| nested_code[q as usize] * nested_absmax[i / nested_blocksize] + offset)
                .collect(),
        }
    }

    /// The weights in f32, before rounding to the stored dtype.
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let n = self.elem_count();
        let absmax = self.absmax_f32();
        let mut out = Vec::with_capacity(n);
        for (i, &byte) in self.packed.iter().enumerate() {
            for (k, q) in [byte >> 4, byte & 0xF].into_iter().enumerate() {
                let j = 2 * i + k;
                if j < n {
                    out.push(self.code[q as usize] * absmax[j / self.blocksize]);
                }
            }
        }
        out
    }

    /// The dequantized matrix in its stored dtype (what `dequantize_4bit` returns), converted to
    /// `dtype`, on `self.device`. Costs a dense matrix: 2 or 4 bytes per weight. On a GPU the
    /// kernel of `kernels/nf4.cu` reads the packed buffers there; elsewhere this CPU reference.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        if self.device.is_cuda() {
            return crate::quant::nf4_kernels::dequantize(self, dtype);
        }
        self.dequantize_reference(dtype)
    }

    /// The CPU reference of [`Self::dequantize`], whatever the device.
    pub fn dequantize_reference(&self, dtype: DType) -> Result<Tensor> {
        let t = Tensor::from_vec(self.dequantize_f32(), self.shape.as_slice(), &Device::Cpu)?;
        Ok(t.to_dtype(self.dtype)?.to_dtype(dtype)?.to_device(&self.device)?)
    }

    /// The buffers on `self.device`, uploaded once.
    pub fn device_buffers(&self) -> Result<&Nf4DeviceBuffers> {
        if let Some(b) = self.on_device.get() {
            return Ok(b);
        }
        let dev = &self.device;
        let f32s = |v: &[f32]| Tensor::new(v, dev);
        let (absmax_q, scales, offset, double_quant, nested_blocksize) = match &self.absmax {
            Absmax::F32(a) => (Tensor::zeros(1, DType::U8, dev)?, f32s(a)?, 0.0, false, 1),
            Absmax::Double { quantized, nested_absmax, offset, nested_blocksize, .. } => {
                (Tensor::new(quantized.as_slice(), dev)?, f32s(nested_absmax)?, *offset, true, *nested_blocksize)
            }
        };
        let mut tables = self.code.clone();
        match &self.absmax {
            Absmax::Double { nested_code, .. } => tables.extend_from_slice(nested_code),
            Absmax::F32(_) => tables.extend_from_slice(&[0.0; 256]),
        }
        let buffers = Nf4DeviceBuffers {
            packed: Tensor::new(self.packed.as_slice(), dev)?,
            absmax_q,
            scales,
            tables: f32s(&tables)?,
            offset,
            double_quant,
            nested_blocksize,
        };
        Ok(self.on_device.get_or_init(|| buffers))
    }

    /// Bytes of the quantized storage: packed codes, the scales, the nested scales and offset,
    /// and the two code tables, as laid out here (and in a bitsandbytes checkpoint).
    pub fn storage_bytes(&self) -> usize {
        let scales = match &self.absmax {
            Absmax::F32(a) => 4 * a.len(),
            Absmax::Double { quantized, nested_absmax, nested_code, .. } => {
                quantized.len() + 4 * nested_absmax.len() + 4 * nested_code.len() + 4
            }
        };
        self.packed.len() + scales + 4 * self.code.len()
    }

    /// What [`Self::storage_bytes`] would be for a matrix of `n` weights, without quantizing one.
    pub fn storage_bytes_for(n: usize, blocksize: usize, double_quant: bool) -> usize {
        let blocks = n.div_ceil(blocksize);
        let scales =
            if double_quant { blocks + 4 * blocks.div_ceil(NESTED_BLOCKSIZE) + 4 * 256 + 4 } else { 4 * blocks };
        n.div_ceil(2) + scales + 4 * 16
    }

    /// Check the buffers against the shape and block size; `what` names the tensor in errors.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !BLOCKSIZES.contains(&self.blocksize) {
            return Err(format!("NF4 block size {} is not one of {BLOCKSIZES:?}", self.blocksize));
        }
        let n = self.elem_count();
        if self.packed.len() != n.div_ceil(2) {
            return Err(format!(
                "packed NF4 buffer has {} bytes, expected {} for shape {:?}",
                self.packed.len(),
                n.div_ceil(2),
                self.shape
            ));
        }
        if self.code.len() != 16 {
            return Err(format!("quant_map has {} values, expected 16", self.code.len()));
        }
        let blocks = self.num_blocks();
        match &self.absmax {
            Absmax::F32(a) if a.len() != blocks => Err(format!("absmax has {} values, expected {blocks}", a.len())),
            Absmax::Double { quantized, nested_absmax, nested_code, nested_blocksize, .. } => {
                if quantized.len() != blocks {
                    return Err(format!("absmax has {} values, expected {blocks}", quantized.len()));
                }
                if *nested_blocksize == 0 || nested_absmax.len() != blocks.div_ceil(*nested_blocksize) {
                    return Err(format!(
                        "nested_absmax has {} values, expected {} (nested block size {nested_blocksize})",
                        nested_absmax.len(),
                        blocks.div_ceil((*nested_blocksize).max(1))
                    ));
                }
                if nested_code.len() != 256 {
                    return Err(format!("nested_quant_map has {} values, expected 256", nested_code.len()));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// `offset = mean(absmax)`, then 8-bit blockwise quantization of `absmax − offset`.
pub fn double_quantize(absmax: &[f32]) -> Absmax {
    let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let code = dynamic_map_signed();
    let (quantized, nested_absmax) = quantize_blockwise_8bit(&centred, &code, NESTED_BLOCKSIZE);
    Absmax::Double { quantized, nested_absmax, nested_code: code.to_vec(), offset, nested_blocksize: NESTED_BLOCKSIZE }
}

/// The JSON that bitsandbytes stores in `weight.quant_state.bitsandbytes__nf4`.
#[derive(Debug, serde::Deserialize)]
pub struct QuantStateJson {
    pub quant_type: String,
    pub blocksize: usize,
    pub dtype: String,
    pub shape: Vec<usize>,
    #[serde(default)]
    pub nested_blocksize: Option<usize>,
    #[serde(default)]
    pub nested_offset: Option<f32>,
}

fn parse_dtype(s: &str) -> Option<DType> {
    match s.trim_start_matches("torch.") {
        "float32" => Some(DType::F32),
        "bfloat16" => Some(DType::BF16),
        "float16" => Some(DType::F16),
        _ => None,
    }
}

/// The quant-state key suffixes bitsandbytes writes, one per 4-bit quant type.
pub const QUANT_STATE_NF4: &str = "quant_state.bitsandbytes__nf4";
pub const QUANT_STATE_FP4: &str = "quant_state.bitsandbytes__fp4";

impl Nf4Tensor {
    /// Read a matrix saved by transformers + bitsandbytes under `name` (e.g.
    /// `model.layers.0.self_attn.q_proj.weight`): `name` (packed uint8), `name.absmax`,
    /// `name.quant_map`, and with double quant `name.nested_absmax`, `name.nested_quant_map`;
    /// the shape, dtype, block sizes and offset come from `name.quant_state.bitsandbytes__nf4`.
    /// Errors name the tensor.
    pub fn from_bnb(weights: &crate::weights::Weights, name: &str, device: &Device) -> Result<Self> {
        let bad = |msg: String| Error::BadTensor { origin: weights.origin().to_string(), name: name.to_string(), msg };
        if weights.contains(&format!("{name}.{QUANT_STATE_FP4}")) {
            return Err(bad("quant_state names quant type `fp4`; only `nf4` is supported".into()));
        }
        let cpu = Device::Cpu;
        let u8s =
            |n: &str| -> Result<Vec<u8>> { Ok(weights.get_any(n, DType::U8, &cpu)?.flatten_all()?.to_vec1::<u8>()?) };
        let f32s = |n: &str| -> Result<Vec<f32>> {
            Ok(weights.get_any(n, DType::F32, &cpu)?.flatten_all()?.to_vec1::<f32>()?)
        };
        let state_bytes = u8s(&format!("{name}.{QUANT_STATE_NF4}"))?;
        let state: QuantStateJson =
            serde_json::from_slice(&state_bytes).map_err(|e| bad(format!("quant_state is not valid JSON: {e}")))?;
        if state.quant_type != "nf4" {
            return Err(bad(format!("quant_state names quant type `{}`; only `nf4` is supported", state.quant_type)));
        }
        let dtype =
            parse_dtype(&state.dtype).ok_or_else(|| bad(format!("quant_state dtype `{}` unsupported", state.dtype)))?;
        let packed = u8s(name)?;
        let code = f32s(&format!("{name}.quant_map"))?;
        let nested = format!("{name}.nested_absmax");
        let absmax = if weights.contains(&nested) {
            Absmax::Double {
                quantized: u8s(&format!("{name}.absmax"))?,
                nested_absmax: f32s(&nested)?,
                nested_code: f32s(&format!("{name}.nested_quant_map"))?,
                offset: state.nested_offset.ok_or_else(|| bad("quant_state has no nested_offset".into()))?,
                nested_blocksize: state
                    .nested_blocksize
                    .ok_or_else(|| bad("quant_state has no nested_blocksize".into()))?,
            }
        } else {
            Absmax::F32(f32s(&format!("{name}.absmax"))?)
        };
        let t = Self {
            shape: state.shape,
            dtype,
            blocksize: state.blocksize,
            code,
            packed,
            absmax,
            device: device.clone(),
            on_device: Default::default(),
        };
        t.validate().map_err(bad)?;
        Ok(t)
    }
}

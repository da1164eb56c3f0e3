//! GGUF's block-quantized matrices kept packed at inference, with llama.cpp's dot products.
//!
//! Layout (ggml's, bit for bit as GGUF stores it): a matrix W [rows, cols] is `rows` runs of
//! `cols / 32` blocks, row-major; a block holds 32 consecutive weights of a row:
//!
//! | type | bytes | block | weight i |
//! |---|---|---|---|
//! | Q4_0 | 18 | `d: f16, qs: [u8; 16]` | `d · (q_i − 8)`, `q_i` the low nibble of `qs[i]` (i < 16) or the high nibble of `qs[i − 16]` |
//! | Q4_1 | 20 | `d: f16, m: f16, qs: [u8; 16]` | `d · q_i + m` |
//! | Q5_0 | 22 | `d: f16, qh: u32, qs: [u8; 16]` | `d · (q_i + 16 h_i − 16)`, `h_i` bit i of qh |
//! | Q5_1 | 24 | `d: f16, m: f16, qh: u32, qs: [u8; 16]` | `d · (q_i + 16 h_i) + m` |
//! | Q8_0 | 34 | `d: f16, qs: [i8; 32]` | `d · qs[i]` |
//!
//! The K-quants (Q4_K, Q5_K, Q6_K), in super-blocks of 256 with scales per 32 or 16 weights, are
//! in `k_quants`, whose product quantizes x per super-block instead (llama.cpp's Q8_K).
//!
//! The product `y = x Wᵀ` quantizes each row of x to 8 bits per block of 32 first, as llama.cpp
//! does (`x_i ≈ d_x · p_i`, `d_x = max|x| / 127`, with `s_x = d_x · Σ p_i` kept for the types with
//! an offset), so a block's dot product is an integer sum: `d_w d_x Σ q_i p_i` (+ `m · s_x`).
//! The integer sums run on AVX-512 VNNI or AVX2 where the CPU has them (chosen at run time,
//! `CANDLE_PEFT_SIMD=scalar|avx2` forces a lower level), else on the scalar code here, which is
//! the reference the others are tested against. Output rows are split over the threads.
//!
//! On AVX2 the Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 matrices are kept with 8 rows interleaved instead
//! (`interleaved`: the same bytes, a product with a quarter of the scaling work), which is what
//! makes prompts and batches of rows cheaper from the packed blocks than dequantized.

pub mod interleaved;
pub mod k_quants;

use std::borrow::Cow;
use std::sync::OnceLock;

use candle_core::quantized::GgmlDType;
use half::f16;
use rayon::prelude::*;

use crate::{Error, Result};

/// Weights per block, for every type here.
pub const BLOCK: usize = 32;

/// Up to this many rows of x, `x Wᵀ` on a row-major matrix reads the packed blocks; above,
/// dequantizing W and a dense GEMM is faster. An interleaved matrix reads its blocks for any
/// number of rows (`QMatrix::packed_product_pays`).
pub const PACKED_ROWS_MAX: usize = 16;

/// The block types kept packed, named as llama.cpp names them.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl BlockType {
    pub fn from_ggml(t: GgmlDType) -> Option<Self> {
        Some(match t {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K => Self::Q4_K,
            GgmlDType::Q5K => Self::Q5_K,
            GgmlDType::Q6K => Self::Q6_K,
            _ => return None,
        })
    }

    pub fn to_ggml(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_K => GgmlDType::Q4K,
            Self::Q5_K => GgmlDType::Q5K,
            Self::Q6_K => GgmlDType::Q6K,
        }
    }

    /// The type named as llama.cpp names it (`q4_0`, `q4_k`, ...), any case.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| format!("{t:?}").eq_ignore_ascii_case(name))
    }

    pub const ALL: [BlockType; 8] = [Self::Q4_0, Self::Q4_1, Self::Q5_0, Self::Q5_1, Self::Q8_0, Self::Q4_K, Self::Q5_K, Self::Q6_K];

    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
        }
    }

    /// Weights per block: 32, or a K-quant's super-block of 256.
    pub fn block_len(self) -> usize {
        if self.is_k_quant() { k_quants::SUPER } else { BLOCK }
    }

    pub fn is_k_quant(self) -> bool {
        matches!(self, Self::Q4_K | Self::Q5_K | Self::Q6_K)
    }

    /// Sets a block's f16 scales (d, and the offset or min where the type has one) to `d`:
    /// random bytes with this made a block whose weights are small and finite.
    pub fn set_scales(self, block: &mut [u8], d: f16) {
        let d = d.to_le_bytes();
        match self {
            Self::Q6_K => block[208..210].copy_from_slice(&d),
            Self::Q4_1 | Self::Q5_1 | Self::Q4_K | Self::Q5_K => {
                block[..2].copy_from_slice(&d);
                block[2..4].copy_from_slice(&d);
            }
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 => block[..2].copy_from_slice(&d),
        }
    }
}

/// A packed matrix W [rows, cols].
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub kind: BlockType,
    pub rows: usize,
    pub cols: usize,
    /// `[rows, cols]`.
    pub shape: [usize; 2],
    pub layout: Layout,
    pub data: Vec<u8>,
}

/// How a matrix's blocks are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// ggml's: each row's blocks in turn.
    Rows,
    /// 8 rows interleaved (`interleaved`).
    Interleaved,
}

/// One row of x quantized per block of 32: `x_i ≈ d · p_i`, and `s = d · Σ p_i` per block.
pub struct QuantizedRow {
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub p: Vec<i8>,
}

/// The SIMD level of the integer sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    Scalar,
    Avx2,
    Avx512Vnni,
}

impl Simd {
    /// The best level this CPU has, lowered by `CANDLE_PEFT_SIMD` (scalar, avx2) if set.
    pub fn detected() -> Simd {
        static LEVEL: OnceLock<Simd> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let cpu = Self::cpu();
            crate::simd::capped(cpu, Simd::Scalar, Simd::Avx2)
        })
    }

    /// Every level this CPU can run, lowest first (for the tests).
    pub fn available() -> Vec<Simd> {
        [Simd::Scalar, Simd::Avx2, Simd::Avx512Vnni].into_iter().filter(|&s| s <= Self::cpu()).collect()
    }

    fn cpu() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
            let vnni = crate::simd::cpu_has_avx512() && is_x86_feature_detected!("avx512vnni");
            if avx2 && vnni {
                return Simd::Avx512Vnni;
            }
            if avx2 {
                return Simd::Avx2;
            }
        }
        Simd::Scalar
    }
}

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 32 unsigned codes of a block (4 or 5 bits; Q8_0's are signed and read directly), and
/// the block's scale and offset (`weight_i = d · (code_i − bias) + m`).
fn codes(kind: BlockType, b: &[u8], out: &mut [u8; BLOCK]) -> (f32, f32, i32) {
    let nibbles = |qs: &[u8], out: &mut [u8; BLOCK]| {
        for i in 0..16 {
            out[i] = qs[i] & 0x0f;
            out[i + 16] = qs[i] >> 4;
        }
    };
    let high = |qh: u32, out: &mut [u8; BLOCK]| {
        for (i, o) in out.iter_mut().enumerate() {
            *o |= (((qh >> i) & 1) as u8) << 4;
        }
    };
    match kind {
        BlockType::Q4_0 => {
            nibbles(&b[2..18], out);
            (f16_at(b, 0), 0.0, 8)
        }
        BlockType::Q4_1 => {
            nibbles(&b[4..20], out);
            (f16_at(b, 0), f16_at(b, 2), 0)
        }
        BlockType::Q5_0 => {
            nibbles(&b[6..22], out);
            high(u32::from_le_bytes([b[2], b[3], b[4], b[5]]), out);
            (f16_at(b, 0), 0.0, 16)
        }
        BlockType::Q5_1 => {
            nibbles(&b[8..24], out);
            high(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), out);
            (f16_at(b, 0), f16_at(b, 2), 0)
        }
        BlockType::Q8_0 => {
            out.copy_from_slice(&b[2..2 + BLOCK]);
            (f16_at(b, 0), 0.0, 0)
        }
        BlockType::Q4_K | BlockType::Q5_K | BlockType::Q6_K => unreachable!("K-quants are read by k_quants"),
    }
}

impl QMatrix {
    pub fn new(kind: BlockType, rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        let len = kind.block_len();
        if !cols.is_multiple_of(len) {
            return Err(Error::msg(format!("{kind:?} matrix of {cols} columns: not a multiple of the block ({len})")));
        }
        let want = rows * cols / len * kind.block_bytes();
        if data.len() != want {
            return Err(Error::msg(format!("{kind:?} matrix [{rows}, {cols}] needs {want} bytes, got {}", data.len())));
        }
        Ok(Self { kind, rows, cols, shape: [rows, cols], layout: Layout::Rows, data })
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.kind.block_len() * self.kind.block_bytes()
    }

    /// Row `r`'s blocks in ggml's layout (read out of the groups when interleaved).
    pub fn row(&self, r: usize) -> Cow<'_, [u8]> {
        match self.layout {
            Layout::Rows => {
                let n = self.row_bytes();
                Cow::Borrowed(&self.data[r * n..(r + 1) * n])
            }
            Layout::Interleaved => Cow::Owned(interleaved::row_blocks(self.kind, self.cols / BLOCK, &self.data, r)),
        }
    }

    /// The matrix in the layout whose product is fastest on this CPU: interleaved where there
    /// is AVX2 and the type has that layout.
    pub fn for_this_cpu(self) -> Self {
        if Simd::detected() >= Simd::Avx2 { self.interleaved() } else { self }
    }

    /// The matrix with 8 rows interleaved (`interleaved`), when its type has that layout.
    pub fn interleaved(self) -> Self {
        if self.layout == Layout::Interleaved || !interleaved::supported(self.kind) {
            return self;
        }
        let data = interleaved::interleave(self.kind, self.rows, self.cols / BLOCK, &self.data);
        Self { layout: Layout::Interleaved, data, ..self }
    }

    /// Whether `x Wᵀ` for `rows` rows of x is faster from the packed blocks than by
    /// dequantizing W and a dense GEMM (`bench decode`'s prefill). The K-quants' product, whose
    /// scaling is once a super-block, broke even with the dense one at 400 rows.
    pub fn packed_product_pays(&self, rows: usize) -> bool {
        rows <= PACKED_ROWS_MAX || self.layout == Layout::Interleaved || self.kind.is_k_quant()
    }

    /// The same matrix with its rows in the order `order` (row i of the result is row `order[i]`),
    /// in ggml's layout.
    pub fn permute_rows(&self, order: &[usize]) -> Result<Self> {
        if order.len() != self.rows || order.iter().any(|&r| r >= self.rows) {
            return Err(Error::msg(format!("row order of length {} for a matrix of {} rows", order.len(), self.rows)));
        }
        let data = order.iter().flat_map(|&r| self.row(r).into_owned()).collect();
        Self::new(self.kind, self.rows, self.cols, data)
    }

    /// W as a [rows, cols] tensor in `dtype`.
    pub fn to_tensor(&self, dtype: candle_core::DType) -> Result<candle_core::Tensor> {
        Ok(candle_core::Tensor::from_vec(self.dequantize(), (self.rows, self.cols), &candle_core::Device::Cpu)?.to_dtype(dtype)?)
    }

    /// The rows `ids` of W (an embedding lookup) as a [ids.len(), cols] tensor in `dtype`.
    pub fn rows_tensor(&self, ids: &[u32], dtype: candle_core::DType) -> Result<candle_core::Tensor> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
            if id as usize >= self.rows {
                return Err(Error::msg(format!("token id {id} is outside the vocabulary of {} rows", self.rows)));
            }
            self.dequantize_row(id as usize, row);
        }
        Ok(candle_core::Tensor::from_vec(out, (ids.len(), self.cols), &candle_core::Device::Cpu)?.to_dtype(dtype)?)
    }

    /// Row `r` of W as f32 into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if self.kind.is_k_quant() {
            return k_quants::dequantize_row(self.kind, &self.row(r), out);
        }
        let mut q = [0u8; BLOCK];
        for (block, dst) in self.row(r).chunks_exact(self.kind.block_bytes()).zip(out.chunks_exact_mut(BLOCK)) {
            let (d, m, bias) = codes(self.kind, block, &mut q);
            for (o, &c) in dst.iter_mut().zip(&q) {
                let c = if self.kind == BlockType::Q8_0 { c as i8 as i32 } else { c as i32 - bias };
                *o = d * c as f32 + m;
            }
        }
    }

    /// W as f32, row-major (rows over the threads).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        let rows_per_task = 64;
        out.par_chunks_mut(rows_per_task * self.cols).enumerate().for_each(|(task, out)| {
            for (i, row) in out.chunks_exact_mut(self.cols).enumerate() {
                self.dequantize_row(task * rows_per_task + i, row);
            }
        });
        out
    }

    /// `y = x Wᵀ` for x [t, cols] row-major: y [t, rows], on the detected SIMD level.
    pub fn matmul(&self, x: &[f32], t: usize) -> Result<Vec<f32>> {
        self.matmul_with(x, t, Simd::detected())
    }

    pub fn matmul_with(&self, x: &[f32], t: usize, simd: Simd) -> Result<Vec<f32>> {
        if x.len() != t * self.cols {
            return Err(Error::msg(format!("x of {} values is not [{t}, {}]", x.len(), self.cols)));
        }
        if self.kind.is_k_quant() {
            let xq = k_quants::quantize_rows(x, self.cols);
            return Ok(self.rows_product(t, |w, out| k_quants::dot_rows(self.kind, w, &xq, out, simd)));
        }
        let xq = quantize_rows(x, self.cols, simd);
        #[cfg(target_arch = "x86_64")]
        if self.layout == Layout::Interleaved && simd >= Simd::Avx2 {
            // Not zeroed: the product writes every element, and zeroing the head's [8, 49152]
            // cost more than its scaling (4% of a batch-8 decode step).
            let mut y = Vec::with_capacity(t * self.rows);
            // SAFETY: the level is one this CPU has (`Simd::detected` / `available`); every
            // element of y is written before it is read (`interleaved::matmul`).
            unsafe {
                interleaved::matmul(self, &xq, y.spare_capacity_mut(), simd == Simd::Avx512Vnni);
                y.set_len(t * self.rows);
            }
            return Ok(y);
        }
        Ok(self.rows_product(t, |w, out| dot_rows(self.kind, w, &xq, out, simd)))
    }

    /// `y_i = x W_iᵀ` for matrices that read the same x [t, cols] (q, k and v; gate and up):
    /// interleaved ones quantize x once and share one parallel loop (`interleaved::matmul_many`),
    /// others are [`QMatrix::matmul`] each.
    pub fn matmul_many(ws: &[&QMatrix], x: &[f32], t: usize) -> Result<Vec<Vec<f32>>> {
        let simd = Simd::detected();
        let cols = ws.first().map_or(0, |w| w.cols);
        let shared = cfg!(target_arch = "x86_64") && simd >= Simd::Avx2 && ws.iter().all(|w| w.layout == Layout::Interleaved && w.cols == cols);
        if !shared || x.len() != t * cols {
            return ws.iter().map(|w| w.matmul(x, t)).collect();
        }
        let xq = quantize_rows(x, cols, simd);
        let mut ys: Vec<Vec<f32>> = ws.iter().map(|w| Vec::with_capacity(t * w.rows)).collect();
        #[cfg(target_arch = "x86_64")]
        {
            let mut outs: Vec<&mut [std::mem::MaybeUninit<f32>]> = ys.iter_mut().map(|y| y.spare_capacity_mut()).collect();
            // SAFETY: the level is one this CPU has (`Simd::detected`); every matrix is
            // interleaved with x's columns, and the product writes every element of each y.
            unsafe { interleaved::matmul_many(ws, &xq, &mut outs, simd == Simd::Avx512Vnni) };
            for (y, w) in ys.iter_mut().zip(ws) {
                // SAFETY: written above.
                unsafe { y.set_len(t * w.rows) };
            }
        }
        Ok(ys)
    }

    /// y [t, rows] of a row-major matrix, `dot(weight row, out)` giving a weight row's t outputs.
    fn rows_product(&self, t: usize, dot: impl Fn(&[u8], &mut [f32]) + Sync) -> Vec<f32> {
        crate::threads::rows_product(self.rows, t, |first, out| {
            for (i, o) in out.chunks_exact_mut(t).enumerate() {
                dot(&self.row(first + i), o);
            }
        })
    }
}

/// W [rows, cols] (f32, row-major) in Q8_0 blocks (ggml's `quantize_row_q8_0`: d = max|w| / 127
/// per block, round to nearest): how the types without a product here (Q2_K, Q3_K, F16)
/// are kept packed, at 8.5 bits a weight and an error under 0.4% of each block's largest weight.
pub fn quantize_q8_0(w: &[f32], rows: usize, cols: usize) -> Result<QMatrix> {
    if !cols.is_multiple_of(BLOCK) || w.len() != rows * cols {
        return Err(Error::msg(format!("Q8_0 needs [rows, cols] with cols a multiple of {BLOCK}, got {} values for [{rows}, {cols}]", w.len())));
    }
    let mut data = Vec::with_capacity(rows * cols / BLOCK * BlockType::Q8_0.block_bytes());
    let mut q = [0i8; BLOCK];
    for block in w.chunks_exact(BLOCK) {
        let d = quantize_block(block, &mut q);
        data.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        data.extend(q.iter().map(|&p| p as u8));
    }
    QMatrix::new(BlockType::Q8_0, rows, cols, data)
}

/// `x Wᵀ` for x [.., cols] of any float dtype: y [.., rows] in x's dtype, on the CPU.
pub fn matmul_tensor(w: &QMatrix, x: &candle_core::Tensor) -> Result<candle_core::Tensor> {
    crate::threads::product_tensor(x, w.cols, w.rows, "a packed weight", |values, t| w.matmul(values, t))
}

/// One block of values in 8 bits, `x_i ≈ d · p_i` with `d = max|x| / 127`, rounded to nearest,
/// ties away from zero (ggml's `quantize_row_q8_0`); returns d.
fn quantize_block(xs: &[f32], ps: &mut [i8]) -> f32 {
    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (p, &v) in ps.iter_mut().zip(xs) {
        *p = (v * inv).round() as i8;
    }
    d
}

/// The rows of x [t, cols] as 8-bit blocks, rows over the threads.
pub fn quantize_rows(x: &[f32], cols: usize, simd: Simd) -> Vec<QuantizedRow> {
    let quantize = |row: &[f32]| {
        #[cfg(target_arch = "x86_64")]
        if simd >= Simd::Avx2 {
            // SAFETY: the level is one this CPU has.
            return unsafe { x86::quantize_row_avx2(row) };
        }
        let _ = simd;
        quantize_row(row)
    };
    // A decode step's few rows take less time than waking the other threads.
    if x.len() < 1 << 15 {
        return x.chunks_exact(cols).map(quantize).collect();
    }
    x.par_chunks_exact(cols).map(quantize).collect()
}

/// A row of x as 8-bit blocks (llama.cpp's `quantize_row_q8_1`: `d = max|x| / 127` per block,
/// round to nearest, ties to even as its AVX2 code does), with `s = d · Σ p` per block.
pub fn quantize_row(x: &[f32]) -> QuantizedRow {
    let blocks = x.len() / BLOCK;
    let mut row = QuantizedRow { d: Vec::with_capacity(blocks), s: Vec::with_capacity(blocks), p: vec![0; x.len()] };
    for (xs, ps) in x.chunks_exact(BLOCK).zip(row.p.chunks_exact_mut(BLOCK)) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (p, &v) in ps.iter_mut().zip(xs) {
            *p = (v * inv).round_ties_even() as i8;
            sum += *p as i32;
        }
        row.d.push(d);
        row.s.push(d * sum as f32);
    }
    row
}

/// One weight row against the rows `xs` of x, into `out` (one value per row).
fn dot_rows(kind: BlockType, w: &[u8], xs: &[QuantizedRow], out: &mut [f32], simd: Simd) {
    #[cfg(target_arch = "x86_64")]
    if simd >= Simd::Avx2 {
        // Groups of 4 rows share each block's unpacking; SAFETY: the level is one this CPU has
        // (`Simd::detected` / `available`), and each call gets as many rows as outputs.
        for (xs, out) in xs.chunks(4).zip(out.chunks_mut(4)) {
            unsafe {
                match (simd, xs.len()) {
                    (Simd::Avx512Vnni, 4) => x86::dot_rows_vnni::<4>(kind, w, xs, out),
                    (Simd::Avx512Vnni, 3) => x86::dot_rows_vnni::<3>(kind, w, xs, out),
                    (Simd::Avx512Vnni, 2) => x86::dot_rows_vnni::<2>(kind, w, xs, out),
                    (Simd::Avx512Vnni, _) => x86::dot_rows_vnni::<1>(kind, w, xs, out),
                    (_, 4) => x86::dot_rows_avx2::<4>(kind, w, xs, out),
                    (_, 3) => x86::dot_rows_avx2::<3>(kind, w, xs, out),
                    (_, 2) => x86::dot_rows_avx2::<2>(kind, w, xs, out),
                    (_, _) => x86::dot_rows_avx2::<1>(kind, w, xs, out),
                }
            }
        }
        return;
    }
    let _ = simd;
    for (x, o) in xs.iter().zip(out) {
        *o = dot_row_scalar(kind, w, x);
    }
}

/// The reference: each block's integer sum `Σ code_i p_i`, then its scales.
fn dot_row_scalar(kind: BlockType, w: &[u8], x: &QuantizedRow) -> f32 {
    let bb = kind.block_bytes();
    let mut q = [0u8; BLOCK];
    let mut acc = 0f32;
    for (b, block) in w.chunks_exact(bb).enumerate() {
        let (d, m, bias) = codes(kind, block, &mut q);
        let p = &x.p[b * BLOCK..(b + 1) * BLOCK];
        let sum: i32 = if kind == BlockType::Q8_0 {
            q.iter().zip(p).map(|(&c, &p)| c as i8 as i32 * p as i32).sum()
        } else {
            q.iter().zip(p).map(|(&c, &p)| c as i32 * p as i32).sum()
        };
        // Σ (c − bias) p = Σ c p − bias Σ p, with Σ p = s / d.
        let psum = if x.d[b] > 0.0 { x.s[b] / x.d[b] } else { 0.0 };
        acc += d * x.d[b] * (sum as f32 - bias as f32 * psum) + m * x.s[b];
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{BlockType, QuantizedRow, BLOCK};

    /// The 32 codes of a 4- or 5-bit block as unsigned bytes in one register.
    #[inline(always)]
    unsafe fn nibbles(qs: *const u8) -> __m256i {
        let bytes = _mm_loadu_si128(qs as *const __m128i);
        let lo = _mm_and_si128(bytes, _mm_set1_epi8(0x0f));
        let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0f));
        _mm256_set_m128i(hi, lo)
    }

    /// Bit i of qh as 0x10 in byte i (Q5's fifth bits; the interleaved kernel's too).
    #[inline(always)]
    pub(super) unsafe fn high_bits(qh: u32) -> __m256i {
        // Byte i takes the qh byte that holds bit i, then tests bit (i mod 8).
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(qh as i32),
            _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000),
        );
        let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        _mm256_and_si256(set, _mm256_set1_epi8(0x10))
    }

    #[inline(always)]
    pub(super) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// f16 at byte `at` by F16C.
    #[inline(always)]
    pub(super) unsafe fn half(b: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([*b.get_unchecked(at), *b.get_unchecked(at + 1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// [`super::quantize_row`] eight lanes at a time (the same values: `vcvtps2dq` rounds to
    /// nearest even).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn quantize_row_avx2(x: &[f32]) -> QuantizedRow {
        let blocks = x.len() / BLOCK;
        let mut row = QuantizedRow { d: Vec::with_capacity(blocks), s: Vec::with_capacity(blocks), p: vec![0; x.len()] };
        let sign = _mm256_set1_ps(-0.0);
        for (b, ps) in row.p.chunks_exact_mut(BLOCK).enumerate() {
            let src = x.as_ptr().add(b * BLOCK);
            let v = [0, 8, 16, 24].map(|i| _mm256_loadu_ps(src.add(i)));
            let m = v.iter().fold(_mm256_setzero_ps(), |m, &v| _mm256_max_ps(m, _mm256_andnot_ps(sign, v)));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let d = amax / 127.0;
            let inv = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
            let q = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, inv)));
            // i32 → i16 → i8 packs within 128-bit lanes; the permute restores the order.
            let packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(ps.as_mut_ptr() as *mut __m256i, ordered);
            let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
            let s = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01)));
            row.d.push(d);
            row.s.push(d * s as f32);
        }
        row
    }

    /// # Safety
    /// The CPU has AVX2, FMA and F16C; `out.len() == xs.len() == N`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows_avx2<const N: usize>(kind: BlockType, w: &[u8], xs: &[QuantizedRow], out: &mut [f32]) {
        dot_rows::<0, N>(kind, w, xs, out, 0)
    }

    /// # Safety
    /// The CPU has AVX2, FMA, F16C and AVX-512 F, VL, BW and VNNI; `out.len() == xs.len() == N`.
    ///
    /// VNNI's `vpdpbusd` on 256-bit registers. Two blocks a 512-bit register ran at about half
    /// the speed on this project's Sapphire Rapids (64 against 115–134 tokens/s decoding
    /// SmolLM2, 2026-12-06), so there is no 512-bit path.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub unsafe fn dot_rows_vnni<const N: usize>(kind: BlockType, w: &[u8], xs: &[QuantizedRow], out: &mut [f32]) {
        dot_rows::<1, N>(kind, w, xs, out, 0)
    }

    /// A block's 32 codes as unsigned bytes (for Q8_0 their magnitudes, with the signed weights
    /// beside them), its scale d and its offset per unit of Σx: `c = m − bias·d`.
    #[inline(always)]
    unsafe fn block_codes(kind: BlockType, block: &[u8]) -> (__m256i, Option<__m256i>, f32, f32) {
        let d = half(block, 0);
        match kind {
            BlockType::Q4_0 => (nibbles(block.as_ptr().add(2)), None, d, -8.0 * d),
            BlockType::Q4_1 => (nibbles(block.as_ptr().add(4)), None, d, half(block, 2)),
            BlockType::Q5_0 => {
                let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                (_mm256_or_si256(nibbles(block.as_ptr().add(6)), high_bits(qh)), None, d, -16.0 * d)
            }
            BlockType::Q5_1 => {
                let qh = u32::from_le_bytes([block[4], block[5], block[6], block[7]]);
                (_mm256_or_si256(nibbles(block.as_ptr().add(8)), high_bits(qh)), None, d, half(block, 2))
            }
            BlockType::Q8_0 => {
                let q = _mm256_loadu_si256(block.as_ptr().add(2) as *const __m256i);
                (_mm256_sign_epi8(q, q), Some(q), d, 0.0)
            }
            BlockType::Q4_K | BlockType::Q5_K | BlockType::Q6_K => unreachable!("K-quants are read by k_quants"),
        }
    }

    /// One weight row against N rows of x, 256 bits a block: each block's codes unpacked once,
    /// then for every x row the integer sum `Σ u_i p_i` (u unsigned codes, p signed) by VNNI's
    /// `vpdpbusd`, or by AVX2's `vpmaddubsw` + `vpmaddwd` (pairs of u·p fit an i16: at most
    /// 2·128·127), scaled and accumulated in f32. `w` starts at block `first` of the row (x's
    /// blocks are indexed from there). Inlined into the entry points above.
    #[inline(always)]
    unsafe fn dot_rows<const VNNI: u8, const N: usize>(kind: BlockType, w: &[u8], xs: &[QuantizedRow], out: &mut [f32], first: usize) {
        let bb = kind.block_bytes();
        let blocks = w.len() / bb;
        let mut acc = [_mm256_setzero_ps(); N];
        let mut offset = [0f32; N];
        for i in 0..blocks {
            let (u, signs, d, c) = block_codes(kind, w.get_unchecked(i * bb..(i + 1) * bb));
            let b = first + i;
            for j in 0..N {
                let x = xs.get_unchecked(j);
                let mut p = _mm256_loadu_si256(x.p.as_ptr().add(b * BLOCK) as *const __m256i);
                if let Some(q) = signs {
                    p = _mm256_sign_epi8(p, q);
                }
                let sums = match VNNI {
                    1 => _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, p),
                    _ => _mm256_madd_epi16(_mm256_maddubs_epi16(u, p), _mm256_set1_epi16(1)),
                };
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(d * *x.d.get_unchecked(b)), acc[j]);
                // The code bias and the offset: (m − bias·d)·Σp·d_x, with d_x Σp = s_x.
                offset[j] += c * *x.s.get_unchecked(b);
            }
        }
        for j in 0..N {
            *out.get_unchecked_mut(j) = hsum(acc[j]) + offset[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Random blocks of `kind`: codes anywhere, scales small and positive or negative.
    fn random(kind: BlockType, rows: usize, cols: usize, seed: u64) -> QMatrix {
        let mut rng = StdRng::seed_from_u64(seed);
        let bb = kind.block_bytes();
        let mut data = vec![0u8; rows * cols / kind.block_len() * bb];
        for block in data.chunks_exact_mut(bb) {
            rng.fill(&mut block[..]);
            kind.set_scales(block, f16::from_f32(rng.random_range(-0.02..0.02)));
            if matches!(kind, BlockType::Q4_1 | BlockType::Q5_1) {
                block[2..4].copy_from_slice(&f16::from_f32(rng.random_range(-0.1..0.1)).to_le_bytes());
            }
        }
        QMatrix::new(kind, rows, cols, data).unwrap()
    }

    const KINDS: [BlockType; 8] = BlockType::ALL;

    #[test]
    fn dequantize_matches_candle_for_every_type() {
        for kind in KINDS {
            let cols = 3 * kind.block_len();
            let m = random(kind, 3, cols, 1);
            let storage = candle_core::quantized::QStorage::from_data(std::borrow::Cow::Borrowed(&m.data[..]), &candle_core::Device::Cpu, kind.to_ggml()).unwrap();
            let qt = candle_core::quantized::QTensor::new(storage, (3, cols)).unwrap();
            let want: Vec<f32> = qt.dequantize(&candle_core::Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(m.dequantize(), want, "{kind:?}");
        }
    }

    /// Every level against the scalar reference (same integer sums: equal up to f32 summation
    /// order), and the scalar reference against the f32 product of dequantized W with x (the
    /// error of x's 8-bit rounding), on odd shapes.
    #[test]
    fn every_simd_level_matches_the_reference() {
        let mut rng = StdRng::seed_from_u64(5);
        for kind in KINDS {
            for (rows, cols, t) in [(1, 32usize, 1), (37, 96, 1), (53, 288, 3), (130, 576, 5), (16, 64, 9)] {
                let cols = cols.next_multiple_of(kind.block_len());
                let m = random(kind, rows, cols, rows as u64);
                let x: Vec<f32> = (0..t * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                let w = m.dequantize();
                let exact: Vec<f32> = (0..t)
                    .flat_map(|j| (0..rows).map(|r| (0..cols).map(|c| x[j * cols + c] as f64 * w[r * cols + c] as f64).sum::<f64>() as f32).collect::<Vec<_>>())
                    .collect();
                let reference = m.matmul_with(&x, t, Simd::Scalar).unwrap();
                let scale = exact.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-6);
                // Against the size of the terms, Σ|x w|: a sum that cancels is no larger an error.
                let terms = (0..t * rows).map(|o| (0..cols).map(|c| (x[o / rows * cols + c] * w[o % rows * cols + c]).abs()).sum::<f32>()).fold(0f32, f32::max);
                let err = exact.iter().zip(&reference).fold(0f32, |a, (e, r)| a.max((e - r).abs())) / terms;
                assert!(err < 1e-2, "{kind:?} {rows}x{cols} t{t}: 8-bit x off by {err}");
                // Each level on both layouts (the interleaved one where the type has it).
                let interleaved = m.clone().interleaved();
                assert_eq!(interleaved.layout == Layout::Interleaved, interleaved::supported(kind));
                for simd in Simd::available() {
                    for w in [&m, &interleaved] {
                        let got = w.matmul_with(&x, t, simd).unwrap();
                        let diff = reference.iter().zip(&got).fold(0f32, |a, (r, g)| a.max((r - g).abs())) / scale;
                        assert!(diff < 1e-5, "{kind:?} {:?} {simd:?} {rows}x{cols} t{t}: {diff}", w.layout);
                    }
                }
            }
        }
    }

    #[test]
    fn x_rows_quantize_alike_on_every_level() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut x: Vec<f32> = (0..7 * 96).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        x[32..64].fill(0.0); // an all-zero block: d = 0, codes 0
        x[64] = 127.0; // 1 a code, and ties at .5 (x = 63.5 → 64, even)
        x[65] = 63.5;
        let want: Vec<QuantizedRow> = x.chunks_exact(96).map(quantize_row).collect();
        assert_eq!((want[0].p[33], want[0].p[65]), (0, 64));
        for simd in Simd::available() {
            for (a, b) in quantize_rows(&x, 96, simd).iter().zip(&want) {
                assert_eq!((&a.p, &a.d, &a.s), (&b.p, &b.d, &b.s), "{simd:?}");
            }
        }
    }

    /// Matrices sharing x in one loop give each matrix's own product bit for bit: interleaved
    /// ones of several types and row counts (a part pair of groups, a part group), and a
    /// row-major one among them (then each alone).
    #[test]
    fn products_sharing_x_equal_each_alone() {
        let mut rng = StdRng::seed_from_u64(11);
        let cols = 96;
        let ms: Vec<QMatrix> = [(BlockType::Q4_1, 40), (BlockType::Q8_0, 13), (BlockType::Q4_0, 24)]
            .into_iter()
            .enumerate()
            .map(|(i, (kind, rows))| random(kind, rows, cols, 20 + i as u64).for_this_cpu())
            .collect();
        for t in [1, 3, 8, 11] {
            let x: Vec<f32> = (0..t * cols).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let alone: Vec<Vec<f32>> = ms.iter().map(|m| m.matmul(&x, t).unwrap()).collect();
            assert_eq!(QMatrix::matmul_many(&ms.iter().collect::<Vec<_>>(), &x, t).unwrap(), alone, "t {t}");
            let rows = random(BlockType::Q4_0, 5, cols, 3);
            assert_eq!(rows.layout, Layout::Rows);
            let mixed = QMatrix::matmul_many(&[&ms[0], &rows], &x, t).unwrap();
            assert_eq!(mixed, vec![alone[0].clone(), rows.matmul(&x, t).unwrap()], "t {t}, one row-major");
        }
    }

    /// Interleaving keeps every row's bytes: each row reads back as it was, and so does W.
    #[test]
    fn interleaving_keeps_every_row() {
        for kind in KINDS.into_iter().filter(|&k| interleaved::supported(k)) {
            let m = random(kind, 13, 96, 7);
            let i = m.clone().interleaved();
            assert_eq!(i.data.len(), 16 * 96 / BLOCK * kind.block_bytes(), "{kind:?}: 13 rows padded to two groups");
            for r in 0..13 {
                assert_eq!(i.row(r), m.row(r), "{kind:?} row {r}");
            }
            assert_eq!(i.dequantize(), m.dequantize());
            assert_eq!(i.permute_rows(&(0..13).rev().collect::<Vec<_>>()).unwrap().row(0), m.row(12));
        }
    }

    #[test]
    fn q8_0_quantization_is_ggmls() {
        let mut rng = StdRng::seed_from_u64(9);
        let w: Vec<f32> = (0..4 * 64).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let ours = quantize_q8_0(&w, 4, 64).unwrap();
        let t = candle_core::Tensor::from_vec(w.clone(), (4, 64), &candle_core::Device::Cpu).unwrap();
        let theirs = candle_core::quantized::QTensor::quantize(&t, GgmlDType::Q8_0).unwrap();
        assert_eq!(ours.data, theirs.data().unwrap().into_owned());
        let back = ours.dequantize();
        let err = w.iter().zip(&back).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(err <= 0.5 / 127.0 + 1e-3, "{err}");
        assert!(quantize_q8_0(&w, 4, 63).is_err());
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(QMatrix::new(BlockType::Q4_0, 2, 48, vec![0; 36]).is_err());
        assert!(QMatrix::new(BlockType::Q4_0, 2, 64, vec![0; 10]).is_err());
        let m = random(BlockType::Q8_0, 2, 32, 0);
        assert!(m.matmul(&[0.0; 31], 1).is_err());
        assert!(m.permute_rows(&[0, 2]).is_err());
        assert_eq!(m.permute_rows(&[1, 0]).unwrap().row(0), m.row(1));
    }
}

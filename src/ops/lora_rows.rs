//! LoRA's term at inference on the CPU, added in place row by row, each row with its own adapter:
//!
//! `y[i] += s_a · B_a (A_a x[i])` for every row i whose adapter is a,
//!
//! the segmented LoRA of Punica (SGMV) and S-LoRA, by which one batch serves many adapters over
//! one base: the base product is computed once for all rows, and each adapter's two thin
//! products only for its rows, its A and B read once per call for all of them.
//!
//! Layout: x [rows, in] and y [rows, out], row-major f32; A [r, in] row-major (PEFT's `lora_A`),
//! B [out, r] row-major (PEFT's `lora_B`) or transposed, [r, out] (`Factors::b_transposed`: what a
//! mixed layer keeps, made once when an adapter is attached). First `u = A x[i]`, r dot products
//! of length in, 8 at a time with their sums reduced together (`attention_cpu::x86::dots`); with
//! AVX-512, up to 4 rows of one adapter at once against 4 rows of A, so that each load of A is
//! widened once for all of them (the same sums in the same order for a row alone). Then
//! `y[i][j] += s · Σ_k u[k] B[j][k]`: every output one chain of fused multiply-adds over k in
//! order, 8 outputs side by side in a register's lanes (16 with AVX-512 from Bᵀ), up to 4 rows
//! of one adapter at once sharing B's loads. From B transposed a lane's values are one load; from
//! B by rows, 8 rows are read and transposed in registers (which costs shuffles, so the mixed
//! layer keeps Bᵀ). Both give the same bits, as does the one-output-at-a-time path for the
//! columns left over: a row's sums run in one fixed order whatever its layout, its companions or
//! the other rows of the batch, so a row gives the same bits alone or batched. The reference is
//! the f64 composition `reference`; the tests compare the two.

use candle_core::DType;

use super::attention_cpu::Element;

/// One adapter's factors and scale, borrowed: f32, or bf16 / f16 read as stored and widened
/// (`--adapter-dtype`: a batch of many adapters is bound by reading their factors).
#[derive(Clone, Copy)]
pub struct Factors<'a, T> {
    /// [r, in]
    pub a: &'a [T],
    /// [out, r], or [r, out] when `b_transposed`
    pub b: &'a [T],
    pub b_transposed: bool,
    pub r: usize,
    pub scale: f32,
}

impl<T: Element> Factors<'_, T> {
    /// `B[j][k]` for a layer of `cols_out` outputs.
    fn b_at(&self, j: usize, k: usize, cols_out: usize) -> f32 {
        (if self.b_transposed { self.b[k * cols_out + j] } else { self.b[j * self.r + k] }).into()
    }
}

/// `y[i] += s · B (A x[i])` for each row i with `adapter_of[i] = Some(a)`, factors `adapters[a]`.
pub fn add<T: Element>(x: &[f32], y: &mut [f32], shape: (usize, usize), adapter_of: &[Option<usize>], adapters: &[Factors<T>]) {
    add_at(x, y, shape, adapter_of, adapters, crate::simd::avx512());
}

/// [`add`], on the AVX-512 kernels (`wide`, where the CPU has them) or not.
fn add_at<T: Element>(x: &[f32], y: &mut [f32], (cols_in, cols_out): (usize, usize), adapter_of: &[Option<usize>], adapters: &[Factors<T>], wide: bool) {
    let rows = adapter_of.len();
    debug_assert!(x.len() == rows * cols_in && y.len() == rows * cols_out);
    let simd = crate::simd::avx2_fma_f16c();
    // u = A x for each row with an adapter ([rows, r_max], zero elsewhere).
    let r_max = adapters.iter().map(|f| f.r).max().unwrap_or(0);
    // A decoding step's row or few is less work than a parallel loop's scheduling costs.
    let work: usize = adapter_of.iter().flatten().map(|&a| adapters[a].r * (cols_in + cols_out)).sum();
    let parallel = work >= PARALLEL_WORK;
    let mut u = vec![0f32; rows * r_max];
    let mut rows_of_adapter = vec![Vec::new(); adapters.len()];
    for (i, a) in adapter_of.iter().enumerate() {
        if let Some(a) = a {
            rows_of_adapter[*a].push(i);
        }
    }
    if wide {
        // Up to ROW_GROUP rows of one adapter at once, sharing each load of A.
        let groups: Vec<(usize, &[usize])> = rows_of_adapter.iter().enumerate().flat_map(|(a, rows)| rows.chunks(ROW_GROUP).map(move |g| (a, g))).collect();
        let out = crate::threads::DisjointOut(u.as_mut_ptr());
        let shrink = |g: usize| {
            let out = &out;
            let (a, rows) = groups[g];
            let (mut xs, mut us) = ([std::ptr::null(); ROW_GROUP], [std::ptr::null_mut(); ROW_GROUP]);
            for (n, &i) in rows.iter().enumerate() {
                xs[n] = x[i * cols_in..].as_ptr();
                // SAFETY: row i of u [rows, r_max]: each row is in one group only.
                us[n] = unsafe { out.0.add(i * r_max) };
            }
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the CPU has AVX-512 F, BW, VL (`wide`); rows of x of cols_in values, of u
            // of at least r values.
            unsafe {
                x512::shrink(&adapters[a], cols_in, &xs[..rows.len()], &us[..rows.len()])
            };
        };
        if parallel {
            crate::threads::for_each_task(groups.len(), shrink);
        } else {
            (0..groups.len()).for_each(shrink);
        }
    } else {
        let project = |i: usize, u: &mut [f32]| {
            let x = &x[i * cols_in..(i + 1) * cols_in];
            if let Some(f) = adapter_of[i].map(|a| &adapters[a]) {
                dots_into(x, f.a, cols_in, &mut u[..f.r], simd);
            }
        };
        if parallel {
            crate::threads::for_each_chunk_mut(&mut u, r_max.max(1), project);
        } else {
            u.chunks_mut(r_max.max(1)).enumerate().for_each(|(i, u)| project(i, u));
        }
    }
    // y[i] += s · B u[i] over column blocks (each task writes its own columns), up to ROW_GROUP
    // rows of an adapter at once.
    const COLUMNS: usize = 128;
    let out = crate::threads::DisjointOut(y.as_mut_ptr());
    let expand_block = |block: usize| {
        let out = &out;
        let cols = block * COLUMNS..((block + 1) * COLUMNS).min(cols_out);
        for (f, rows) in adapters.iter().zip(&rows_of_adapter) {
            for group in rows.chunks(ROW_GROUP) {
                // On the stack: this runs for every adapter of every column block of every call.
                let (mut us, mut ys) = ([&[][..]; ROW_GROUP], [std::ptr::null_mut(); ROW_GROUP]);
                for (n, &i) in group.iter().enumerate() {
                    us[n] = &u[i * r_max..i * r_max + f.r];
                    // SAFETY: row i of y [rows, cols_out]; this task writes only its columns `cols`.
                    ys[n] = unsafe { out.0.add(i * cols_out) };
                }
                // SAFETY: as above; B holds [cols_out, r] values.
                unsafe { expand(f, cols_out, cols.clone(), &us[..group.len()], &ys[..group.len()], simd, wide) };
            }
        }
    };
    if parallel {
        crate::threads::for_each_task(cols_out.div_ceil(COLUMNS), expand_block);
    } else {
        (0..cols_out.div_ceil(COLUMNS)).for_each(expand_block);
    }
}

/// Rows of one adapter expanded together.
const ROW_GROUP: usize = 4;

/// `y_n[j] = s · (Σ_k u_n[k] B[j][k]) + y_n[j]` for j in `cols` and the rows n of `us` / `ys`,
/// every output one chain of fused multiply-adds over k in order (the module doc).
///
/// # Safety
/// `ys[n]` points at a row of y of `cols_out` values that no one else writes in `cols`;
/// `us.len() == ys.len() <= ROW_GROUP`, each u of f.r values.
unsafe fn expand<T: Element>(f: &Factors<T>, cols_out: usize, cols: std::ops::Range<usize>, us: &[&[f32]], ys: &[*mut f32], simd: bool, wide: bool) {
    let mut j = cols.start;
    #[cfg(target_arch = "x86_64")]
    if simd {
        if wide && f.b_transposed {
            // SAFETY: the CPU has AVX-512 F, BW and VL (`wide`). Lane for lane the same
            // multiply-adds as the 8-lane code: the same bits.
            j = match us.len() {
                4 => x512::expand_transposed::<T, 4>(f, cols_out, cols.clone(), us, ys),
                3 => x512::expand_transposed::<T, 3>(f, cols_out, cols.clone(), us, ys),
                2 => x512::expand_transposed::<T, 2>(f, cols_out, cols.clone(), us, ys),
                _ => x512::expand_transposed::<T, 1>(f, cols_out, cols.clone(), us, ys),
            };
        }
        let cols = j..cols.end;
        // SAFETY: the CPU has AVX2, FMA and F16C (`simd`).
        j = match (us.len(), f.b_transposed) {
            (4, true) => x86::expand_transposed::<T, 4, 2>(f, cols_out, cols.clone(), us, ys),
            (3, true) => x86::expand_transposed::<T, 3, 2>(f, cols_out, cols.clone(), us, ys),
            (2, true) => x86::expand_transposed::<T, 2, 4>(f, cols_out, cols.clone(), us, ys),
            (_, true) => x86::expand_transposed::<T, 1, 4>(f, cols_out, cols.clone(), us, ys),
            (4, false) => x86::expand_rows::<T, 4>(f, cols.clone(), us, ys),
            (3, false) => x86::expand_rows::<T, 3>(f, cols.clone(), us, ys),
            (2, false) => x86::expand_rows::<T, 2>(f, cols.clone(), us, ys),
            (_, false) => x86::expand_rows::<T, 1>(f, cols.clone(), us, ys),
        };
    }
    let _ = (simd, wide);
    for j in j..cols.end {
        for (u, y) in us.iter().zip(ys) {
            let acc = (0..f.r).fold(0f32, |acc, k| u[k].mul_add(f.b_at(j, k, cols_out), acc));
            let y = y.add(j);
            *y = f.scale.mul_add(acc, *y);
        }
    }
}

// The loops index several arrays by one row or register number, as the formulas do.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Element, Factors};

    /// [`super::expand`] from B transposed, 8 W outputs a step for N rows (N W chains); returns
    /// the first column it left (fewer than 8 from the end).
    ///
    /// # Safety
    /// AVX2 and FMA; as `expand`, with `us.len() == N`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn expand_transposed<T: Element, const N: usize, const W: usize>(f: &Factors<T>, cols_out: usize, cols: std::ops::Range<usize>, us: &[&[f32]], ys: &[*mut f32]) -> usize {
        let mut j = cols.start;
        while j + 8 * W <= cols.end {
            columns_transposed::<T, N, W>(f, cols_out, j, us, ys);
            j += 8 * W;
        }
        while j + 8 <= cols.end {
            columns_transposed::<T, N, 1>(f, cols_out, j, us, ys);
            j += 8;
        }
        j
    }

    #[inline(always)]
    unsafe fn columns_transposed<T: Element, const N: usize, const W: usize>(f: &Factors<T>, cols_out: usize, j: usize, us: &[&[f32]], ys: &[*mut f32]) {
        let mut acc = [[_mm256_setzero_ps(); W]; N];
        for k in 0..f.r {
            let row = f.b.as_ptr().add(k * cols_out + j);
            let b: [__m256; W] = std::array::from_fn(|w| T::load8(row.add(8 * w)));
            for n in 0..N {
                let u = _mm256_set1_ps(*us.get_unchecked(n).get_unchecked(k));
                for w in 0..W {
                    acc[n][w] = _mm256_fmadd_ps(u, b[w], acc[n][w]);
                }
            }
        }
        store(f.scale, &acc, j, ys);
    }

    /// y_n[j + 8w ..] = s · acc[n][w] + y_n[j + 8w ..].
    #[inline(always)]
    unsafe fn store<const N: usize, const W: usize>(scale: f32, acc: &[[__m256; W]; N], j: usize, ys: &[*mut f32]) {
        let s = _mm256_set1_ps(scale);
        for n in 0..N {
            for w in 0..W {
                let y = ys.get_unchecked(n).add(j + 8 * w);
                _mm256_storeu_ps(y, _mm256_fmadd_ps(s, acc[n][w], _mm256_loadu_ps(y)));
            }
        }
    }

    /// [`super::expand`] from B by rows, 8 outputs a step: B's 8 rows read 8 values at a time
    /// and transposed in registers, so that lane t of column m holds `B[j + t][k + m]`; returns
    /// the first column it left.
    ///
    /// # Safety
    /// AVX2 and FMA; as `expand`, with `us.len() == N`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn expand_rows<T: Element, const N: usize>(f: &Factors<T>, cols: std::ops::Range<usize>, us: &[&[f32]], ys: &[*mut f32]) -> usize {
        let (r, mut j) = (f.r, cols.start);
        while j + 8 <= cols.end {
            let base = f.b.as_ptr().add(j * r);
            let mut acc = [[_mm256_setzero_ps(); 1]; N];
            let mut k = 0;
            while k + 8 <= r {
                let columns = transpose8(std::array::from_fn(|t| T::load8(base.add(t * r + k))));
                for (m, column) in columns.iter().enumerate() {
                    for n in 0..N {
                        acc[n][0] = _mm256_fmadd_ps(_mm256_set1_ps(*us.get_unchecked(n).get_unchecked(k + m)), *column, acc[n][0]);
                    }
                }
                k += 8;
            }
            for k in k..r {
                let column: [f32; 8] = std::array::from_fn(|t| (*base.add(t * r + k)).into());
                let column = _mm256_loadu_ps(column.as_ptr());
                for n in 0..N {
                    acc[n][0] = _mm256_fmadd_ps(_mm256_set1_ps(*us.get_unchecked(n).get_unchecked(k)), column, acc[n][0]);
                }
            }
            store(f.scale, &acc, j, ys);
            j += 8;
        }
        j
    }

    /// The 8 x 8 transpose: `out[m]` lane t is `rows[t]` lane m.
    #[inline(always)]
    unsafe fn transpose8(rows: [__m256; 8]) -> [__m256; 8] {
        let [r0, r1, r2, r3, r4, r5, r6, r7] = rows;
        let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
        let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
        let (t4, t5) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5));
        let (t6, t7) = (_mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
        let (u0, u1) = (_mm256_shuffle_ps::<0x44>(t0, t2), _mm256_shuffle_ps::<0xee>(t0, t2));
        let (u2, u3) = (_mm256_shuffle_ps::<0x44>(t1, t3), _mm256_shuffle_ps::<0xee>(t1, t3));
        let (u4, u5) = (_mm256_shuffle_ps::<0x44>(t4, t6), _mm256_shuffle_ps::<0xee>(t4, t6));
        let (u6, u7) = (_mm256_shuffle_ps::<0x44>(t5, t7), _mm256_shuffle_ps::<0xee>(t5, t7));
        [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ]
    }
}

/// AVX-512's `u = A x`: rows of one adapter together, each load of A widened once for them.
#[cfg(target_arch = "x86_64")]
mod x512 {
    use std::arch::x86_64::*;

    use super::{Element, Factors};
    use crate::ops::attention_cpu::x512::dots;

    /// `us[n][k] = A[k] · xs[n]` for k < r, 4 rows of A at a time (4 · N sums of 16 lanes, each
    /// over the columns in order, then the lanes by one fixed tree: a row's bits do not depend on
    /// its companions).
    ///
    /// # Safety
    /// AVX2, FMA, F16C and AVX-512 F, BW, VL; each `xs[n]` holds `len` values, each `us[n]` r;
    /// 1 to 4 rows.
    pub unsafe fn shrink<T: Element>(f: &Factors<T>, len: usize, xs: &[*const f32], us: &[*mut f32]) {
        match xs.len() {
            4 => shrink_n::<T, 4>(f, len, xs, us),
            3 => shrink_n::<T, 3>(f, len, xs, us),
            2 => shrink_n::<T, 2>(f, len, xs, us),
            _ => shrink_n::<T, 1>(f, len, xs, us),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    unsafe fn shrink_n<T: Element, const N: usize>(f: &Factors<T>, len: usize, xs: &[*const f32], us: &[*mut f32]) {
        const K: usize = 4;
        let mut x = [std::ptr::null::<f32>(); N];
        x.copy_from_slice(&xs[..N]);
        let mut k = 0;
        while k < f.r {
            let kk = (f.r - k).min(K);
            // A part block's missing rows repeat its last one; their sums are not stored.
            let mut a = [std::ptr::null::<T>(); K];
            for (i, a) in a.iter_mut().enumerate() {
                *a = f.a.as_ptr().add((k + i.min(kk - 1)) * len);
            }
            // The rows of x against 4 rows of A: attention's query heads against its keys.
            let sums = dots::<T, N, K>(&x, &a, len);
            for (sums, u) in sums.iter().zip(us) {
                std::ptr::copy_nonoverlapping(sums.as_ptr(), u.add(k), kk);
            }
            k += kk;
        }
    }

    /// `super::expand` from Bᵀ, 64 and then 16 outputs a step in 16-lane registers; returns the
    /// first column it left.
    ///
    /// # Safety
    /// AVX2, FMA, F16C and AVX-512 F, BW, VL; as `expand`, with `us.len() == N`.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
    pub unsafe fn expand_transposed<T: Element, const N: usize>(f: &Factors<T>, cols_out: usize, cols: std::ops::Range<usize>, us: &[&[f32]], ys: &[*mut f32]) -> usize {
        let mut j = cols.start;
        while j + 64 <= cols.end {
            columns_transposed::<T, N, 4>(f, cols_out, j, us, ys);
            j += 64;
        }
        while j + 16 <= cols.end {
            columns_transposed::<T, N, 1>(f, cols_out, j, us, ys);
            j += 16;
        }
        j
    }

    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn columns_transposed<T: Element, const N: usize, const W: usize>(f: &Factors<T>, cols_out: usize, j: usize, us: &[&[f32]], ys: &[*mut f32]) {
        let mut acc = [[_mm512_setzero_ps(); W]; N];
        for k in 0..f.r {
            let row = f.b.as_ptr().add(k * cols_out + j);
            let mut b = [_mm512_setzero_ps(); W];
            for w in 0..W {
                b[w] = T::load16(row.add(16 * w), u16::MAX);
            }
            for n in 0..N {
                let u = _mm512_set1_ps(*us.get_unchecked(n).get_unchecked(k));
                for w in 0..W {
                    acc[n][w] = _mm512_fmadd_ps(u, b[w], acc[n][w]);
                }
            }
        }
        let s = _mm512_set1_ps(f.scale);
        for n in 0..N {
            for w in 0..W {
                let y = ys.get_unchecked(n).add(j + 16 * w);
                _mm512_storeu_ps(y, _mm512_fmadd_ps(s, acc[n][w], _mm512_loadu_ps(y)));
            }
        }
    }
}

/// Multiply-adds below which [`add`] runs on the calling thread.
const PARALLEL_WORK: usize = 1 << 18;

/// `out[k] = v · m[k]` for the rows of `m` ([out.len(), len]).
fn dots_into<T: Element>(v: &[f32], m: &[T], len: usize, out: &mut [f32], simd: bool) {
    let mut k = 0;
    #[cfg(target_arch = "x86_64")]
    if simd {
        while k + 8 <= out.len() {
            let rows = std::array::from_fn(|i| &m[(k + i) * len..(k + i + 1) * len]);
            // SAFETY: the CPU has AVX2, FMA and F16C (`simd`); every row as long as v.
            out[k..k + 8].copy_from_slice(&unsafe { dots8(v, rows) });
            k += 8;
        }
    }
    let _ = simd;
    for (k, o) in out.iter_mut().enumerate().skip(k) {
        *o = super::attention_cpu::dot(v, &m[k * len..(k + 1) * len]);
    }
}

/// # Safety
/// AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots8<T: Element>(v: &[f32], rows: [&[T]; 8]) -> [f32; 8] {
    super::attention_cpu::x86::dots::<T>(v, rows)
}

/// Whether [`add_tensor`] takes x: f32 on the CPU, or a CUDA device (`kernels/lora_rows.cu`).
pub fn takes(x: &candle_core::Tensor) -> bool {
    (x.device().is_cpu() && x.dtype() == candle_core::DType::F32) || (x.device().is_cuda() && x.dtype().is_float())
}

/// The rows of x [.., in]: every dim but the last.
pub fn rows_of(x: &candle_core::Tensor) -> crate::Result<usize> {
    Ok(x.dims()[..x.rank().saturating_sub(1)].iter().product())
}

/// [`add`] on tensors: `y + s_a · (x Aᵀ) Bᵀ` row by row, for x [.., in] and y [.., out] ([`takes`]),
/// `factors[a] = (A [r, in], B [out, r], s)`, or `(A, Bᵀ [r, out], s)` with `b_transposed`
/// (the CPU's faster layout, [`transpose_b`]). y must be a fresh result (its storage is written
/// in place, as `lowrank_add` writes its output); it is returned.
pub fn add_tensor(
    x: &candle_core::Tensor,
    y: candle_core::Tensor,
    adapter_of: &[Option<usize>],
    factors: &[(candle_core::Tensor, candle_core::Tensor, f64)],
    b_transposed: bool,
) -> crate::Result<candle_core::Tensor> {
    let rows = rows_of(x)?;
    if !takes(x) || y.dtype() != x.dtype() || !y.device().same_device(x.device()) || adapter_of.len() != rows || rows_of(&y)? != rows {
        return Err(crate::Error::msg(format!("lora_rows: x {:?} {:?}, y {:?} {:?}, {} row adapters", x.dims(), x.dtype(), y.dims(), y.dtype(), adapter_of.len())));
    }
    // On the CPU, factors all in one half type are read as stored; any other mix in f32.
    let stored = match factors.first().map(|(a, _, _)| a.dtype()) {
        Some(d @ (DType::BF16 | DType::F16)) if y.device().is_cpu() && factors.iter().all(|(a, b, _)| a.dtype() == d && b.dtype() == d) => d,
        _ => DType::F32,
    };
    let factors: Vec<(candle_core::Tensor, candle_core::Tensor, f64)> = factors
        .iter()
        .map(|(a, b, s)| {
            let cast = |t: &candle_core::Tensor| -> crate::Result<candle_core::Tensor> { Ok(t.to_device(y.device())?.to_dtype(stored)?.contiguous()?) };
            // The CUDA kernel reads B by rows.
            let b = if b_transposed && !y.device().is_cpu() { b.t()? } else { b.clone() };
            Ok((cast(a)?, cast(&b)?, *s))
        })
        .collect::<crate::Result<_>>()?;
    let y = y.contiguous()?;
    let b_transposed = b_transposed && y.device().is_cpu();
    y.inplace_op2(&x.contiguous()?, &LoraRows { adapter_of, factors: &factors, b_transposed })?;
    Ok(y)
}

/// The in-place op of [`add_tensor`] (y is the first operand, x the second).
struct LoraRows<'a> {
    adapter_of: &'a [Option<usize>],
    factors: &'a [(candle_core::Tensor, candle_core::Tensor, f64)],
    /// B given as [r, out] (CPU only).
    b_transposed: bool,
}

/// B [out, r] in the CPU's faster layout for [`add_tensor`]: [r, out], contiguous, in its dtype.
pub fn transpose_b(b: &candle_core::Tensor) -> crate::Result<candle_core::Tensor> {
    Ok(b.t()?.contiguous()?)
}

/// A CPU tensor's storage and layout, borrowed.
type StorageView<'a> = (&'a candle_core::Storage, &'a candle_core::Layout);

impl LoraRows<'_> {
    /// The factors' slices, every one stored in T.
    fn cpu_factors<'a, T: candle_core::WithDType>(&self, views: &[(StorageView<'a>, StorageView<'a>)], (cols_in, cols_out): (usize, usize)) -> candle_core::Result<Vec<Factors<'a, T>>> {
        fn slice<'a, T: candle_core::WithDType>(&(storage, layout): &StorageView<'a>) -> candle_core::Result<&'a [T]> {
            match (storage, layout.contiguous_offsets()) {
                (candle_core::Storage::Cpu(cpu), Some((start, end))) => Ok(&cpu.as_slice::<T>()?[start..end]),
                _ => candle_core::bail!("lora-rows: the factors must be contiguous on the CPU"),
            }
        }
        let mut adapters = Vec::with_capacity(self.factors.len());
        for ((va, vb), (a, _, s)) in views.iter().zip(self.factors) {
            let r = a.dim(0)?;
            let (a, b) = (slice::<T>(va)?, slice::<T>(vb)?);
            if a.len() != r * cols_in || b.len() != cols_out * r {
                candle_core::bail!("lora-rows: A of {} and B of {} values do not fit rank {r}, [{cols_in} -> {cols_out}]", a.len(), b.len());
            }
            adapters.push(Factors { a, b, b_transposed: self.b_transposed, r, scale: *s as f32 });
        }
        Ok(adapters)
    }
}

impl candle_core::InplaceOp2 for LoraRows<'_> {
    fn name(&self) -> &'static str {
        "lora-rows"
    }

    fn cpu_fwd(&self, y: &mut candle_core::CpuStorage, ly: &candle_core::Layout, x: &candle_core::CpuStorage, lx: &candle_core::Layout) -> candle_core::Result<()> {
        use candle_core::CpuStorage;
        let (Some((ys, ye)), Some((xs, xe))) = (ly.contiguous_offsets(), lx.contiguous_offsets()) else {
            candle_core::bail!("lora-rows: x and y must be contiguous")
        };
        let (CpuStorage::F32(y), CpuStorage::F32(x)) = (y, x) else { candle_core::bail!("lora-rows: x and y must be f32 on the CPU") };
        let (cols_in, cols_out) = (*lx.dims().last().unwrap_or(&0), *ly.dims().last().unwrap_or(&0));
        let guards: Vec<_> = self.factors.iter().map(|(a, b, _)| (a.storage_and_layout(), b.storage_and_layout())).collect();
        let views: Vec<_> = guards.iter().map(|(a, b)| ((&*a.0, a.1), (&*b.0, b.1))).collect();
        let (x, y, shape) = (&x[xs..xe], &mut y[ys..ye], (cols_in, cols_out));
        // Every factor of the call is in one dtype (`add_tensor`).
        match self.factors.first().map(|(a, _, _)| a.dtype()) {
            Some(DType::BF16) => add(x, y, shape, self.adapter_of, &self.cpu_factors::<half::bf16>(&views, shape)?),
            Some(DType::F16) => add(x, y, shape, self.adapter_of, &self.cpu_factors::<half::f16>(&views, shape)?),
            _ => add(x, y, shape, self.adapter_of, &self.cpu_factors::<f32>(&views, shape)?),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, y: &mut candle_core::CudaStorage, ly: &candle_core::Layout, x: &candle_core::CudaStorage, lx: &candle_core::Layout) -> candle_core::Result<()> {
        super::cuda::lora_rows::add(y, ly, x, lx, self.adapter_of, self.factors)
    }
}

// The op on a device against its CPU reference (`candle-peft selftest`).

/// Rows of three adapters and of none, odd shapes and ranks.
pub fn selftest(c: &mut crate::selftest::Case) -> crate::Result<()> {
    let (rows, cols_in, cols_out) = (c.odd(3, 40), c.odd(33, 300), c.odd(33, 700));
    let ranks = [c.odd(1, 17), 16, c.odd(1, 40)];
    let shape = format!("{rows} rows {cols_in}->{cols_out} r{ranks:?}");
    let adapter_of: Vec<Option<usize>> = (0..rows).map(|i| if i % 4 == 3 { None } else { Some(i % 3) }).collect();
    let mut factors = Vec::new();
    for &r in &ranks {
        let a = c.draw(&[r, cols_in], 0.1)?.to_dtype(candle_core::DType::F32)?;
        let b = c.draw(&[cols_out, r], 0.1)?.to_dtype(candle_core::DType::F32)?;
        factors.push((a, b, 0.5 + r as f64 / 20.0));
    }
    let x = c.draw(&[rows, cols_in], 1.0)?;
    let y = c.draw(&[rows, cols_out], 1.0)?;
    let on_device: Vec<_> = factors.iter().map(|(a, b, s)| Ok((c.on_device(a)?, c.on_device(b)?, *s))).collect::<crate::Result<_>>()?;
    let got = add_tensor(&c.on_device(&x)?, c.on_device(&y)?.copy()?, &adapter_of, &on_device, false)?;
    let f32 = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F32);
    let reference = add_tensor(&f32(&x)?, f32(&y)?.copy()?, &adapter_of, &factors, false)?.to_dtype(x.dtype())?;
    c.record("lora_rows", &shape, "y", &got, &reference)?;
    Ok(())
}

/// The composition in f64, for the tests.
pub fn reference(x: &[f32], y: &[f32], (cols_in, cols_out): (usize, usize), adapter_of: &[Option<usize>], adapters: &[Factors<f32>]) -> Vec<f64> {
    let mut out: Vec<f64> = y.iter().map(|&v| v as f64).collect();
    for (i, adapter) in adapter_of.iter().enumerate() {
        let Some(f) = adapter.map(|a| &adapters[a]) else { continue };
        let u: Vec<f64> = (0..f.r).map(|k| (0..cols_in).map(|c| f.a[k * cols_in + c] as f64 * x[i * cols_in + c] as f64).sum()).collect();
        for j in 0..cols_out {
            out[i * cols_out + j] += f.scale as f64 * (0..f.r).map(|k| f.b[j * f.r + k] as f64 * u[k]).sum::<f64>();
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checks run and pass with the CPU on both sides, so a failure on a GPU is the kernel's.
    #[test]
    fn the_selftest_checks_pass_on_the_cpu_reference() {
        crate::selftest::passes_on_the_cpu(selftest, 1);
    }

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    #[test]
    fn matches_the_reference_on_mixed_rows_odd_shapes_and_ranks() {
        // in and out not multiples of 8 or of the column block; little work (one thread) and
        // more (the parallel loops).
        let pattern = [Some(1), None, Some(0), Some(1), Some(2), None, Some(2)];
        matches_the_reference((37, 301), &pattern);
        let many: Vec<Option<usize>> = pattern.iter().cycle().take(40).copied().collect();
        let work: usize = many.iter().flatten().map(|&a| [3, 16, 9][a] * (300 + 701)).sum();
        assert!(work >= PARALLEL_WORK);
        matches_the_reference((300, 701), &many);
    }

    #[test]
    fn half_factors_are_read_as_stored() {
        // bf16 and f16 widen to f32 exactly: the half factors give the bits of their f32 values.
        let (cols_in, cols_out, r) = (41, 203, 16);
        let adapter_of = [Some(0), None, Some(0), Some(0), Some(0), Some(0)];
        let (a, b) = (random(r * cols_in, 3), random(cols_out * r, 4));
        let (a16, b16): (Vec<half::bf16>, Vec<half::bf16>) = (a.iter().map(|&v| half::bf16::from_f32(v)).collect(), b.iter().map(|&v| half::bf16::from_f32(v)).collect());
        let (a32, b32): (Vec<f32>, Vec<f32>) = (a16.iter().map(|v| v.to_f32()).collect(), b16.iter().map(|v| v.to_f32()).collect());
        let x = random(adapter_of.len() * cols_in, 5);
        let y0 = random(adapter_of.len() * cols_out, 6);
        let (mut half, mut full) = (y0.clone(), y0.clone());
        add(&x, &mut half, (cols_in, cols_out), &adapter_of, &[Factors { a: &a16, b: &b16, b_transposed: false, r, scale: 1.5 }]);
        add(&x, &mut full, (cols_in, cols_out), &adapter_of, &[Factors { a: &a32, b: &b32, b_transposed: false, r, scale: 1.5 }]);
        assert_eq!(half, full);
        assert_ne!(half, y0);
    }

    /// Ranks 3, 16 and 9.
    fn matches_the_reference((cols_in, cols_out): (usize, usize), adapter_of: &[Option<usize>]) {
        let shapes = [3usize, 16, 9];
        let factors: Vec<(Vec<f32>, Vec<f32>)> = shapes.iter().enumerate().map(|(s, &r)| (random(r * cols_in, 2 * s as u64), random(cols_out * r, 2 * s as u64 + 1))).collect();
        let adapters: Vec<Factors<f32>> = factors.iter().zip(shapes).map(|((a, b), r)| Factors { a, b, b_transposed: false, r, scale: 0.7 + r as f32 / 10.0 }).collect();
        for wide in [false, true].into_iter().filter(|&w| !w || crate::simd::avx512()) {
            matches_the_reference_at((cols_in, cols_out), adapter_of, &factors, &adapters, wide);
        }
    }

    fn matches_the_reference_at((cols_in, cols_out): (usize, usize), adapter_of: &[Option<usize>], factors: &[(Vec<f32>, Vec<f32>)], adapters: &[Factors<f32>], wide: bool) {
        let shapes = [3usize, 16, 9];
        let add = |x: &[f32], y: &mut [f32], adapter_of: &[Option<usize>], adapters: &[Factors<f32>]| add_at(x, y, (cols_in, cols_out), adapter_of, adapters, wide);
        let x = random(adapter_of.len() * cols_in, 10);
        let y0 = random(adapter_of.len() * cols_out, 11);
        let mut y = y0.clone();
        add(&x, &mut y, adapter_of, adapters);
        let want = reference(&x, &y0, (cols_in, cols_out), adapter_of, adapters);
        let diff = y.iter().zip(&want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0f64, f64::max);
        assert!(diff < 1e-5, "wide {wide}: {diff}");
        // Rows without an adapter are untouched, to the bit.
        for i in (0..adapter_of.len()).filter(|&i| adapter_of[i].is_none()) {
            assert_eq!(y[i * cols_out..(i + 1) * cols_out], y0[i * cols_out..(i + 1) * cols_out]);
        }
        // A row alone gives the same bits as in the batch.
        for (i, &adapter) in adapter_of.iter().enumerate() {
            let mut alone = y0[i * cols_out..(i + 1) * cols_out].to_vec();
            add(&x[i * cols_in..(i + 1) * cols_in], &mut alone, &[adapter], adapters);
            assert_eq!(alone, y[i * cols_out..(i + 1) * cols_out], "wide {wide}: row {i}");
        }
        // B transposed gives the same bits too.
        let transposed: Vec<Vec<f32>> = factors.iter().zip(shapes).map(|((_, b), r)| (0..r * cols_out).map(|e| b[(e % cols_out) * r + e / cols_out]).collect()).collect();
        let adapters_t: Vec<Factors<f32>> = adapters.iter().zip(&transposed).map(|(f, bt)| Factors { b: bt, b_transposed: true, ..*f }).collect();
        let mut y_t = y0.clone();
        add(&x, &mut y_t, adapter_of, &adapters_t);
        assert_eq!(y_t, y, "wide {wide}");
    }
}

//! LoRA's term at inference on the CPU, added in place row by row, each row with its own adapter:
//!
//! `y[i] += s_a · B_a (A_a x[i])` for every row i whose adapter is a,
//!
//! the segmented LoRA of Punica (SGMV) and S-LoRA, by which one batch serves many adapters over
//! one base: the base product is computed once for all rows, and each adapter's two thin
//! products only for its rows, its A and B read once per call for all of them.
//!
//! Layout: x [rows, in] and y [rows, out], row-major f32; A [r, in] and B [out, r], row-major
//! (PEFT's `lora_A` / `lora_B`). Both products are dot products of contiguous rows: `u = A x[i]`
//! (r dots of length in), then `y[i][j] += s · B[j] · u` (out dots of length r), 8 at a time
//! with their sums reduced together (`attention_cpu::x86::dots`). A row's sums run in one fixed
//! order whatever the other rows of the batch, so a row gives the same bits alone or batched.
//! The reference is the f64 composition `reference`; the tests compare the two.

use rayon::prelude::*;

/// One adapter's factors and scale, borrowed.
#[derive(Clone, Copy)]
pub struct Factors<'a> {
    /// [r, in]
    pub a: &'a [f32],
    /// [out, r]
    pub b: &'a [f32],
    pub r: usize,
    pub scale: f32,
}

/// `y[i] += s · B (A x[i])` for each row i with `adapter_of[i] = Some(a)`, factors `adapters[a]`.
pub fn add(x: &[f32], y: &mut [f32], (cols_in, cols_out): (usize, usize), adapter_of: &[Option<usize>], adapters: &[Factors]) {
    let rows = adapter_of.len();
    debug_assert!(x.len() == rows * cols_in && y.len() == rows * cols_out);
    let simd = crate::simd::avx2_fma_f16c();
    // u = A x for each row with an adapter ([rows, r_max], zero elsewhere).
    let r_max = adapters.iter().map(|f| f.r).max().unwrap_or(0);
    // A decoding step's row or few is less work than a parallel loop's scheduling costs.
    let work: usize = adapter_of.iter().flatten().map(|&a| adapters[a].r * (cols_in + cols_out)).sum();
    let parallel = work >= PARALLEL_WORK;
    let mut u = vec![0f32; rows * r_max];
    let project = |(u, (x, adapter)): (&mut [f32], (&[f32], &Option<usize>))| {
        if let Some(f) = adapter.map(|a| &adapters[a]) {
            dots_into(x, f.a, cols_in, &mut u[..f.r], simd);
        }
    };
    if parallel {
        u.par_chunks_mut(r_max.max(1)).zip(x.par_chunks(cols_in).zip(adapter_of.par_iter())).for_each(project);
    } else {
        u.chunks_mut(r_max.max(1)).zip(x.chunks(cols_in).zip(adapter_of.iter())).for_each(project);
    }
    // y[i][j] += s · B[j] · u[i], over column blocks; each task writes its own columns.
    const COLUMNS: usize = 128;
    let out = crate::threads::DisjointOut(y.as_mut_ptr());
    let expand = |block: usize| {
        let out = &out;
        let cols = block * COLUMNS..((block + 1) * COLUMNS).min(cols_out);
        let mut dots = vec![0f32; cols.len()];
        for (i, adapter) in adapter_of.iter().enumerate() {
            let Some(f) = adapter.map(|a| &adapters[a]) else { continue };
            dots_into(&u[i * r_max..i * r_max + f.r], &f.b[cols.start * f.r..cols.end * f.r], f.r, &mut dots, simd);
            // SAFETY: row i, this task's columns of y, which no other task writes.
            let y = unsafe { std::slice::from_raw_parts_mut(out.0.add(i * cols_out + cols.start), cols.len()) };
            for (y, d) in y.iter_mut().zip(&dots) {
                *y += f.scale * d;
            }
        }
    };
    if parallel {
        (0..cols_out.div_ceil(COLUMNS)).into_par_iter().for_each(expand);
    } else {
        (0..cols_out.div_ceil(COLUMNS)).for_each(expand);
    }
}

/// Multiply-adds below which [`add`] runs on the calling thread.
const PARALLEL_WORK: usize = 1 << 18;

/// `out[k] = v · m[k]` for the rows of `m` ([out.len(), len]).
fn dots_into(v: &[f32], m: &[f32], len: usize, out: &mut [f32], simd: bool) {
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
unsafe fn dots8(v: &[f32], rows: [&[f32]; 8]) -> [f32; 8] {
    super::attention_cpu::x86::dots::<f32>(v, rows)
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
/// `factors[a] = (A [r, in], B [out, r], s)`. y must be a fresh result (its storage is written
/// in place, as `lowrank_add` writes its output); it is returned.
pub fn add_tensor(
    x: &candle_core::Tensor,
    y: candle_core::Tensor,
    adapter_of: &[Option<usize>],
    factors: &[(candle_core::Tensor, candle_core::Tensor, f64)],
) -> crate::Result<candle_core::Tensor> {
    let rows = rows_of(x)?;
    if !takes(x) || y.dtype() != x.dtype() || !y.device().same_device(x.device()) || adapter_of.len() != rows || rows_of(&y)? != rows {
        return Err(crate::Error::msg(format!("lora_rows: x {:?} {:?}, y {:?} {:?}, {} row adapters", x.dims(), x.dtype(), y.dims(), y.dtype(), adapter_of.len())));
    }
    let factors: Vec<(candle_core::Tensor, candle_core::Tensor, f64)> = factors
        .iter()
        .map(|(a, b, s)| {
            let f32 = |t: &candle_core::Tensor| -> crate::Result<candle_core::Tensor> { Ok(t.to_device(y.device())?.to_dtype(candle_core::DType::F32)?.contiguous()?) };
            Ok((f32(a)?, f32(b)?, *s))
        })
        .collect::<crate::Result<_>>()?;
    let y = y.contiguous()?;
    y.inplace_op2(&x.contiguous()?, &LoraRows { adapter_of, factors: &factors })?;
    Ok(y)
}

/// The in-place op of [`add_tensor`] (y is the first operand, x the second).
struct LoraRows<'a> {
    adapter_of: &'a [Option<usize>],
    factors: &'a [(candle_core::Tensor, candle_core::Tensor, f64)],
}

impl candle_core::InplaceOp2 for LoraRows<'_> {
    fn name(&self) -> &'static str {
        "lora-rows"
    }

    fn cpu_fwd(&self, y: &mut candle_core::CpuStorage, ly: &candle_core::Layout, x: &candle_core::CpuStorage, lx: &candle_core::Layout) -> candle_core::Result<()> {
        use candle_core::{CpuStorage, Storage};
        let (Some((ys, ye)), Some((xs, xe))) = (ly.contiguous_offsets(), lx.contiguous_offsets()) else {
            candle_core::bail!("lora-rows: x and y must be contiguous")
        };
        let (CpuStorage::F32(y), CpuStorage::F32(x)) = (y, x) else { candle_core::bail!("lora-rows: x and y must be f32 on the CPU") };
        let (cols_in, cols_out) = (*lx.dims().last().unwrap_or(&0), *ly.dims().last().unwrap_or(&0));
        let guards: Vec<_> = self.factors.iter().map(|(a, b, _)| (a.storage_and_layout(), b.storage_and_layout())).collect();
        fn slice<'a>(storage: &'a Storage, layout: &candle_core::Layout) -> candle_core::Result<&'a [f32]> {
            match (storage, layout.contiguous_offsets()) {
                (Storage::Cpu(cpu), Some((start, end))) => Ok(&cpu.as_slice::<f32>()?[start..end]),
                _ => candle_core::bail!("lora-rows: the factors must be on the CPU"),
            }
        }
        let mut adapters = Vec::with_capacity(self.factors.len());
        for ((ga, gb), (a, _, s)) in guards.iter().zip(self.factors) {
            let r = a.dim(0)?;
            let (a, b) = (slice(&ga.0, ga.1)?, slice(&gb.0, gb.1)?);
            if a.len() != r * cols_in || b.len() != cols_out * r {
                candle_core::bail!("lora-rows: A of {} and B of {} values do not fit rank {r}, [{cols_in} -> {cols_out}]", a.len(), b.len());
            }
            adapters.push(Factors { a, b, r, scale: *s as f32 });
        }
        add(&x[xs..xe], &mut y[ys..ye], (cols_in, cols_out), self.adapter_of, &adapters);
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
    let got = add_tensor(&c.on_device(&x)?, c.on_device(&y)?.copy()?, &adapter_of, &on_device)?;
    let f32 = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F32);
    let reference = add_tensor(&f32(&x)?, f32(&y)?.copy()?, &adapter_of, &factors)?.to_dtype(x.dtype())?;
    c.record("lora_rows", &shape, "y", &got, &reference)?;
    Ok(())
}

/// The composition in f64, for the tests.
pub fn reference(x: &[f32], y: &[f32], (cols_in, cols_out): (usize, usize), adapter_of: &[Option<usize>], adapters: &[Factors]) -> Vec<f64> {
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

    /// Ranks 3, 16 and 9.
    fn matches_the_reference((cols_in, cols_out): (usize, usize), adapter_of: &[Option<usize>]) {
        let shapes = [3usize, 16, 9];
        let factors: Vec<(Vec<f32>, Vec<f32>)> = shapes.iter().enumerate().map(|(s, &r)| (random(r * cols_in, 2 * s as u64), random(cols_out * r, 2 * s as u64 + 1))).collect();
        let adapters: Vec<Factors> = factors.iter().zip(shapes).map(|((a, b), r)| Factors { a, b, r, scale: 0.7 + r as f32 / 10.0 }).collect();
        let x = random(adapter_of.len() * cols_in, 10);
        let y0 = random(adapter_of.len() * cols_out, 11);
        let mut y = y0.clone();
        add(&x, &mut y, (cols_in, cols_out), adapter_of, &adapters);
        let want = reference(&x, &y0, (cols_in, cols_out), adapter_of, &adapters);
        let diff = y.iter().zip(&want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0f64, f64::max);
        assert!(diff < 1e-5, "{diff}");
        // Rows without an adapter are untouched, to the bit.
        for i in (0..adapter_of.len()).filter(|&i| adapter_of[i].is_none()) {
            assert_eq!(y[i * cols_out..(i + 1) * cols_out], y0[i * cols_out..(i + 1) * cols_out]);
        }
        // A row alone gives the same bits as in the batch.
        for (i, &adapter) in adapter_of.iter().enumerate() {
            let mut alone = y0[i * cols_out..(i + 1) * cols_out].to_vec();
            add(&x[i * cols_in..(i + 1) * cols_in], &mut alone, (cols_in, cols_out), &[adapter], &adapters);
            assert_eq!(alone, y[i * cols_out..(i + 1) * cols_out], "row {i}");
        }
    }
}

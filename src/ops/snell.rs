//! SNELL's branch (docs/METHODS.md §3, `adapters::snell`) as one op that never keeps the dense update
//! between forward and backward (the seed recomputes it under `torch.utils.checkpoint`; here the
//! op saves nothing but the scalar threshold):
//!
//! ```text
//! forward    Δ = Σ_h c_h D_h,  D_h[i, j] = ‖In[h,i,:] − Out[h,j,:]‖₂     [d_in, d_out] transient
//!            τ = quantile(|Δ|, s)                                      (none when s = 0)
//!            N = |Δ| ⊙ 1[|Δ| > τ]   (1 when s = 0)
//!            y = x (Δ ⊙ N)                                             [T, d_out]
//! backward   Δ, N recomputed from In, Out and τ
//!            dx     = dy (Δ ⊙ N)ᵀ
//!            Ĝ      = (xᵀ dy) ⊙ N                                      [d_in, d_out] transient
//!            M_h    = c_h Ĝ ⊘ D_h   (0 where D_h = 0: torch.cdist's gradient at a zero distance)
//!            dIn_h  = rowsum(M_h) ⊙ In_h − M_h Out_h
//!            dOut_h = colsum(M_h) ⊙ Out_h − M_hᵀ In_h
//! ```
//!
//! (`∂D/∂In_i = (In_i − Out_j)/D`, and N is a constant in backward, as in the seed.) The base
//! linear stays outside the op: `y_total = base(x) + snell_branch(x)`, so an NF4 base works too.
//!
//! Layout: x [T, d_in] in the activations' dtype; In [H, d_in, k] and Out [H, d_out, k] (k = r/H)
//! in f32 (f64 for the CPU reference); row-major, contiguous. On the CPU the op is the reference:
//! candle ops in the factors' dtype for the kernel, ΔW_s cast to x's dtype for the product, as
//! the unfused adapter computes it; at a density of survivors of at most 5% (s ≥ 0.95 or so) the
//! products take the sparse apply of `snell_sparse` instead. On CUDA: `kernels/snell.cu` (see
//! `cuda::snell`), and at the same density cut `kernels/snell_sparse.cu`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};

use super::snell_sparse::Survivors;
use super::{cpu_tensor, tensor_cpu_storage};
use crate::ops::snell_merge::{
    abs_quantile, competition_factor, head_coefficients, lerp_f32, quantile_position_f32, signed_head_sum, squared_distances,
};
use crate::ops::nn::accumulate_dtype;
use crate::{Error, Result};
use candle_core::{Device, Var};
use rand::Rng;
use crate::kernel_bench::{randn, BenchShapes, KernelTiming};
use crate::selftest::{forward_backward, forward_backward_typed, Case};

/// `τ = quantile(|ΔW|, s)` of the current factors (None when s = 0, KLoRA). On CUDA, exact
/// radix selection over tiles recomputed from In and Out; on the CPU, selection on ΔW.
pub fn threshold(input: &Tensor, output: &Tensor, sparsity: f64) -> Result<Option<f64>> {
    if sparsity == 0.0 {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    if input.device().is_cuda() && input.dtype() == DType::F32 {
        return Ok(Some(super::cuda::snell::threshold(input, output, sparsity)?));
    }
    Ok(Some(abs_quantile(&kernel_delta(input, output)?, sparsity)?))
}

/// `ΔW = Σ_h c_h cdist(In_h, Out_h)` [d_in, d_out], detached, in the factors' dtype (CUDA: the
/// merge kernel, f32).
pub fn kernel_delta(input: &Tensor, output: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if input.device().is_cuda() && input.dtype() == DType::F32 {
        return Ok(super::cuda::snell::kernel_delta(input, output)?);
    }
    Ok(Distances::new(&input.detach(), &output.detach(), false)?.delta)
}

/// Which ΔW_s the branch applies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sparsify {
    /// ΔW itself (KLoRA, s = 0).
    Dense,
    /// `τ = quantile(|ΔW|, s)`, found in the forward from the ΔW it computes anyway.
    Quantile(f64),
    /// A given τ (the selftest's, to keep rounding away from the mask).
    Threshold(f64),
}

impl Sparsify {
    /// The seed's rule for sparsity s: KLoRA at 0, else the quantile.
    pub fn from_sparsity(s: f64) -> Self {
        if s == 0.0 {
            Self::Dense
        } else {
            Self::Quantile(s)
        }
    }
}

/// `x ΔW_s` for x [..., d_in], with `ΔW_s = ΔW ⊙ |ΔW| ⊙ 1[|ΔW| > τ]` (ΔW itself for
/// [`Sparsify::Dense`]), differentiable in x, In and Out.
pub fn snell_branch(x: &Tensor, input: &Tensor, output: &Tensor, sparsify: Sparsify) -> Result<Tensor> {
    let (h, d_in, k) = input.dims3()?;
    let (h2, d_out, k2) = output.dims3()?;
    let dims = x.dims().to_vec();
    if h2 != h || k2 != k || dims.last() != Some(&d_in) || input.dtype() != output.dtype() {
        return Err(Error::msg(format!(
            "snell_branch: x {:?}, In {:?} {:?}, Out {:?} {:?} do not fit together",
            x.dims(),
            input.dims(),
            input.dtype(),
            output.dims(),
            output.dtype()
        )));
    }
    let x2 = x.contiguous()?.reshape(((), d_in))?;
    let y = x2.apply_op3(&input.contiguous()?, &output.contiguous()?, SnellBranchOp { sparsify, tau: Mutex::new(None), sparse: AtomicBool::new(false) })?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("checked above") = d_out;
    Ok(y.reshape(out_dims)?)
}

/// ΔW and, when asked, the per-head distances D_h (the dense backward's M_h needs them).
struct Distances {
    heads: Vec<Tensor>,
    delta: Tensor,
}

impl Distances {
    /// The distances as `snell_merge::pairwise_distances` computes them, op for op (the same
    /// expansion `‖a_i‖² + ‖b_j‖² − 2 a_i·b_j`, then `√max(·, 0)` for its graph-safe square root:
    /// nothing here is differentiated), so that ΔW is bit-identical to the unfused adapter's and
    /// the competition keeps the same entries. For f32 and f64 factors: one GEMM per head, then
    /// one parallel pass over [d_in, d_out] that forms D_h and adds c_h·D_h into ΔW (the composed
    /// candle ops take about nine passes and as many allocations).
    fn new(input: &Tensor, output: &Tensor, keep_heads: bool) -> Result<Self> {
        match input.dtype() {
            DType::F32 => Self::fused::<f32>(input, output, keep_heads),
            DType::F64 => Self::fused::<f64>(input, output, keep_heads),
            _ => {
                let heads = (0..input.dim(0)?)
                    .map(|h| Ok(squared_distances(&input.get(h)?, &output.get(h)?)?.relu()?.sqrt()?))
                    .collect::<Result<Vec<_>>>()?;
                let delta = signed_head_sum(&heads)?;
                Ok(Self { heads, delta })
            }
        }
    }

    fn fused<T: num_traits::Float + num_traits::NumAssign + candle_core::WithDType + Send + Sync>(input: &Tensor, output: &Tensor, keep_heads: bool) -> Result<Self> {
        use rayon::prelude::*;
        let (n_heads, d_in, _) = input.dims3()?;
        let d_out = output.dim(1)?;
        let mut delta = vec![T::zero(); d_in * d_out];
        let mut heads = Vec::new();
        let two = T::from(2.0).expect("a float converts");
        for (h, c) in head_coefficients(n_heads).into_iter().enumerate() {
            let (a, b) = (input.get(h)?, output.get(h)?);
            let a2: Vec<T> = a.sqr()?.sum_keepdim(1)?.flatten_all()?.to_vec1()?;
            let b2: Vec<T> = b.sqr()?.sum_keepdim(1)?.flatten_all()?.to_vec1()?;
            let ab = a.matmul(&b.t()?)?;
            // As candle's `d * c` (an affine map: c cast to T), and the first head assigned, not
            // added, as `signed_head_sum` starts from it.
            let c = T::from(c).expect("a float converts");
            let mut d_h = if keep_heads { vec![T::zero(); d_in * d_out] } else { Vec::new() };
            // Two loops per row, each simple enough to vectorize: D_h's row, then c_h·D_h into ΔW.
            let row = |i: usize, acc: &mut [T], ab: &[T], d: &mut [T]| {
                for ((d, &ab), &b2) in d.iter_mut().zip(ab).zip(&b2) {
                    let sq = (a2[i] + b2) - ab * two;
                    *d = if sq > T::zero() { sq.sqrt() } else { T::zero() };
                }
                if h == 0 {
                    acc.iter_mut().zip(d.iter()).for_each(|(acc, &d)| *acc = d * c);
                } else {
                    acc.iter_mut().zip(d.iter()).for_each(|(acc, &d)| *acc += d * c);
                }
            };
            let pass = |ab: &[T]| {
                let rows = delta.par_chunks_mut(d_out).zip(ab.par_chunks(d_out)).enumerate();
                if keep_heads {
                    rows.zip(d_h.par_chunks_mut(d_out)).for_each(|((i, (acc, ab)), d)| row(i, acc, ab, d));
                } else {
                    rows.for_each_init(|| vec![T::zero(); d_out], |d, (i, (acc, ab))| row(i, acc, ab, d));
                }
            };
            super::with_values(&ab, pass)?;
            if keep_heads {
                heads.push(Tensor::from_vec(d_h, (d_in, d_out), input.device())?);
            }
        }
        Ok(Self { heads, delta: Tensor::from_vec(delta, (d_in, d_out), input.device())? })
    }
}

/// `N` (None when τ is None: N = 1).
fn competition(delta: &Tensor, tau: Option<f64>) -> Result<Option<Tensor>> {
    tau.map(|tau| competition_factor(delta, tau)).transpose()
}

fn apply_factor(t: &Tensor, n: Option<&Tensor>) -> Result<Tensor> {
    Ok(match n {
        Some(n) => (t * n)?,
        None => t.clone(),
    })
}

struct SnellBranchOp {
    sparsify: Sparsify,
    /// τ as the forward resolved it, for the backward (None: dense).
    tau: Mutex<Option<Option<f64>>>,
    /// Whether the CPU forward took the sparse apply (the backward then needs ΔW only, not the
    /// per-head distances).
    sparse: AtomicBool,
}

impl SnellBranchOp {
    /// τ for a forward, from ΔW's absolute values when a quantile is asked.
    fn resolve(&self, quantile: impl FnOnce(f64) -> candle_core::Result<f64>) -> candle_core::Result<Option<f64>> {
        let tau = match self.sparsify {
            Sparsify::Dense => None,
            Sparsify::Threshold(t) => Some(t),
            Sparsify::Quantile(s) => Some(quantile(s)?),
        };
        *self.tau.lock().expect("tau lock") = Some(tau);
        Ok(tau)
    }

    fn saved_tau(&self) -> candle_core::Result<Option<f64>> {
        match *self.tau.lock().expect("tau lock") {
            Some(tau) => Ok(tau),
            None => candle_core::bail!("fused-snell-branch: backward before forward"),
        }
    }
}

impl CustomOp3 for SnellBranchOp {
    fn name(&self) -> &'static str {
        "fused-snell-branch"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        input: &CpuStorage,
        li: &Layout,
        output: &CpuStorage,
        lo: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let dtype = x.dtype();
        let xt = cpu_tensor(x, lx, self.name())?;
        let (input, output) = (cpu_tensor(input, li, self.name())?, cpu_tensor(output, lo, self.name())?);
        let delta = Distances::new(&input, &output, false).map_err(candle_core::Error::wrap)?.delta;
        let tau = self.resolve(|s| abs_quantile(&delta, s).map_err(candle_core::Error::wrap))?;
        let sparse = sparse_forward(&xt, &delta, tau).map_err(candle_core::Error::wrap)?;
        self.sparse.store(sparse.is_some(), Ordering::Relaxed);
        let y = match sparse {
            Some(y) => y,
            None => reference_forward(&xt, &delta, tau).map_err(candle_core::Error::wrap)?,
        };
        let shape = y.shape().clone();
        Ok((tensor_cpu_storage(&y.to_dtype(dtype)?)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        input: &candle_core::CudaStorage,
        li: &Layout,
        output: &candle_core::CudaStorage,
        lo: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let tau = self.resolve(|s| super::cuda::snell::threshold_of(s, (input, li), (output, lo)))?;
        super::cuda::snell::forward(tau, (x, lx), (input, li), (output, lo))
    }

    fn bwd(
        &self,
        x: &Tensor,
        input: &Tensor,
        output: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: gradients that carry a graph would keep this step's tensors alive.
        let (x, input, output, dy) = (x.detach(), input.detach(), output.detach(), dy.detach());
        let tau = self.saved_tau()?;
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let (dx, di, dout) = super::cuda::snell::backward(tau, &x, &input, &output, &dy)?;
            return Ok((Some(dx), Some(di), Some(dout)));
        }
        let sparse = self.sparse.load(Ordering::Relaxed);
        let (dx, di, dout) = reference_backward(&x, &input, &output, &dy, tau, sparse).map_err(candle_core::Error::wrap)?;
        Ok((Some(dx), Some(di), Some(dout)))
    }
}

/// `x ΔW_s` by candle ops: ΔW_s in the factors' dtype, cast to x's for the product (accumulated
/// in f32, or f64 for f64).
fn reference_forward(x: &Tensor, delta: &Tensor, tau: Option<f64>) -> Result<Tensor> {
    let acc = accumulate_dtype(x.dtype());
    let n = competition(delta, tau)?;
    let ds = apply_factor(delta, n.as_ref())?.to_dtype(x.dtype())?.to_dtype(acc)?;
    Ok(x.to_dtype(acc)?.matmul(&ds)?)
}

/// The survivors of the competition when the sparse path takes them: x and the factors in one
/// dtype (f32 or f64), and a density at most
/// [`SPARSE_MAX_DENSITY`](super::snell_sparse::SPARSE_MAX_DENSITY).
fn survivors<T: num_traits::Float + num_traits::NumAssign + candle_core::WithDType + Send + Sync>(x: &Tensor, delta: &Tensor, tau: Option<f64>) -> Result<Option<Survivors<T>>> {
    match tau {
        Some(tau) if x.dtype() == T::DTYPE && delta.dtype() == T::DTYPE => Survivors::of(delta, tau),
        _ => Ok(None),
    }
}

/// `x ΔW_s` on the sparse path, when it applies (`snell_sparse`).
fn sparse_forward(x: &Tensor, delta: &Tensor, tau: Option<f64>) -> Result<Option<Tensor>> {
    match x.dtype() {
        DType::F32 => survivors::<f32>(x, delta, tau)?.map(|s| s.forward(x)).transpose(),
        DType::F64 => survivors::<f64>(x, delta, tau)?.map(|s| s.forward(x)).transpose(),
        _ => Ok(None),
    }
}

/// The backward on the sparse path, when it applies (`snell_sparse`).
fn sparse_backward(x: &Tensor, input: &Tensor, output: &Tensor, dy: &Tensor, delta: &Tensor, tau: Option<f64>) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let coefficients = head_coefficients(input.dim(0)?);
    let dy = dy.contiguous()?;
    match x.dtype() {
        DType::F32 => survivors::<f32>(x, delta, tau)?.map(|s| s.backward(x, &dy, input, output, &coefficients)).transpose(),
        DType::F64 => survivors::<f64>(x, delta, tau)?.map(|s| s.backward(x, &dy, input, output, &coefficients)).transpose(),
        _ => Ok(None),
    }
}

/// The backward of the table at the top on the CPU (the GPU's reference): the sparse path where
/// the forward took it (ΔW alone, recomputed bit for bit, decides it again the same way), else
/// candle ops with the per-head distances.
fn reference_backward(x: &Tensor, input: &Tensor, output: &Tensor, dy: &Tensor, tau: Option<f64>, sparse: bool) -> Result<(Tensor, Tensor, Tensor)> {
    if sparse {
        let delta = Distances::new(input, output, false)?.delta;
        if let Some(grads) = sparse_backward(x, input, output, dy, &delta, tau)? {
            return Ok(grads);
        }
    }
    dense_backward(x, input, output, dy, &Distances::new(input, output, true)?, tau)
}

/// The backward by candle ops, ΔW_s dense.
fn dense_backward(x: &Tensor, input: &Tensor, output: &Tensor, dy: &Tensor, dist: &Distances, tau: Option<f64>) -> Result<(Tensor, Tensor, Tensor)> {
    let (acc, fd) = (accumulate_dtype(x.dtype()), input.dtype());
    let n = competition(&dist.delta, tau)?;
    let ds = apply_factor(&dist.delta, n.as_ref())?.to_dtype(x.dtype())?.to_dtype(acc)?;
    let dy_acc = dy.to_dtype(acc)?;
    let dx = dy_acc.matmul(&ds.t()?)?.to_dtype(x.dtype())?;
    drop(ds);
    // ∂L/∂ΔW_s in x's dtype (as the product's gradient is), then through the constant factor N.
    let g = x.to_dtype(acc)?.t()?.matmul(&dy_acc)?.to_dtype(x.dtype())?.to_dtype(fd)?;
    let g = apply_factor(&g, n.as_ref())?;
    let coeffs = head_coefficients(dist.heads.len());
    let (mut d_in, mut d_out) = (Vec::new(), Vec::new());
    for (h, (d, &c)) in dist.heads.iter().zip(&coeffs).enumerate() {
        let positive = d.gt(0.0)?;
        let inv = positive.where_cond(&d.recip()?, &d.zeros_like()?)?;
        let m = ((&g * inv)? * c)?;
        let (in_h, out_h) = (input.get(h)?, output.get(h)?);
        d_in.push((m.sum_keepdim(1)?.broadcast_mul(&in_h)? - m.matmul(&out_h)?)?);
        d_out.push((m.sum_keepdim(0)?.t()?.broadcast_mul(&out_h)? - m.t()?.matmul(&in_h)?)?);
    }
    Ok((dx, Tensor::stack(&d_in, 0)?, Tensor::stack(&d_out, 0)?))
}

/// The largest rank per head k = r/H the CUDA kernels take (their backward keeps k/32 outputs per
/// thread in registers); larger ranks take the plain candle ops on the GPU.
pub const MAX_CUDA_HEAD_RANK: usize = 64;

/// Whether [`snell_branch`] takes tensors like these: the fused ops' devices and dtypes for x, and
/// f32 factors (f64 too on the CPU) of a rank per head the kernels take.
pub fn fused_for(x: &Tensor, input: &Tensor) -> bool {
    let factors = match x.device() {
        candle_core::Device::Cpu => matches!(input.dtype(), DType::F32 | DType::F64),
        _ => input.dtype() == DType::F32 && input.dims().last().is_some_and(|&k| k <= MAX_CUDA_HEAD_RANK),
    };
    super::fused_for(x) && factors
}

/// One counting pass of [`radix_quantile`]: count, among the values whose bits under
/// `prefix_mask` equal `prefix`, each value of the `bins`-wide digit at bit `shift`.
#[derive(Debug, Clone, Copy)]
pub struct RadixPass {
    pub prefix: u32,
    pub prefix_mask: u32,
    pub shift: u32,
    pub bins: usize,
}

/// `torch.quantile(values, q)` of `n` non-negative f32 values seen only through counting passes
/// (the GPU recomputes the values in each pass instead of storing them): non-negative floats
/// order as their bit patterns, so three passes over the digits of bits 30..20, 19..10 and 9..0
/// find the order statistic below the position q·(n−1) exactly; the one above it is the same
/// value while ties remain, else `min_above(bits)` (the smallest bit pattern above). Then
/// torch's lerp, in f32. The same answer as [`crate::ops::snell_merge::quantile_f32`] (NaN aside:
/// its bit pattern orders above +inf here).
pub fn radix_quantile(
    n: usize,
    q: f64,
    mut histogram: impl FnMut(RadixPass) -> candle_core::Result<Vec<u32>>,
    mut min_above: impl FnMut(u32) -> candle_core::Result<u32>,
) -> candle_core::Result<f32> {
    if n == 0 || !(0.0..=1.0).contains(&q) {
        candle_core::bail!("radix_quantile: q = {q} of {n} values");
    }
    let (below, above, weight) = quantile_position_f32(n, q);
    // The 0-based position of the statistic sought among the values sharing the bits chosen so far.
    let (mut rank, mut prefix, mut prefix_mask, mut ties) = (below as u64, 0u32, 0u32, 0u64);
    for (shift, bits) in [(20u32, 11u32), (10, 10), (0, 10)] {
        let bins = 1usize << bits;
        let counts = histogram(RadixPass { prefix, prefix_mask, shift, bins })?;
        let mut before = 0u64;
        let mut chosen = None;
        for (bin, &c) in counts.iter().enumerate() {
            if before + c as u64 > rank {
                chosen = Some((bin as u32, c as u64));
                break;
            }
            before += c as u64;
        }
        let Some((bin, count)) = chosen else {
            candle_core::bail!("radix_quantile: the pass at bit {shift} counted {before} values, fewer than position {rank} needs")
        };
        rank -= before;
        prefix |= bin << shift;
        prefix_mask |= ((bins - 1) as u32) << shift;
        ties = count;
    }
    let lo = f32::from_bits(prefix);
    let hi = if above == below || rank + 1 < ties { lo } else { f32::from_bits(min_above(prefix)?) };
    Ok(lerp_f32(lo, hi, weight))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn randn(shape: &[usize], std: f64) -> Tensor {
        Tensor::randn(0f64, std, shape, &Device::Cpu).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
        assert!(scale > 0.0);
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap() / scale
    }

    /// The one-pass ΔW is bit for bit the unfused adapter's (`pairwise_distances`, then
    /// `signed_head_sum`), in f32 and f64, so both keep the same entries at any threshold.
    #[test]
    fn the_fused_delta_is_bit_identical_to_the_adapters() {
        use crate::ops::snell_merge::pairwise_distances;
        for dtype in [DType::F32, DType::F64] {
            let (input, output) = (randn(&[2, 37, 5], 0.3).to_dtype(dtype).unwrap(), randn(&[2, 53, 5], 0.3).to_dtype(dtype).unwrap());
            // A row of Out equal to one of In: a zero distance, and negative expansions nearby.
            let output = output.slice_assign(&[0..2, 3..4, 0..5], &input.narrow(1, 7, 1).unwrap()).unwrap();
            let heads: Vec<Tensor> = (0..2).map(|h| pairwise_distances(&input.get(h).unwrap(), &output.get(h).unwrap()).unwrap()).collect();
            let composed = signed_head_sum(&heads).unwrap();
            let fused = Distances::new(&input, &output, true).unwrap();
            let bits = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(bits(&fused.delta), bits(&composed), "{dtype:?}: ΔW");
            for (h, (got, want)) in fused.heads.iter().zip(&heads).enumerate() {
                assert_eq!(bits(got), bits(want), "{dtype:?}: D_{h}");
            }
            assert!(Distances::new(&input, &output, false).unwrap().heads.is_empty());
        }
    }

    /// The sparse apply is taken at high sparsity only, and equals the dense candle ops there.
    #[test]
    fn the_sparse_apply_equals_the_dense_one() {
        let (d_in, d_out) = (61, 47);
        let (input, output) = (randn(&[2, d_in, 6], 0.3), randn(&[2, d_out, 6], 0.3));
        let dist = Distances::new(&input, &output, true).unwrap();
        // 19 tokens: two blocks of the sparse products, the second partial; 149: ten blocks in
        // five chunks of Ĝ's sum.
        for (t, s) in [(19, 0.5), (19, 0.96), (19, 0.99), (19, 0.995), (149, 0.99)] {
            let (x, dy) = (randn(&[t, d_in], 1.0), randn(&[t, d_out], 1.0));
            let tau = Some(abs_quantile(&dist.delta, s).unwrap());
            let y = sparse_forward(&x, &dist.delta, tau).unwrap();
            if s < 0.9 {
                assert!(y.is_none(), "s = {s}: the dense path is faster at this density");
                continue;
            }
            let y = y.unwrap_or_else(|| panic!("s = {s}: the sparse path was not taken"));
            assert!(max_rel(&y, &reference_forward(&x, &dist.delta, tau).unwrap()) < 1e-13, "s = {s}: y");
            let sparse = sparse_backward(&x, &input, &output, &dy, &dist.delta, tau).unwrap().unwrap();
            let dense = dense_backward(&x, &input, &output, &dy, &dist, tau).unwrap();
            for (name, a, b) in [("dx", &sparse.0, &dense.0), ("dIn", &sparse.1, &dense.1), ("dOut", &sparse.2, &dense.2)] {
                assert!(max_rel(a, b) < 1e-12, "T{t} s = {s}: {name} differs by {}", max_rel(a, b));
            }
        }
    }
}

// The op on a device against its CPU reference (`candle-peft selftest`) and against the
// unfused graph it replaces (`candle-peft bench kernels`).

/// SNELL: the merge against the f64 ΔW (f32 only: the factors are always f32), the radix-select
/// threshold bit for bit against the exact quantile of the device's own ΔW, and the branch's
/// forward and gradients for KLoRA, s = 0.5 (dense apply) and s = 0.99 (sparse apply). The branch is given a τ halfway between
/// two neighbouring |ΔW| values, so that f32 and f64 rounding cannot move an entry across it.
pub fn selftest(c: &mut Case) -> Result<()> {
    let (t, d_in, d_out, k) = (c.odd(65, 300), c.odd(65, 500), c.odd(65, 500), c.rng.random_range(1..=32usize));
    let shape = format!("T{t} in{d_in} out{d_out} k{k}");
    let f32_values = |t: &Tensor| t.to_dtype(DType::F32)?.to_dtype(DType::F64);
    let input = f32_values(&c.draw(&[2, d_in, k], 0.2)?)?;
    let output = f32_values(&c.draw(&[2, d_out, k], 0.2)?)?;
    let (dev_in, dev_out) = (input.to_dtype(DType::F32)?.to_device(c.device)?, output.to_dtype(DType::F32)?.to_device(c.device)?);
    let delta = kernel_delta(&dev_in, &dev_out)?;
    let mut abs: Vec<f32> = delta.abs()?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?;
    if c.dtype == DType::F32 {
        c.record("snell merge", &shape, "ΔW", &delta, &kernel_delta(&input, &output)?)?;
        for s in [0.5, 0.99] {
            let got = threshold(&dev_in, &dev_out, s)?.unwrap_or(f64::NAN);
            let want = crate::ops::snell_merge::quantile_f32(&abs, s)? as f64;
            c.record_exact(&format!("snell threshold s{s}"), &shape, "τ", got, want);
        }
    }
    abs.sort_by(f32::total_cmp);
    let x = c.draw(&[t, d_in], 1.0)?;
    let weights = c.draw(&[t, d_out], 1.0)?;
    for s in [0.0, 0.5, 0.99] {
        let sparsify = if s > 0.0 {
            // τ in the widest gap between neighbouring |ΔW| within 1% of the entries around the
            // s-quantile: the device's f32 ΔW and the f64 reference differ by rounding, and an
            // entry within rounding of τ would survive on one side only (next neighbours can be a
            // few ulps apart, or tied).
            let centre = ((abs.len() - 1) as f64 * s) as usize;
            let window = (abs.len() / 100).max(1);
            let (lo, hi) = (centre.saturating_sub(window), (centre + window).min(abs.len() - 2));
            let i = (lo..=hi).max_by(|&a, &b| (abs[a + 1] - abs[a]).total_cmp(&(abs[b + 1] - abs[b]))).expect("a non-empty window");
            Sparsify::Threshold((abs[i] as f64 + abs[i + 1] as f64) / 2.0)
        } else {
            Sparsify::Dense
        };
        let f = |v: &[Tensor]| snell_branch(&v[0], &v[1], &v[2], sparsify);
        let inputs = [&x, &input, &output];
        let (y, g) = forward_backward_typed(c.device, &[c.dtype, DType::F32, DType::F32], &inputs, &weights, &f)?;
        let (y_ref, g_ref) = forward_backward(&Device::Cpu, DType::F64, &inputs, &weights, &f)?;
        // At s = 0.99 (1% survivors) both sides take the sparse apply (`snell_sparse`).
        let kernel = format!("snell_branch s{s}{}", if s > 0.9 { " sparse" } else { "" });
        c.record_pass(&kernel, &shape, &["y", "dx", "dIn", "dOut"], (&y, &g), (&y_ref, &g_ref))?;
    }
    Ok(())
}

/// SNELL (seed 002) on the linear shapes: the frozen linear, the adapter's plain candle ops (ΔW,
/// its quantile and the product, autograd keeping the intermediate [d_in, d_out] tensors), and the
/// fused op (ΔW recomputed, never kept); each forward + backward with the same frozen linear, with
/// the peak memory of one iteration over what was in use before it.
pub fn bench(shapes: &BenchShapes, device: &Device, dtype: DType, out: &mut Vec<KernelTiming>) -> Result<()> {
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    for &(d_in, d_out) in &shapes.dims {
        let w = randn(&[d_out, d_in], 0.02, dtype, device)?;
        let frozen_w: crate::quant::BaseWeight = w.clone().into();
        for &t in &shapes.tokens {
            let x = Var::from_tensor(&randn(&[t, d_in], 1.0, dtype, device)?)?;
            let frozen_step = || -> Result<()> {
                crate::ops::nn::frozen_matmul_t_op(x.as_tensor(), &frozen_w)?.backward()?;
                Ok(())
            };
            let frozen = shapes.time(device, frozen_step)?;
            let frozen_mem = crate::memory::peak_extra_mib(device, frozen_step)?;
            let mut push = |shape: &str, variant: &str, ms: f64, mib: f64| out.push(KernelTiming::new("snell", shape, variant, ms, frozen).peak_mib(mib));
            push(&format!("{d_in}x{d_out} T{t}"), "frozen linear", frozen, frozen_mem);
            for &s in &shapes.sparsities {
                crate::ops::snell_merge::check_sparsity(s, "bench snell")?;
                let (input, output) = crate::ops::snell_merge::kaiming_factors(2, d_in, d_out, shapes.snell_rank / 2, &mut rng, device)?;
                let (input, output) = (&input, &output);
                let step = |fused: bool| -> Result<()> {
                    let branch = if fused {
                        snell_branch(x.as_tensor(), input, output, Sparsify::from_sparsity(s))?
                    } else {
                        crate::ops::snell_merge::plain_branch(x.as_tensor(), input, output, s)?
                    };
                    (crate::ops::nn::frozen_matmul_t_op(x.as_tensor(), &frozen_w)? + branch)?.backward()?;
                    Ok(())
                };
                let shape = format!("{d_in}x{d_out} r{} s{s} T{t}", shapes.snell_rank);
                let fused_mem = crate::memory::peak_extra_mib(device, || step(true))?;
                let fused = shapes.time(device, || step(true))?;
                let plain_mem = crate::memory::peak_extra_mib(device, || step(false))?;
                let plain = shapes.time(device, || step(false))?;
                push(&shape, "plain candle ops", plain, plain_mem);
                push(&shape, "fused", fused, fused_mem);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod selftest_tests {
    use super::*;

    /// The checks run and pass with the CPU on both sides, so a failure on a GPU is the kernel's.
    #[test]
    fn the_selftest_checks_pass_on_the_cpu_reference() {
        crate::selftest::passes_on_the_cpu(selftest, 1 + 2 + 3 * 4);
    }
}

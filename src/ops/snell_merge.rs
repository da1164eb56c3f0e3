//! SNELL's kernelized low-rank merge and competition-based sparsification, the plain math in
//! candle ops: the reference that the fused branch (`ops::snell`, `kernels/snell.cu`) is
//! checked against, and what the unfused adapter (`adapters::snell`) computes. The method, its
//! sources and its conventions: `adapters::snell` and docs/METHODS.md §3.

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;

use crate::{Error, Result};

/// The scale of the head coefficients (`SCALE_FACTOR_fc` in the seed code).
pub const SNELL_SCALE: f64 = 0.1;

pub(crate) fn check_sparsity(s: f64, what: &str) -> Result<()> {
    if !(0.0..1.0).contains(&s) {
        return Err(Error::Adapter(format!("SNELL on `{what}`: sparsity = {s} must lie in [0, 1)")));
    }
    Ok(())
}

/// The head coefficients `c_h = 0.1·(−1)^h` (the seed's `0.1·(+1, −1)` for H = 2).
pub fn head_coefficients(heads: usize) -> Vec<f64> {
    (0..heads).map(|h| if h % 2 == 0 { SNELL_SCALE } else { -SNELL_SCALE }).collect()
}

/// `ΔW = Σ_h c_h D_h` from the per-head distances D_h.
pub(crate) fn signed_head_sum(heads: &[Tensor]) -> Result<Tensor> {
    let mut terms = heads.iter().zip(head_coefficients(heads.len())).map(|(d, c)| d * c);
    let first = terms.next().ok_or_else(|| Error::Adapter("SNELL with no head".into()))??;
    terms.try_fold(first, |acc, d| Ok((acc + d?)?))
}

/// The factors `In` [H, d_in, k] and `Out` [H, d_out, k] as the seed initialises them:
/// kaiming_uniform_(a=√5), i.e. U(±1/√fan_in) with fan_in = size(1)·size(2).
pub fn kaiming_factors(heads: usize, d_in: usize, d_out: usize, k: usize, rng: &mut StdRng, device: &Device) -> Result<(Var, Var)> {
    let input = crate::ops::nn::uniform_var(&[heads, d_in, k], 1.0 / ((d_in * k) as f64).sqrt(), rng, device)?;
    let output = crate::ops::nn::uniform_var(&[heads, d_out, k], 1.0 / ((d_out * k) as f64).sqrt(), rng, device)?;
    Ok((input, output))
}

/// The dense kernel update ΔW [d_in, d_out] from `In` [H, d_in, k] and `Out` [H, d_out, k], in the
/// factors' dtype, differentiable.
pub fn kernel_delta(input: &Tensor, output: &Tensor) -> Result<Tensor> {
    let heads = (0..input.dim(0)?).map(|h| pairwise_distances(&input.get(h)?, &output.get(h)?)).collect::<Result<Vec<_>>>()?;
    signed_head_sum(&heads)
}

/// `x ΔW_s` in plain candle ops (autograd keeps ΔW and its sparsified copy), with ΔW_s cast to
/// x's dtype as autocast would: what the fused `ops::snell::snell_branch` replaces.
pub fn plain_branch(x: &Tensor, input: &Tensor, output: &Tensor, sparsity: f64) -> Result<Tensor> {
    let delta = sparsify(&kernel_delta(input, output)?, sparsity)?.to_dtype(x.dtype())?;
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner.max(1);
    let y = x.reshape((rows, inner))?.matmul(&delta)?;
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("SNELL input needs at least one dim") = delta.dim(1)?;
    Ok(y.reshape(out_dims)?)
}

/// `‖a_i − b_j‖²` for a [m, k], b [n, k], as `‖a_i‖² + ‖b_j‖² − 2 a_i·b_j` (torch.cdist's mm path;
/// may dip below 0 by rounding).
pub(crate) fn squared_distances(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let a2 = a.sqr()?.sum_keepdim(1)?; // [m, 1]
    let b2 = b.sqr()?.sum_keepdim(1)?.t()?; // [1, n]
    let ab = a.matmul(&b.t()?)?; // [m, n]
    Ok((a2.broadcast_add(&b2)? - (ab * 2.0)?)?)
}

/// `D[i, j] = ‖a_i − b_j‖₂` for a [m, k], b [n, k], as `√max(‖a_i‖² + ‖b_j‖² − 2 a_i·b_j, 0)`;
/// the gradient at a zero (or clamped) distance is 0.
pub fn pairwise_distances(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    safe_sqrt(&squared_distances(a, b)?)
}

/// `√max(v, 0)` with gradient 0 wherever v ≤ 0: there the input is replaced by the constant 1
/// (`√(v·0 + 1) − 1 = 0`), so no infinite derivative reaches the graph.
fn safe_sqrt(v: &Tensor) -> Result<Tensor> {
    let z = v.detach().le(0.0)?.to_dtype(v.dtype())?;
    let keep = z.affine(-1.0, 1.0)?;
    Ok(((v * keep)? + &z)?.sqrt()?.sub(&z)?)
}

/// `ΔW ⊙ |ΔW| ⊙ 1[|ΔW| > τ]` with `τ = quantile(|ΔW|, s)` and the `|ΔW| ⊙ 1[…]` factor detached;
/// `ΔW` itself when s = 0 (KLoRA).
pub fn sparsify(delta: &Tensor, s: f64) -> Result<Tensor> {
    check_sparsity(s, "sparsify")?;
    if s == 0.0 {
        return Ok(delta.clone());
    }
    let tau = abs_quantile(&delta.detach(), s)?;
    Ok((delta * competition_factor(&delta.detach(), tau)?)?)
}

/// `N = |ΔW| ⊙ 1[|ΔW| > τ]`, the factor SNELL's update is multiplied by (a constant in backward).
pub(crate) fn competition_factor(delta: &Tensor, tau: f64) -> Result<Tensor> {
    let a = delta.detach().abs()?;
    Ok((a.gt(tau)?.to_dtype(a.dtype())? * a)?)
}

/// `torch.quantile(|t|.flatten(), s)` in t's dtype (f32 or f64; others go through f32).
pub(crate) fn abs_quantile(t: &Tensor, s: f64) -> Result<f64> {
    match t.dtype() {
        DType::F64 => quantile_in_place_f64(&mut abs_values(t)?, s),
        DType::F32 => Ok(quantile_in_place_f32(&mut abs_values(t)?, s)? as f64),
        _ => Ok(quantile_in_place_f32(&mut abs_values(&t.to_dtype(DType::F32)?)?, s)? as f64),
    }
}

/// |t| flattened, in one pass over a contiguous CPU tensor's values (else through a host copy).
fn abs_values<T: candle_core::WithDType + num_traits::Float>(t: &Tensor) -> Result<Vec<T>> {
    Ok(crate::ops::with_values(t, |v: &[T]| v.iter().map(|x| x.abs()).collect())?)
}

macro_rules! quantile_impl {
    ($name:ident, $in_place:ident, $position:ident, $lerp:ident, $t:ty) => {
        /// torch.quantile's position `q·(n−1)`, computed in this dtype as torch does (q cast to
        /// it): the 0-based indices of the order statistics below and above it, and the weight.
        pub fn $position(n: usize, q: f64) -> (usize, usize, $t) {
            let rank = (q as $t) * ((n - 1) as $t);
            let below = (rank as usize).min(n - 1);
            let above = (rank.ceil() as usize).min(n - 1);
            (below, above, rank - below as $t)
        }

        /// ATen's lerp: `lo + w·(hi − lo)` for |w| < 0.5, else `hi − (hi − lo)·(1 − w)`.
        pub fn $lerp(lo: $t, hi: $t, weight: $t) -> $t {
            if weight.abs() < 0.5 {
                lo + weight * (hi - lo)
            } else {
                hi - (hi - lo) * (1.0 - weight)
            }
        }

        /// `torch.quantile(values, q)` (interpolation "linear") for a tensor of this dtype: the
        /// position `q·(n−1)` is computed in the dtype (as torch does, q being cast to it), the
        /// order statistics below and above it are found by selection on a copy (O(n)), and
        /// interpolated with torch's `lerp`. NaN anywhere gives NaN, as torch.
        pub fn $name(values: &[$t], q: f64) -> Result<$t> {
            $in_place(&mut values.to_vec(), q)
        }

        /// As the function above, reordering `values` instead of copying them.
        pub fn $in_place(values: &mut [$t], q: f64) -> Result<$t> {
            if values.is_empty() {
                return Err(Error::Adapter("quantile of an empty set".into()));
            }
            if !(0.0..=1.0).contains(&q) {
                return Err(Error::Adapter(format!("quantile q = {q} must lie in [0, 1]")));
            }
            if values.iter().any(|v| v.is_nan()) {
                return Ok(<$t>::NAN);
            }
            let (below, above, weight) = $position(values.len(), q);
            let cmp = |a: &$t, b: &$t| a.partial_cmp(b).expect("no NaN");
            let (_, lo, rest) = values.select_nth_unstable_by(below, cmp);
            let lo = *lo;
            let hi = if above > below { rest.iter().copied().fold(<$t>::INFINITY, <$t>::min) } else { lo };
            Ok($lerp(lo, hi, weight))
        }
    };
}

quantile_impl!(quantile_f32, quantile_in_place_f32, quantile_position_f32, lerp_f32, f32);
quantile_impl!(quantile_f64, quantile_in_place_f64, quantile_position_f64, lerp_f64, f64);

//! SNELL's layer: the two kernel factors of one adapted weight, and its forward (math: mod.rs).

use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;

use crate::ops::snell_merge::{check_sparsity, head_coefficients, kaiming_factors, sparsify};
use crate::ops;
use crate::model::{FrozenLinear, LinearAdapter};
use crate::{Error, Result};
use super::SnellConfig;

/// The two kernel factors of one adapted linear layer.
pub struct SnellLinear {
    /// `In` [H, d_in, r/H].
    pub input: Var,
    /// `Out` [H, d_out, r/H].
    pub output: Var,
    pub sparsity: f64,
    coeffs: Vec<f64>,
}

impl SnellLinear {
    pub fn new(base: &FrozenLinear, cfg: &SnellConfig, rng: &mut StdRng) -> Result<Self> {
        cfg.validate("a linear layer")?;
        let (out, inp) = (base.out_features(), base.in_features());
        let (input, output) = kaiming_factors(cfg.heads, inp, out, cfg.r / cfg.heads, rng, base.device())?;
        Ok(Self { input, output, sparsity: cfg.sparsity, coeffs: head_coefficients(cfg.heads) })
    }

    /// A layer with given factors, kept in their dtype (f64 for finite-difference checks).
    pub fn from_parts(input: &Tensor, output: &Tensor, sparsity: f64) -> Result<Self> {
        check_sparsity(sparsity, "from_parts")?;
        let (h, _, k) = input.dims3()?;
        let (h2, _, k2) = output.dims3()?;
        if h != h2 || k != k2 || input.dtype() != output.dtype() {
            return Err(Error::Adapter(format!(
                "SNELL factors do not fit: In {:?} {:?}, Out {:?} {:?}",
                input.dims(),
                input.dtype(),
                output.dims(),
                output.dtype()
            )));
        }
        Ok(Self {
            input: Var::from_tensor(input)?,
            output: Var::from_tensor(output)?,
            sparsity,
            coeffs: head_coefficients(h),
        })
    }

    pub fn heads(&self) -> usize {
        self.coeffs.len()
    }

    /// The dense kernel update ΔW [d_in, d_out] in the factors' dtype, differentiable.
    pub fn kernel_delta(&self) -> Result<Tensor> {
        crate::ops::snell_merge::kernel_delta(self.input.as_tensor(), self.output.as_tensor())
    }

    /// The sparsified update ΔW_s [d_in, d_out] (ΔW itself when sparsity is 0), differentiable.
    pub fn sparse_delta(&self) -> Result<Tensor> {
        sparsify(&self.kernel_delta()?, self.sparsity)
    }

    /// The threshold τ of the current ΔW (None when sparsity is 0).
    pub fn threshold(&self) -> Result<Option<f64>> {
        ops::snell::threshold(self.input.as_tensor(), self.output.as_tensor(), self.sparsity)
    }

    /// `ΔW_sᵀ` [d_out, d_in] in f32 (what merge adds to W).
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok(self.sparse_delta()?.to_dtype(DType::F32)?.t()?.contiguous()?)
    }

    /// `x ΔW_s`, with ΔW_s cast to x's dtype as autocast would.
    pub fn branch(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::snell_merge::plain_branch(x, self.input.as_tensor(), self.output.as_tensor(), self.sparsity)
    }
}

impl LinearAdapter for SnellLinear {
    /// The fused branch (src/ops/snell.rs: ΔW recomputed in backward, never kept) on CUDA
    /// and in CPU training; plain candle ops otherwise (and with `--unfused`).
    fn forward(&self, x: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor> {
        let (input, output) = (self.input.as_tensor(), self.output.as_tensor());
        if ops::fused_forward(x, train) && ops::snell::fused_for(x, input) {
            let sparsify = ops::snell::Sparsify::from_sparsity(self.sparsity);
            return Ok((base.forward(x)? + ops::snell_branch(x, input, output, sparsify)?)?);
        }
        Ok((base.forward(x)? + self.branch(x)?)?)
    }

    fn merged_weight(&self, w: &Tensor) -> Result<Tensor> {
        Ok((w.to_dtype(DType::F32)? + self.delta_weight()?)?.to_dtype(w.dtype())?)
    }

    fn unmerged_weight(&self, w: &Tensor) -> Result<Tensor> {
        Ok((w.to_dtype(DType::F32)? - self.delta_weight()?)?.to_dtype(w.dtype())?)
    }

    fn params(&self) -> Vec<(String, Var)> {
        vec![("snell_in".into(), self.input.clone()), ("snell_out".into(), self.output.clone())]
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

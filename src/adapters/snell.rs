//! SNELL (Shen, Sun, Ji, Huang, Wang, "Expanding Sparse Tuning for Low Memory Usage", NeurIPS 2024;
//! ssfgunner/SNELL `model/vision_transformer_timm.py`, classes `KLoRA` and `SNELL`, docs/METHODS.md §3).
//!
//! Per adapted weight W [d_out, d_in], rank r and H heads (2 in the paper), two trainable tensors
//! `In` [H, d_in, r/H] and `Out` [H, d_out, r/H], both kaiming-uniform (a = √5) with the fan-in
//! torch computes for a 3-D tensor (`size(1)·size(2)`), i.e. U(±1/√(d·r/H)); the update is NOT
//! zero at start. The kernelized low-rank merge is a signed sum of Euclidean distance kernels:
//!
//! `ΔW[i, j] = Σ_h c_h · ‖In[h, i, :] − Out[h, j, :]‖₂`   (ΔW is d_in × d_out, `torch.cdist` summed over h)
//!
//! with `c = 0.1·(+1, −1)` (for other H, `c_h = 0.1·(−1)^h`). With sparsity s > 0 the weights compete
//! by magnitude, the threshold being recomputed every forward from the current ΔW:
//!
//! `τ = quantile(|ΔW|, s)` (torch.quantile, linear interpolation at position s·(n−1)),
//! `ΔW_s = ΔW ⊙ |ΔW| ⊙ 1[|ΔW| > τ]`, where the `|ΔW| ⊙ 1[…]` factor is detached (a constant in
//! backward: not a straight-through estimator, and no gradient through τ or the mask). With
//! s = 0 it is KLoRA: `ΔW_s = ΔW`, no sparsification and no |ΔW| factor.
//!
//! `y = x Wᵀ + x ΔW_s` (x [..., d_in]). Merge: `W ← W + ΔW_sᵀ` (in f32).
//!
//! Distances use `‖a‖² + ‖b‖² − 2 a·b` (one GEMM per head, torch.cdist's mm path), clamped at 0,
//! and a square root whose gradient at a zero distance is 0 (torch's convention).
//!
//! Not a PEFT type: the engine writes `peft_type: "SNELL"` with `r`, `heads`, `sparsity`,
//! `target_modules`, and the tensors `<module>.snell_in` (f32 [H, d_in, r/H]) and
//! `<module>.snell_out` (f32 [H, d_out, r/H]), e.g.
//! `base_model.model.model.layers.0.self_attn.q_proj.snell_in`.

use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use std::path::Path;

use serde_json::Value;

use super::config::{parse, ReadConfig};
use super::method::{check_rank, AdapterMethod, BuiltLinear};
use super::Targets;
use crate::ops::snell_merge::{check_sparsity, head_coefficients, kaiming_factors, sparsify};
use crate::ops;
use crate::model::{FrozenLinear, LinearAdapter};
use crate::{Error, Result};

fn default_heads() -> usize {
    2
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnellConfig {
    /// Total rank r, split evenly over the heads (r/H per head).
    pub r: usize,
    #[serde(default = "default_heads")]
    pub heads: usize,
    /// The quantile s of |ΔW| below which entries are dropped, in [0, 1); 0 is KLoRA.
    #[serde(default)]
    pub sparsity: f64,
    pub target_modules: Targets,
}

impl SnellConfig {
    /// Checks r, heads and sparsity; errors start with `what` (the module being adapted).
    pub fn validate(&self, what: &str) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Adapter(format!("SNELL on `{what}`: rank r must be at least 1")));
        }
        if self.heads == 0 || !self.r.is_multiple_of(self.heads) {
            return Err(Error::Adapter(format!(
                "SNELL on `{what}`: heads = {} must be at least 1 and divide r = {}",
                self.heads, self.r
            )));
        }
        check_sparsity(self.sparsity, what)
    }
}

impl AdapterMethod for SnellConfig {
    fn peft_type(&self) -> &'static str {
        "SNELL"
    }

    fn targets(&self) -> Option<&Targets> {
        Some(&self.target_modules)
    }

    fn peft_json(&self) -> Value {
        serde_json::to_value(self).expect("SnellConfig serialises")
    }

    fn build_linear(&self, path: &str, base: &FrozenLinear, rng: &mut StdRng) -> Result<Option<BuiltLinear>> {
        check_rank(path, "r", self.r, base)?;
        self.validate(path)?;
        Ok(Some((Box::new(SnellLinear::new(base, self, rng)?), None)))
    }
}

/// The engine's own `peft_type: "SNELL"`.
pub fn read_snell(v: &Value, path: &Path) -> Result<ReadConfig> {
    Ok((parse::<SnellConfig>(v, path, "SNELL")?.into(), &["r", "heads", "sparsity", "target_modules"]))
}

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

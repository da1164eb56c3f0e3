//! GaLore (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
//! ICML 2024), as `galore_torch.GaLoreAdamW` with `proj_type="std"` (docs/METHODS.md §4.2; EfficientFT
//! runs rank = 8, update_proj_gap = 500, scale = 4).
//!
//! For a weight gradient G [m, n]: if m ≥ n, `P = Vh[:r]` [r, n] of `svd(G)` and the low-rank
//! gradient is `G Pᵀ` [m, r]; else `P = U[:, :r]` [m, r] and `Pᵀ G` [r, n]. P is recomputed when
//! the parameter's step counter (before the increment) is a multiple of `update_proj_gap`, so at
//! steps 0, gap, 2·gap, … Adam's moments live in the projected space (they are not reset when P
//! changes, as in galore_torch); the normalised update `m / (√v + ε)` is projected back
//! (`N P` or `P N`) and multiplied by `scale`. The AdamW arithmetic is galore_torch's (HF AdamW):
//! `step = lr·√(1−β₂ᵗ)/(1−β₁ᵗ)`, `p ← p − step·scale·back(m/(√v+ε))`, then `p ← p − lr·wd·p`.
//! The SVD is exact (f64, CPU), which costs O(m n min(m, n)) every gap steps.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::adapters::flags::{Flags, MethodFlags, MAX_RANK};
use crate::adapters::lora::LoraFlags;
use crate::validate::{int_in, positive};
use crate::adapters::linalg::{svd, to_matrix, to_tensor};
use crate::Result;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GaloreConfig {
    pub rank: usize,
    pub update_proj_gap: usize,
    pub scale: f64,
}

impl Default for GaloreConfig {
    fn default() -> Self {
        Self { rank: 8, update_proj_gap: 500, scale: 4.0 }
    }
}

/// The projector of one weight.
#[derive(Debug, Clone)]
pub struct Projector {
    pub config: GaloreConfig,
    /// `Vh[:r]` [r, n] (right) or `U[:, :r]` [m, r] (left).
    pub ortho: Option<Tensor>,
    /// m ≥ n: project from the right.
    pub right: bool,
    /// How many times P was computed (for tests and logs).
    pub refreshes: usize,
}

impl Projector {
    pub fn new(config: GaloreConfig, shape: (usize, usize)) -> Self {
        Self { config, ortho: None, right: shape.0 >= shape.1, refreshes: 0 }
    }

    /// The projected shape of an [m, n] gradient (where Adam's moments live).
    pub fn low_shape(&self, (m, n): (usize, usize)) -> (usize, usize) {
        let r = self.config.rank.min(m).min(n);
        if self.right {
            (m, r)
        } else {
            (r, n)
        }
    }

    /// The low-rank gradient; `iter` is the parameter's step count before this step.
    pub fn project(&mut self, g: &Tensor, iter: usize) -> Result<Tensor> {
        let g = g.to_dtype(DType::F32)?;
        if self.ortho.is_none() || iter.is_multiple_of(self.config.update_proj_gap.max(1)) {
            let (u, _, vt) = svd(&to_matrix(&g)?);
            let r = self.config.rank.min(u.ncols());
            let p = if self.right { vt.rows(0, r).into_owned() } else { u.columns(0, r).into_owned() };
            self.ortho = Some(to_tensor(&p, g.device())?);
            self.refreshes += 1;
        }
        let p = self.ortho.as_ref().expect("projector set above");
        Ok(if self.right { g.matmul(&p.t()?)? } else { p.t()?.matmul(&g)? })
    }

    /// `scale · (N P)` or `scale · (P N)`.
    pub fn project_back(&self, low: &Tensor) -> Result<Tensor> {
        let p = self.ortho.as_ref().ok_or_else(|| crate::Error::Training("GaLore: project_back before project".into()))?;
        let full = if self.right { low.matmul(p)? } else { p.matmul(low)? };
        Ok((full * self.config.scale)?)
    }
}

/// GaLore's flags (its rank defaults to LoRA's r).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "GaLore")]
pub struct GaloreFlags {
    /// Projection rank (default r).
    #[arg(long)]
    pub galore_rank: Option<usize>,
    /// Optimizer steps between two SVDs of the gradient.
    #[arg(long, default_value_t = 500)]
    pub galore_update_proj_gap: usize,
    /// Scale of the projected-back update.
    #[arg(long, default_value_t = 4.0)]
    pub galore_scale: f64,
}

impl MethodFlags for GaloreFlags {
    fn validate(&self) -> Result<()> {
        if let Some(r) = self.galore_rank {
            int_in("galore-rank", r, 1, MAX_RANK)?;
        }
        int_in("galore-update-proj-gap", self.galore_update_proj_gap, 1, usize::MAX)?;
        positive("galore-scale", self.galore_scale, 1e6)
    }
}

impl GaloreConfig {
    pub fn from_flags(f: &Flags) -> Result<Self> {
        let g = f.read::<GaloreFlags>()?;
        Ok(Self { rank: g.galore_rank.unwrap_or(f.read::<LoraFlags>()?.r), update_proj_gap: g.galore_update_proj_gap, scale: g.galore_scale })
    }
}

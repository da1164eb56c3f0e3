//! Data-free LoRA initialisations that move the principal part of W into the adapter, with
//! PEFT 0.15.1 semantics (docs/METHODS.md §4.2); PEFT writes both as LoRA with `init_lora_weights`
//! `"pissa"` / `"olora"`.
//!
//! - **PiSSA** (Meng et al., "PiSSA: Principal Singular Values and Singular Vectors Adaptation of
//!   Large Language Models", NeurIPS 2024): full SVD of W (f32 in PEFT; f64 here), `W = V S Uh`
//!   in PEFT's naming; `Vr = V[:, :r]`, `Sr = S[:r] / s`, `Uhr = Uh[:r]`;
//!   `A = diag(√Sr) Uhr` [r, in], `B = Vr diag(√Sr)` [out, r], so `s·B A` is the top-r part of W.
//!   PEFT's `pissa_niter_K` (randomised `svd_lowrank`) is read as PiSSA with the exact SVD.
//! - **OLoRA** (Büyükakyüz, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
//!   2024): reduced QR `W = Q R`, `B = Q[:, :r]`, `A = R[:r, :]`.
//!
//! Both replace the frozen weight by the residual `W_res = W − s·B A` (computed in f64, stored in
//! the base dtype), so the model's output is unchanged at init. The forward is LoRA's.
//!
//! An adapter trained this way only fits the residual base. PEFT's
//! `save_pretrained(path_initial_model_for_weight_conversion=…)` turns it into a plain LoRA for
//! the ORIGINAL base: `W_res + s·B A = W + s·(B A − B₀ A₀)`, i.e. the rank-2r pair
//! `A' = [A; A₀]`, `B' = [B, −B₀]`, with `r' = 2r` and `α' = 2α` (rsLoRA: `α' = √2·α`) so that
//! the scale is unchanged. [`convert_to_lora`] does the same from the initial A₀, B₀ that each
//! adapter keeps.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use rand::rngs::StdRng;

use crate::adapters::linalg::{qr, svd, to_matrix, to_tensor};
use serde_json::{json, Value};

use crate::adapters::lora::{LoraConfig, LoraLinear};
use crate::adapters::method::{AdapterMethod, BuiltLinear};
use crate::adapters::{AdapterConfig, Targets};
use crate::error::{Error, Result};
use crate::model::{FrozenLinear, LinearAdapter, Llama};
use crate::ops::nn::AttentionHeads;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitKind {
    Pissa,
    Olora,
}

impl InitKind {
    pub fn peft_name(self) -> &'static str {
        match self {
            InitKind::Pissa => "pissa",
            InitKind::Olora => "olora",
        }
    }
}

/// PiSSA or OLoRA: LoRA's config and the initialisation from W.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraInitConfig {
    pub lora: LoraConfig,
    pub kind: InitKind,
}

impl AdapterMethod for LoraInitConfig {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn targets(&self) -> Option<&Targets> {
        Some(&self.lora.target_modules)
    }

    fn peft_json(&self) -> Value {
        self.lora.peft_json_with_init(json!(self.kind.peft_name()))
    }

    fn build_linear(&self, path: &str, base: &FrozenLinear, rng: &mut StdRng) -> Result<Option<BuiltLinear>> {
        self.lora.check(path, base)?;
        let (adapter, residual) = InitLoraLinear::new(base, &self.lora, self.kind, rng)?;
        Ok(Some((Box::new(adapter), Some(residual))))
    }
}

/// A LoRA pair initialised from W, with its initial values kept for the conversion.
pub struct InitLoraLinear {
    pub lora: LoraLinear,
    pub kind: InitKind,
    /// A₀ [r, in] and B₀ [out, r], f32.
    pub a0: Tensor,
    pub b0: Tensor,
}

impl InitLoraLinear {
    /// The adapter and the residual weight that must replace the base weight.
    pub fn new(base: &FrozenLinear, cfg: &LoraConfig, kind: InitKind, rng: &mut StdRng) -> Result<(Self, Tensor)> {
        let w = &*base.weight()?;
        let scale = cfg.scale();
        let (a, b, w_res) = match kind {
            InitKind::Pissa => pissa_init(w, cfg.r, scale)?,
            InitKind::Olora => olora_init(w, cfg.r, scale)?,
        };
        let lora = LoraLinear::from_parts(&a, &b, scale, cfg.lora_dropout, rng)?;
        Ok((Self { lora, kind, a0: a, b0: b }, w_res))
    }
}

fn check_rank(w: &Tensor, r: usize, what: &str) -> Result<(usize, usize)> {
    let (out, inp) = w.dims2()?;
    if r == 0 || r > out.min(inp) {
        return Err(Error::Adapter(format!("{what}: rank {r} must be in 1..={} for a {out}x{inp} weight", out.min(inp))));
    }
    Ok((out, inp))
}

/// PiSSA: (A [r, in], B [out, r], W − s·B A in W's dtype).
pub fn pissa_init(w: &Tensor, r: usize, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let (out, inp) = check_rank(w, r, "PiSSA")?;
    let m = to_matrix(w)?;
    let (u, s, vt) = svd(&m);
    let sq: Vec<f64> = (0..r).map(|i| (s[i] / scale).sqrt()).collect();
    let a = nalgebra::DMatrix::from_fn(r, inp, |i, j| sq[i] * vt[(i, j)]);
    let b = nalgebra::DMatrix::from_fn(out, r, |i, j| u[(i, j)] * sq[j]);
    finish(w, &m, a, b, scale)
}

/// OLoRA: (A = R[:r] [r, in], B = Q[:, :r] [out, r], W − s·B A in W's dtype).
pub fn olora_init(w: &Tensor, r: usize, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
    check_rank(w, r, "OLoRA")?;
    let m = to_matrix(w)?;
    let (q, rr) = qr(&m);
    let a = rr.rows(0, r).into_owned();
    let b = q.columns(0, r).into_owned();
    finish(w, &m, a, b, scale)
}

fn finish(
    w: &Tensor,
    m: &nalgebra::DMatrix<f64>,
    a: nalgebra::DMatrix<f64>,
    b: nalgebra::DMatrix<f64>,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let res = m - (&b * &a) * scale;
    let device = w.device();
    Ok((to_tensor(&a, device)?, to_tensor(&b, device)?, to_tensor(&res, device)?.to_dtype(w.dtype())?))
}

/// Every method goes to the LoRA inside, so PiSSA and OLoRA train through LoRA's fused ops (heads
/// split, SwiGLU in front) and keep no more than LoRA does.
impl LinearAdapter for InitLoraLinear {
    fn forward(&self, x: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor> {
        self.lora.forward(x, base, train)
    }

    fn forward_heads(&self, x: &Tensor, base: &FrozenLinear, heads: AttentionHeads, train: bool) -> Result<Tensor> {
        self.lora.forward_heads(x, base, heads, train)
    }

    fn forward_swiglu(&self, g: &Tensor, u: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor> {
        self.lora.forward_swiglu(g, u, base, train)
    }

    fn forward_swiglu_backward_only(&self, g: &Tensor, u: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor> {
        self.lora.forward_swiglu_backward_only(g, u, base, train)
    }

    fn merged_weight(&self, w: &Tensor) -> Result<Tensor> {
        self.lora.merged_weight(w)
    }

    fn unmerged_weight(&self, w: &Tensor) -> Result<Tensor> {
        self.lora.unmerged_weight(w)
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.lora.params()
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

/// The plain-LoRA config and tensors that apply the trained PiSSA/OLoRA adapter to the ORIGINAL
/// base weights (PEFT's `path_initial_model_for_weight_conversion`).
pub fn convert_to_lora(model: &Llama, cfg: &LoraConfig) -> Result<(LoraConfig, HashMap<String, Tensor>)> {
    let mut tensors = HashMap::new();
    for (path, lin) in model.named_linears() {
        let Some(adapter) = lin.adapter() else { continue };
        let init = adapter.as_any().and_then(|a| a.downcast_ref::<InitLoraLinear>()).ok_or_else(|| {
            Error::Adapter(format!("{path}: only PiSSA/OLoRA adapters can be converted to a plain LoRA"))
        })?;
        let a = Tensor::cat(&[init.lora.a.as_tensor(), &init.a0], 0)?;
        let b = Tensor::cat(&[init.lora.b.as_tensor(), &init.b0.neg()?], 1)?;
        tensors.insert(format!("base_model.model.{path}.lora_A.weight"), a.to_dtype(DType::F32)?.contiguous()?);
        tensors.insert(format!("base_model.model.{path}.lora_B.weight"), b.to_dtype(DType::F32)?.contiguous()?);
    }
    let mut out = cfg.clone();
    out.r = 2 * cfg.r;
    out.lora_alpha = if cfg.use_rslora { cfg.lora_alpha * 2f64.sqrt() } else { 2.0 * cfg.lora_alpha };
    Ok((out, tensors))
}

/// Save the trained PiSSA/OLoRA adapter as a plain LoRA for the original base model.
pub fn save_converted(model: &Llama, cfg: &AdapterConfig, dir: &Path, base_model: Option<&str>) -> Result<()> {
    let Some(init) = cfg.downcast_ref::<LoraInitConfig>() else {
        return Err(Error::Adapter(format!("{} adapters need no conversion", cfg.peft_type())));
    };
    let (converted, tensors) = convert_to_lora(model, &init.lora)?;
    let cfg = AdapterConfig::new(converted);
    crate::fsutil::write_dir_atomic(dir, |tmp| crate::adapters::write_adapter_files(tmp, &cfg, &tensors, base_model))
}

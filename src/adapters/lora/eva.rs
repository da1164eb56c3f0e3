//! EVA (Paischer et al., "One Initialization to Rule them All: Fine-tuning via Explained Variance
//! Adaptation", 2024), following PEFT's `tuners/lora/eva.py` (`initialize_lora_eva_weights`),
//! docs/METHODS.md §4.2. PEFT writes it as LoRA with `init_lora_weights: "eva"`, `eva_config` and the
//! redistributed ranks in `rank_pattern` / `alpha_pattern`.
//!
//! At injection an EVA layer is a plain LoRA (A kaiming-uniform, B = 0), as in PEFT; the
//! data-driven init is [`initialize_eva`], run once on a few batches before training:
//! 1. every targeted layer records its inputs x through a temporary wrapper adapter, keeping the
//!    positions whose label is not -100 (PEFT's default `use_label_mask=True`);
//! 2. per layer, the PCA of the recorded inputs: the input mean and covariance are accumulated
//!    over all batches (f64) and the covariance is eigendecomposed exactly. PEFT instead runs an
//!    IncrementalPCA (centered, `whiten=False`) batch by batch and stops a layer early once its
//!    components' cosine similarity to the previous batch exceeds `tau = 0.99`; this exact
//!    streaming covariance gives the components IncrementalPCA converges to, so `tau` is not used;
//! 3. rank redistribution as PEFT's `get_rank_distribution`: each layer offers its top `⌊r·ρ⌋`
//!    explained-variance ratios (ρ = 2 default); the global top `r × n_layers` (the budget) are
//!    kept and a layer's rank is how many of its own made it, so no layer exceeds r·ρ and the
//!    ranks sum to the budget;
//! 4. `A` = the layer's top right-singular vectors of the centered inputs (principal
//!    components), rows orthonormal; `B = 0`, so the model is unchanged. PEFT's default
//!    `adjust_scaling_factors=True` keeps each layer's scale: `α' = α·r'/r` (rsLoRA:
//!    `α' = α·√(r'/r)`). A layer that gets rank 0 loses its adapter (as in PEFT).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use nalgebra::{DMatrix, DVector};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

use serde_json::{json, Value};

use crate::adapters::lora::{LoraConfig, LoraLinear};
use crate::adapters::method::{check_rank, AdapterMethod, BuiltLinear};
use crate::adapters::Targets;
use crate::model::{FrozenLinear, LinearAdapter, Llama};
use crate::model::TrainBatch;
use crate::{Error, Result};

fn d2() -> f64 {
    2.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaConfig {
    #[serde(flatten)]
    pub lora: LoraConfig,
    #[serde(default = "d2")]
    pub rho: f64,
    /// Module path → rank after redistribution (PEFT's `rank_pattern`); empty before the init.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
}

impl EvaConfig {
    pub fn new(lora: LoraConfig) -> Self {
        Self { lora, rho: 2.0, rank_pattern: BTreeMap::new(), alpha_pattern: BTreeMap::new() }
    }

    fn lookup<T: Copy>(map: &BTreeMap<String, T>, path: &str) -> Option<T> {
        map.iter().find(|(k, _)| path == k.as_str() || path.ends_with(&format!(".{k}"))).map(|(_, v)| *v)
    }

    /// The rank and scale of one layer (rank 0: no adapter).
    pub fn layer(&self, path: &str) -> (usize, f64) {
        let r = Self::lookup(&self.rank_pattern, path).unwrap_or(self.lora.r);
        let alpha = Self::lookup(&self.alpha_pattern, path).unwrap_or_else(|| self.adjusted_alpha(r));
        let scale = if self.lora.use_rslora { alpha / (r.max(1) as f64).sqrt() } else { alpha / r.max(1) as f64 };
        (r, scale)
    }

    fn adjusted_alpha(&self, r: usize) -> f64 {
        let ratio = r as f64 / self.lora.r as f64;
        if self.lora.use_rslora {
            self.lora.lora_alpha * ratio.sqrt()
        } else {
            self.lora.lora_alpha * ratio
        }
    }
}

impl AdapterMethod for EvaConfig {
    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn targets(&self) -> Option<&Targets> {
        Some(&self.lora.target_modules)
    }

    fn peft_json(&self) -> Value {
        let mut v = self.lora.peft_json_with_init(json!("eva"));
        v["eva_config"] = json!({
            "rho": self.rho, "tau": 0.99, "use_label_mask": true, "label_mask_value": -100,
            "whiten": false, "adjust_scaling_factors": true,
        });
        v["rank_pattern"] = json!(self.rank_pattern);
        v["alpha_pattern"] = json!(self.alpha_pattern);
        v
    }

    /// LoRA with this layer's rank; a layer that EVA gave rank 0 has no adapter.
    fn build_linear(&self, path: &str, base: &FrozenLinear, rng: &mut StdRng) -> Result<Option<BuiltLinear>> {
        check_rank(path, "r", self.lora.r, base)?;
        let (r, scale) = self.layer(path);
        if r == 0 {
            return Ok(None);
        }
        let mut c = self.lora.clone();
        c.r = r;
        let mut l = LoraLinear::new(base, &c, rng)?;
        l.scale = scale;
        Ok(Some((Box::new(l), None)))
    }

    /// PEFT's `initialize_lora_eva_weights` reads the first few micro-batches.
    fn init_batches(&self) -> usize {
        4
    }

    fn initialize_from_data(&mut self, model: &mut Llama, batches: &[TrainBatch], seed: u64) -> Result<Option<String>> {
        let ranks = initialize_eva(model, self, batches, seed)?;
        Ok(Some(format!("EVA ranks: {ranks:?}")))
    }
}

struct Stats {
    sum: DVector<f64>,
    outer: DMatrix<f64>,
    n: f64,
}

/// Records its inputs (mask-weighted first and second moments), then runs the wrapped adapter.
struct Recorder {
    inner: Box<dyn LinearAdapter>,
    stats: Arc<Mutex<Stats>>,
    mask: Arc<Mutex<Option<Tensor>>>,
}

impl LinearAdapter for Recorder {
    fn forward(&self, x: &Tensor, base: &FrozenLinear, train: bool) -> Result<Tensor> {
        let inp = x.dim(candle_core::D::Minus1)?;
        let rows = x.to_dtype(DType::F32)?.reshape(((), inp))?;
        let m = match self.mask.lock().expect("eva mask").as_ref() {
            Some(m) if m.elem_count() == rows.dim(0)? => m.to_device(x.device())?.reshape((rows.dim(0)?, 1))?,
            _ => Tensor::ones((rows.dim(0)?, 1), DType::F32, x.device())?,
        };
        let xm = rows.broadcast_mul(&m)?;
        let sum: Vec<f64> = xm.sum(0)?.to_dtype(DType::F64)?.to_vec1()?;
        let outer = crate::adapters::linalg::to_matrix(&xm.t()?.matmul(&rows)?)?;
        let n = m.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let mut st = self.stats.lock().expect("eva stats");
        st.sum += DVector::from_vec(sum);
        st.outer += outer;
        st.n += n;
        drop(st);
        self.inner.forward(x, base, train)
    }
    fn merged_weight(&self, w: &Tensor) -> Result<Tensor> {
        self.inner.merged_weight(w)
    }
    fn unmerged_weight(&self, w: &Tensor) -> Result<Tensor> {
        self.inner.unmerged_weight(w)
    }
    fn params(&self) -> Vec<(String, Var)> {
        self.inner.params()
    }
}

/// The data-driven EVA init (see the module doc) of the EVA layers already injected; updates
/// `cfg.rank_pattern` / `alpha_pattern` (save the adapter with the updated config).
pub fn initialize_eva(model: &mut Llama, cfg: &mut EvaConfig, batches: &[TrainBatch], seed: u64) -> Result<BTreeMap<String, usize>> {
    let mask_cell = Arc::new(Mutex::new(None));
    let mut layers = Vec::new();
    for (path, lin) in model.named_linears_mut() {
        if !cfg.lora.target_modules.matches(&path)? {
            continue;
        }
        let Some(inner) = lin.take_adapter() else { continue };
        let n = lin.base().in_features();
        let stats = Arc::new(Mutex::new(Stats { sum: DVector::zeros(n), outer: DMatrix::zeros(n, n), n: 0.0 }));
        lin.set_adapter(Box::new(Recorder { inner, stats: stats.clone(), mask: mask_cell.clone() }));
        layers.push((path, stats, lin.base().out_features()));
    }
    if layers.is_empty() {
        return Err(Error::Adapter("EVA: no targeted layer has an adapter: inject the EVA config first".into()));
    }
    for b in batches {
        // PEFT's default (use_label_mask=True): the tokens whose label is not -100.
        let labels: Vec<i64> = b.labels.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
        let flat: Vec<f32> = labels.iter().map(|&l| if l != -100 { 1.0 } else { 0.0 }).collect();
        *mask_cell.lock().expect("eva mask") = Some(Tensor::from_vec(flat, b.mask.len() * b.mask[0].len(), &Device::Cpu)?);
        model.forward_hidden(&b.input_ids, Some(&b.mask), None, false)?;
    }
    // PCA per layer: eigenvectors of the covariance, by decreasing variance.
    let max_c = ((cfg.lora.r as f64 * cfg.rho).floor() as usize).max(1);
    let mut comps = Vec::new();
    let mut offers = Vec::new();
    for (i, (path, stats, _)) in layers.iter().enumerate() {
        let st = stats.lock().expect("eva stats");
        if st.n < 1.0 {
            return Err(Error::Adapter(format!("EVA: {path} saw no tokens")));
        }
        let mean = &st.sum / st.n;
        let cov = &st.outer / st.n - &mean * mean.transpose();
        let eig = nalgebra::SymmetricEigen::new(cov);
        let mut order: Vec<usize> = (0..eig.eigenvalues.len()).collect();
        order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
        let total: f64 = eig.eigenvalues.iter().map(|v| v.max(0.0)).sum::<f64>().max(f64::MIN_POSITIVE);
        let k = max_c.min(order.len());
        for &j in &order[..k] {
            offers.push((eig.eigenvalues[j].max(0.0) / total, i));
        }
        let a = DMatrix::from_fn(k, order.len(), |r, c| eig.eigenvectors[(c, order[r])]);
        comps.push(a);
    }
    // Global top r × n_layers explained-variance ratios decide the ranks.
    offers.sort_by(|a, b| b.0.total_cmp(&a.0));
    let budget = cfg.lora.r * layers.len();
    let mut counts = vec![0usize; layers.len()];
    for &(_, i) in offers.iter().take(budget) {
        counts[i] += 1;
    }
    let mut rng = StdRng::seed_from_u64(seed);
    cfg.rank_pattern.clear();
    cfg.alpha_pattern.clear();
    let mut by_path: BTreeMap<String, usize> = BTreeMap::new();
    for (i, (path, _, out)) in layers.iter().enumerate() {
        by_path.insert(path.clone(), counts[i]);
        cfg.rank_pattern.insert(path.clone(), counts[i]);
        cfg.alpha_pattern.insert(path.clone(), cfg.adjusted_alpha(counts[i]));
        let _ = out;
    }
    for (path, lin) in model.named_linears_mut() {
        let Some(i) = layers.iter().position(|(p, _, _)| *p == path) else { continue };
        let r = counts[i];
        if r == 0 {
            lin.clear_adapter();
            continue;
        }
        let device = lin.base().device().clone();
        let a = crate::adapters::linalg::to_tensor(&comps[i].rows(0, r).into_owned(), &device)?;
        let b = Tensor::zeros((lin.base().out_features(), r), DType::F32, &device)?;
        let (_, scale) = cfg.layer(&path);
        lin.set_adapter(Box::new(LoraLinear::from_parts(&a, &b, scale, cfg.lora.lora_dropout, &mut rng)?));
    }
    Ok(by_path)
}

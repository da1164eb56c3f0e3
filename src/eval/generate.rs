//! Text generation for evaluation: greedy decoding and Hugging Face's deterministic beam search,
//! batched over prompts (left-padded) with the KV cache.
//!
//! Why: the commonsense protocol (`docs/METHODS.md` §0.4) scores what
//! `model.generate(num_beams=4, max_new_tokens=32)` produces, with `do_sample` unset, so the
//! result depends on the exact beam-search rules. They follow transformers 5's `_beam_search`
//! (the vectorised rewrite of transformers PR #35802, unchanged in 5.x):
//!
//! - `num_beams` running hypotheses per prompt; the first step starts from one beam (the others
//!   carry a score of -1e9, so they never win), the score of a hypothesis is the sum of its
//!   tokens' log-probabilities (log-softmax of the f32 logits).
//! - Each step takes the top `max(2, 1 + #eos) * num_beams` candidates over beams × vocab.
//!   A candidate "hits the stopping criteria" when its token is an EOS or when it reaches
//!   `max_new_tokens`. The next running beams are the best `num_beams` candidates that did not
//!   hit; a hit among the top `num_beams` candidates (not the backups) joins the finished list.
//! - A finished hypothesis is scored `sum_logprobs / generated_len ^ length_penalty` with
//!   `length_penalty = 1.0`, where `generated_len` counts the **new tokens only, EOS included**
//!   (`cur_len + 1 - decoder_prompt_len` in `_update_finished_beams`; transformers ≤ 4.2x's
//!   `BeamHypotheses.add` divided by the whole sequence length, prompt included, and 4.3x–4.4x by
//!   the new tokens without the EOS). The finished list keeps the best `num_beams`.
//! - `early_stopping=False`: a prompt stops once its finished list is full and the best running
//!   score, normalised by the current generated length, does not beat the worst finished one
//!   (`_check_early_stop_heuristic`). Generation ends when every prompt stopped or at
//!   `max_new_tokens`; the answer is the best finished hypothesis.
//! - `num_beams == 1` is greedy decoding (transformers picks `_sample` with argmax then), which
//!   stops a row at its first EOS.
//!
//! Ties between equal scores go to the lower index (beam-major, then token), which is what a
//! stable top-k gives; `torch.topk` leaves that order unspecified.
//!
//! Returned sequences are the new tokens only, ending with the EOS when the hypothesis ended
//! with one, without padding.

use candle_core::{Tensor, D};

use crate::error::{Error, Result};
use crate::model::llama::{KvCache, Llama};
use crate::model::LlamaConfig;

/// The score transformers uses to disable a beam (`-1e9` in `_beam_search`).
const DISABLED: f32 = -1.0e9;

/// The decoding parameters of the protocol that matter for deterministic decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// 1 = greedy decoding.
    pub num_beams: usize,
    /// Any of these ends a hypothesis; an id outside the vocabulary never does.
    pub eos_token_ids: Vec<u32>,
    /// Fed at the left padding of shorter prompts (masked out, so its value does not matter).
    pub pad_token_id: u32,
}

impl GenerationConfig {
    /// The commonsense protocol (§0.4): 4 beams, 32 new tokens, the model's EOS ids.
    pub fn protocol(model: &LlamaConfig) -> Self {
        Self {
            max_new_tokens: 32,
            num_beams: 4,
            eos_token_ids: model.eos_token_ids.clone(),
            pad_token_id: model.pad_token_id.or(model.eos_token_ids.first().copied()).unwrap_or(0),
        }
    }

    fn is_eos(&self, token: u32) -> bool {
        self.eos_token_ids.contains(&token)
    }
}

/// Greedy decoding when `cfg.num_beams <= 1`, beam search otherwise.
pub fn generate(model: &Llama, prompts: &[Vec<u32>], cfg: &GenerationConfig) -> Result<Vec<Vec<u32>>> {
    if cfg.num_beams <= 1 {
        greedy(model, prompts, cfg)
    } else {
        beam_search(model, prompts, cfg)
    }
}

/// Greedy decoding of a batch of prompts: the arg-max token at each step (the lowest id on a
/// tie), until EOS (kept) or `max_new_tokens`. Finished rows leave the batch, so the cost of a
/// step is that of the rows still running.
pub fn greedy(model: &Llama, prompts: &[Vec<u32>], cfg: &GenerationConfig) -> Result<Vec<Vec<u32>>> {
    check_prompts(prompts)?;
    check_context(model, prompts, cfg)?;
    let mut out = vec![Vec::new(); prompts.len()];
    if cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    let mut cache = KvCache::new();
    let mut logits = prefill(model, prompts, cfg.pad_token_id, &mut cache, cfg.max_new_tokens)?;
    // `running[r]` is the prompt index of cache row r.
    let mut running: Vec<usize> = (0..prompts.len()).collect();
    for step in 0..cfg.max_new_tokens {
        let next = argmax_rows(&logits)?;
        let mut keep = Vec::with_capacity(running.len());
        for (row, (&p, &token)) in running.iter().zip(&next).enumerate() {
            out[p].push(token);
            if !cfg.is_eos(token) {
                keep.push(row);
            }
        }
        if keep.is_empty() || step + 1 == cfg.max_new_tokens {
            break;
        }
        if keep.len() < running.len() {
            cache.select_rows(&keep.iter().map(|&r| r as u32).collect::<Vec<_>>())?;
        }
        running = keep.iter().map(|&r| running[r]).collect();
        let tokens: Vec<u32> = keep.iter().map(|&r| next[r]).collect();
        logits = decode_step(model, &tokens, &mut cache)?;
    }
    Ok(out)
}

/// Beam search with transformers 5's semantics (see the module doc), `length_penalty` 1.0 and
/// `early_stopping=False`. `num_beams == 1` is greedy decoding, as in transformers.
pub fn beam_search(model: &Llama, prompts: &[Vec<u32>], cfg: &GenerationConfig) -> Result<Vec<Vec<u32>>> {
    if cfg.num_beams <= 1 {
        return greedy(model, prompts, cfg);
    }
    beam_search_impl(model, prompts, cfg)
}

/// The beam machinery for any `num_beams` (with 1 it is not greedy when EOS can occur: the
/// running beam may outscore a finished one later; without EOS the two agree).
fn beam_search_impl(model: &Llama, prompts: &[Vec<u32>], cfg: &GenerationConfig) -> Result<Vec<Vec<u32>>> {
    check_prompts(prompts)?;
    check_context(model, prompts, cfg)?;
    if cfg.max_new_tokens == 0 {
        return Ok(vec![Vec::new(); prompts.len()]);
    }
    let nb = cfg.num_beams;
    let mut cache = KvCache::new();
    let prompt_logits = prefill(model, prompts, cfg.pad_token_id, &mut cache, cfg.max_new_tokens)?;
    // Every beam of a prompt starts from the prompt's cache row and logits.
    let expand: Vec<u32> = (0..prompts.len() as u32).flat_map(|p| std::iter::repeat_n(p, nb)).collect();
    cache.select_rows(&expand)?;
    let mut logits = prompt_logits.index_select(&Tensor::new(expand.as_slice(), prompt_logits.device())?, 0)?;
    let mut groups: Vec<BeamGroup> = (0..prompts.len()).map(|_| BeamGroup::new(nb)).collect();
    // `active[i]` is the prompt whose beams are cache rows i*nb .. (i+1)*nb.
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    for step in 0..cfg.max_new_tokens {
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let vocab = logp.dim(1)?;
        let logp = logp.flatten_all()?.to_vec1::<f32>()?;
        let mut rows = Vec::new();
        let mut still_active = Vec::new();
        for (i, &p) in active.iter().enumerate() {
            let sources = groups[p].advance(&logp[i * nb * vocab..(i + 1) * nb * vocab], vocab, step + 1, cfg);
            if groups[p].open {
                rows.extend(sources.iter().map(|&s| (i * nb + s) as u32));
                still_active.push(p);
            }
        }
        if still_active.is_empty() || step + 1 == cfg.max_new_tokens {
            break;
        }
        cache.select_rows(&rows)?;
        active = still_active;
        let tokens: Vec<u32> = active.iter().flat_map(|&p| groups[p].last_tokens()).collect();
        logits = decode_step(model, &tokens, &mut cache)?;
    }
    Ok(groups.into_iter().map(BeamGroup::best).collect())
}

/// Every prompt and its new tokens within the model's context (`max_position_embeddings`): past
/// it the model was never trained, and the KV cache and attention grow without a bound the user
/// chose (a 10k-token prompt took 14 GB on a 0.45 MB model).
pub fn check_context(model: &Llama, prompts: &[Vec<u32>], cfg: &GenerationConfig) -> Result<()> {
    let context = model.config.max_position_embeddings;
    if let Some((i, p)) = prompts.iter().enumerate().find(|(_, p)| p.len().saturating_add(cfg.max_new_tokens) > context) {
        return Err(Error::msg(format!(
            "generation: prompt {i} has {} tokens; with {} new tokens that is past the model's context of {context} tokens",
            p.len(),
            cfg.max_new_tokens
        )));
    }
    Ok(())
}

fn check_prompts(prompts: &[Vec<u32>]) -> Result<()> {
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::msg(format!("generation: prompt {i} is empty (it needs at least a BOS token)")));
    }
    Ok(())
}

/// Prompts longer than this are fed in chunks of this many tokens, each attending to the cache
/// and itself: the attention scores of a chunk are [heads, chunk, prompt], so memory grows
/// linearly with the prompt, not with its square. Shorter prompts go in one forward (the
/// commonsense protocol's bits do not move).
pub const PREFILL_CHUNK: usize = 512;

/// Run the left-padded prompts through the model, filling `cache` and leaving room in it for
/// `new` more positions; the logits [b, vocab] of each prompt's last token.
pub fn prefill(model: &Llama, prompts: &[Vec<u32>], pad: u32, cache: &mut KvCache, new: usize) -> Result<Tensor> {
    let (ids, mask) = left_pad(prompts, pad);
    let (b, t) = (prompts.len(), mask[0].len());
    let input = Tensor::from_vec(ids, (b, t), model.device())?;
    let chunk = if t > PREFILL_CHUNK { PREFILL_CHUNK } else { t.max(1) };
    let mut hidden = None;
    for start in (0..t).step_by(chunk) {
        let len = chunk.min(t - start);
        let part: Vec<Vec<u32>> = mask.iter().map(|m| m[start..start + len].to_vec()).collect();
        hidden = Some(model.forward_hidden(&input.narrow(1, start, len)?, Some(&part), Some(cache), false)?);
    }
    cache.reserve(t + new)?;
    last_logits(model, &hidden.ok_or_else(|| Error::msg("an empty prompt has nothing to continue"))?)
}

/// Feed one token per cache row; the logits [rows, vocab] of that token.
pub fn decode_step(model: &Llama, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
    let input = Tensor::from_vec(tokens.to_vec(), (tokens.len(), 1), model.device())?;
    let hidden = model.forward_hidden(&input, None, Some(cache), false)?;
    last_logits(model, &hidden)
}

/// Project only the last position to the vocabulary: [b, t, h] -> [b, vocab] f32.
fn last_logits(model: &Llama, hidden: &Tensor) -> Result<Tensor> {
    let t = hidden.dim(1)?;
    Ok(model.logits(&hidden.narrow(1, t - 1, 1)?)?.squeeze(1)?)
}

/// Row-major ids [b * t] and the mask [b][t], padded on the left to the longest prompt.
fn left_pad(prompts: &[Vec<u32>], pad: u32) -> (Vec<u32>, Vec<Vec<u32>>) {
    let t = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * t);
    let mut mask = Vec::with_capacity(prompts.len());
    for p in prompts {
        let n_pad = t - p.len();
        ids.extend(std::iter::repeat_n(pad, n_pad).chain(p.iter().copied()));
        mask.push(std::iter::repeat_n(0, n_pad).chain(std::iter::repeat_n(1, p.len())).collect());
    }
    (ids, mask)
}

/// A hypothesis: its new tokens and its score (the running sum of log-probs, or the
/// length-normalised score once finished).
#[derive(Debug, Clone, PartialEq)]
struct Hypothesis {
    tokens: Vec<u32>,
    score: f32,
}

/// The beam-search state of one prompt, independent of the model so that it can be tested
/// with hand-made log-probabilities.
#[derive(Debug, Clone)]
struct BeamGroup {
    /// Exactly `num_beams`, best first.
    running: Vec<Hypothesis>,
    /// At most `num_beams`, best first.
    finished: Vec<Hypothesis>,
    /// transformers' `is_early_stop_heuristic_unsatisfied`: the running beams may still improve
    /// the finished list. Once false, the prompt is done.
    open: bool,
}

impl BeamGroup {
    fn new(num_beams: usize) -> Self {
        let running = (0..num_beams)
            .map(|i| Hypothesis { tokens: Vec::new(), score: if i == 0 { 0.0 } else { DISABLED } })
            .collect();
        Self { running, finished: Vec::new(), open: true }
    }

    /// One step. `logp` holds the log-probs of the next token for each running beam
    /// ([num_beams * vocab], beam-major); `gen_len` is the number of new tokens once this one is
    /// added. Returns, for each new running beam, the index of the beam it extends.
    fn advance(&mut self, logp: &[f32], vocab: usize, gen_len: usize, cfg: &GenerationConfig) -> Vec<usize> {
        let nb = self.running.len();
        let keep = (nb * 2.max(1 + cfg.eos_token_ids.len())).min(nb * vocab);
        let acc: Vec<f32> = logp.iter().enumerate().map(|(i, &lp)| lp + self.running[i / vocab].score).collect();
        let candidates = top_k(&acc, keep);
        let at_max = gen_len >= cfg.max_new_tokens;
        let hits: Vec<bool> = candidates.iter().map(|&i| at_max || cfg.is_eos((i % vocab) as u32)).collect();
        let extend = |i: usize| {
            let mut tokens = self.running[i / vocab].tokens.clone();
            tokens.push((i % vocab) as u32);
            tokens
        };
        // Next running beams: the best candidates that did not finish.
        let penalised: Vec<f32> =
            candidates.iter().zip(&hits).map(|(&i, &hit)| if hit { acc[i] + DISABLED } else { acc[i] }).collect();
        let next: Vec<(usize, Hypothesis)> = top_k(&penalised, nb)
            .into_iter()
            .map(|c| (candidates[c] / vocab, Hypothesis { tokens: extend(candidates[c]), score: penalised[c] }))
            .collect();
        // Finished: hits among the top `num_beams` candidates, while the prompt is open.
        let norm = (gen_len as f32).powf(LENGTH_PENALTY);
        let done: Vec<Hypothesis> = match self.open {
            true => (0..nb.min(candidates.len()))
                .filter(|&rank| hits[rank])
                .map(|rank| Hypothesis { tokens: extend(candidates[rank]), score: acc[candidates[rank]] / norm })
                .collect(),
            false => Vec::new(),
        };
        for hyp in done {
            self.add_finished(hyp, nb);
        }
        let sources = next.iter().map(|(s, _)| *s).collect();
        self.running = next.into_iter().map(|(_, h)| h).collect();
        self.open &= self.may_improve(gen_len, nb);
        sources
    }

    /// Insert into the finished list (best first, at most `nb`); an equal score ranks after the
    /// hypotheses already there.
    fn add_finished(&mut self, hyp: Hypothesis, nb: usize) {
        let at = self.finished.iter().position(|h| hyp.score > h.score).unwrap_or(self.finished.len());
        self.finished.insert(at, hyp);
        self.finished.truncate(nb);
    }

    /// `_check_early_stop_heuristic` with `early_stopping=False`: the best running score,
    /// normalised by the current generated length, beats the worst finished one (or -1e9 while
    /// the finished list is not full).
    fn may_improve(&self, gen_len: usize, nb: usize) -> bool {
        let best_running = self.running[0].score / (gen_len as f32).powf(LENGTH_PENALTY);
        let worst_finished = match self.finished.len() == nb {
            true => self.finished.last().map_or(DISABLED, |h| h.score),
            false => DISABLED,
        };
        best_running > worst_finished
    }

    /// The last token of each running beam: the next input.
    fn last_tokens(&self) -> impl Iterator<Item = u32> + '_ {
        self.running.iter().map(|h| *h.tokens.last().expect("a running beam has a token"))
    }

    /// The best finished hypothesis (the best running one if none finished, which the rules
    /// above never leave).
    fn best(self) -> Vec<u32> {
        self.finished.into_iter().chain(self.running).next().map(|h| h.tokens).unwrap_or_default()
    }
}

/// HF's default `length_penalty`.
const LENGTH_PENALTY: f32 = 1.0;

/// The arg-max of each row of logits [rows, vocab] (`sampling::argmax`), the rows over the
/// threads.
fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    let vocab = logits.dim(D::Minus1)?;
    let logits = logits.to_dtype(candle_core::DType::F32)?;
    let mut next = vec![0u32; logits.elem_count() / vocab.max(1)];
    crate::threads::with_values(&logits, |values: &[f32]| {
        crate::threads::for_each_chunk_mut(&mut next, 1, |row, out| out[0] = sampling::argmax(&values[row * vocab..(row + 1) * vocab]) as u32)
    })?;
    Ok(next)
}

/// Indices of the `k` largest values, largest first; equal values in index order.
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut best: Vec<usize> = Vec::with_capacity(k + 1);
    for (i, &v) in values.iter().enumerate() {
        if best.len() == k && best.last().is_none_or(|&w| values[w] >= v) {
            continue;
        }
        let at = best.iter().position(|&w| v > values[w]).unwrap_or(best.len());
        best.insert(at, i);
        best.truncate(k);
    }
    best
}

pub mod sampling;
pub mod stream;

#[cfg(test)]
mod tests;

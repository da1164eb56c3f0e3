//! Sampling the next token from one row of logits, with transformers' logits processors.
//!
//! Why: `generate --temperature 0.7 --top-p 0.9` should mean what it means in
//! `model.generate(do_sample=True, ...)`. The processors run in the order transformers 5's
//! `_get_logits_processor` builds them, each over the f32 logits of the last position:
//!
//! 1. repetition penalty `θ` (`RepetitionPenaltyLogitsProcessor`): for every token id seen in
//!    the prompt or the output so far, a logit `l > 0` becomes `l / θ` and `l ≤ 0` becomes
//!    `l · θ` (either way the token gets less likely; `θ = 1` is off);
//! 2. temperature `T`: `l / T` (`T = 1` is off);
//! 3. top-k: logits below the k-th largest become `-∞` (ties with the k-th are kept; `0` is off);
//! 4. top-p: sort ascending, `p = softmax`, remove the tokens whose cumulative probability is
//!    `≤ 1 − top_p` (the least likely ones), always keeping the most likely (`1` is off);
//! 5. min-p: with `p = softmax`, remove the tokens with `p < min_p · max p`, always keeping the
//!    most likely (`0` is off);
//!
//! then one draw from `softmax` of what is left (the inverse of its cumulative distribution at a
//! uniform number). Temperature 0 or top-k 1 is greedy decoding (the arg-max after the
//! repetition penalty, the lowest id on a tie, as `greedy`), and no number is drawn.
//!
//! The draws come from a `StdRng` seeded by `seed`: the same seed, model and prompt give the same
//! text. They are not torch's `multinomial` draws, so a seed does not reproduce a PyTorch run.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// The sampling flags; `SamplingConfig::default()` is plain sampling at temperature 1.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingConfig {
    /// Greedy decoding, with the repetition penalty still applied when it is set.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }

    /// Each value in its range, named by its flag.
    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &str, v: f32, range: &str| Err(Error::msg(format!("--{flag} {v}: must be {range}")));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", self.temperature, "a number ≥ 0 (0 = greedy)");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top-p", self.top_p, "in (0, 1] (1 = off)");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min-p", self.min_p, "in [0, 1] (0 = off)");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition-penalty", self.repetition_penalty, "a number > 0 (1 = off)");
        }
        Ok(())
    }
}

/// `RepetitionPenaltyLogitsProcessor`: each id in `seen` (repeats count once) is penalised.
/// Ids outside the row are ignored.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = vec![false; logits.len()];
    for &t in seen {
        let Some(l) = logits.get_mut(t as usize) else { continue };
        if !std::mem::replace(&mut done[t as usize], true) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// `TemperatureLogitsWarper` (`temperature > 0`).
pub fn apply_temperature(logits: &mut [f32], temperature: f32) {
    if temperature != 1.0 {
        logits.iter_mut().for_each(|l| *l /= temperature);
    }
}

/// `TopKLogitsWarper`: everything below the k-th largest logit becomes `-∞`.
pub fn apply_top_k(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let mut sorted = logits.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    logits.iter_mut().filter(|l| **l < kth).for_each(|l| *l = f32::NEG_INFINITY);
}

/// `TopPLogitsWarper`: the smallest set of most likely tokens whose probability reaches `top_p`
/// stays. Equal logits are ordered by id (the higher id counts as less likely).
pub fn apply_top_p(logits: &mut [f32], top_p: f32) {
    if top_p >= 1.0 {
        return;
    }
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]).then(b.cmp(&a)));
    let mut cumulative = 0f32;
    // Ascending, the last (most likely) token is always kept.
    for &i in &order[..order.len().saturating_sub(1)] {
        cumulative += probs[i];
        if cumulative <= 1.0 - top_p {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

/// `MinPLogitsWarper`: tokens less likely than `min_p` times the most likely one are removed.
pub fn apply_min_p(logits: &mut [f32], min_p: f32) {
    if min_p <= 0.0 || logits.is_empty() {
        return;
    }
    let probs = softmax(logits);
    let top = argmax(&probs);
    let threshold = min_p * probs[top];
    for (i, l) in logits.iter_mut().enumerate() {
        if i != top && probs[i] < threshold {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Softmax in f32 with the max subtracted; `-∞` logits get probability 0.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// The index of the largest value, the lowest one on a tie (what `Tensor::argmax` returns);
/// NaNs are passed over, and a row of nothing else gives 0. Two passes, the maximum over 16
/// lanes and then its first position, since a single pass that tracks the index does not
/// vectorize: greedy decoding takes it over a [batch, 49152] row each step.
pub fn argmax(values: &[f32]) -> usize {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = m.max(v);
        }
    }
    let max = lanes.iter().chain(rest).fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    values.iter().position(|&v| v == max).unwrap_or(0)
}

/// The processors and the seeded random numbers of one generation.
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Result<Self> {
        config.validate()?;
        let rng = StdRng::seed_from_u64(config.seed);
        Ok(Self { config, rng })
    }

    /// The next token for one row of logits; `seen` is the prompt and the tokens generated so far.
    pub fn next_token(&mut self, logits: &[f32], seen: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::msg("sampling: empty logits row"));
        }
        let c = &self.config;
        let mut row = logits.to_vec();
        apply_repetition_penalty(&mut row, seen, c.repetition_penalty);
        if c.is_greedy() {
            return Ok(argmax(&row) as u32);
        }
        apply_temperature(&mut row, c.temperature);
        apply_top_k(&mut row, c.top_k);
        apply_top_p(&mut row, c.top_p);
        apply_min_p(&mut row, c.min_p);
        let probs = softmax(&row);
        if !probs.iter().all(|p| p.is_finite()) {
            return Err(Error::msg("sampling: the logits are not finite (NaN or +∞ in the model's output)"));
        }
        Ok(draw(&probs, self.rng.random::<f32>()) as u32)
    }
}

/// The token whose cumulative-probability interval holds `u · Σp` (`u` in [0, 1)); a token of
/// probability 0 is never drawn.
pub fn draw(probs: &[f32], u: f32) -> usize {
    let total: f32 = probs.iter().sum();
    let target = u * total;
    let mut cumulative = 0f32;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            cumulative += p;
            last = i;
            if target < cumulative {
                return i;
            }
        }
    }
    // Rounding can leave `target` a hair past the sum: the last possible token.
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEG: f32 = f32::NEG_INFINITY;

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_once() {
        let mut l = vec![2.0, -1.0, 0.5, 3.0, 0.0];
        apply_repetition_penalty(&mut l, &[0, 1, 0, 4, 99], 2.0);
        assert_eq!(l, vec![1.0, -2.0, 0.5, 3.0, 0.0]);
        let mut same = vec![2.0, -1.0];
        apply_repetition_penalty(&mut same, &[0, 1], 1.0);
        assert_eq!(same, vec![2.0, -1.0]);
    }

    #[test]
    fn temperature_divides() {
        let mut l = vec![1.0, -2.0, 0.5];
        apply_temperature(&mut l, 0.5);
        assert_eq!(l, vec![2.0, -4.0, 1.0]);
    }

    #[test]
    fn top_k_keeps_the_k_largest_and_their_ties() {
        let mut l = vec![1.0, 4.0, 3.0, 2.0, 3.0];
        apply_top_k(&mut l, 2);
        assert_eq!(l, vec![NEG, 4.0, 3.0, NEG, 3.0]);
        let mut all = vec![1.0, 2.0];
        apply_top_k(&mut all, 5);
        assert_eq!(all, vec![1.0, 2.0]);
    }

    #[test]
    fn top_p_keeps_the_smallest_set_that_reaches_p() {
        // Probabilities 0.5, 0.25, 0.125, 0.125 (logits ln p).
        let p = [0.5f32, 0.25, 0.125, 0.125];
        let logits: Vec<f32> = p.iter().map(|x| x.ln()).collect();
        // top_p 0.7: ascending cumsum .125, .25, .5, 1; removed where ≤ 0.3: both 0.125 tokens.
        let mut l = logits.clone();
        apply_top_p(&mut l, 0.7);
        assert_eq!((l[0], l[1], l[2], l[3]), (logits[0], logits[1], NEG, NEG));
        // top_p 0.8: removed where cumsum ≤ 0.2: one of the two 0.125 tokens (of equal logits the
        // higher id counts as less likely).
        let mut l = logits.clone();
        apply_top_p(&mut l, 0.8);
        assert_eq!((l[2], l[3]), (logits[2], NEG));
        // A tiny top_p keeps the most likely token only.
        let mut l = logits.clone();
        apply_top_p(&mut l, 0.01);
        assert_eq!(l.iter().filter(|x| x.is_finite()).count(), 1);
        assert!(l[0].is_finite());
    }

    #[test]
    fn min_p_scales_with_the_most_likely_token() {
        let p = [0.5f32, 0.3, 0.15, 0.05];
        let logits: Vec<f32> = p.iter().map(|x| x.ln()).collect();
        // min_p 0.2: threshold 0.1, so 0.05 goes.
        let mut l = logits.clone();
        apply_min_p(&mut l, 0.2);
        assert_eq!(l.iter().map(|x| x.is_finite()).collect::<Vec<_>>(), vec![true, true, true, false]);
        // min_p 1: only the top token.
        let mut l = logits.clone();
        apply_min_p(&mut l, 1.0);
        assert_eq!(l.iter().map(|x| x.is_finite()).collect::<Vec<_>>(), vec![true, false, false, false]);
    }

    #[test]
    fn draw_inverts_the_cumulative_distribution() {
        let p = [0.25, 0.0, 0.5, 0.25];
        assert_eq!(draw(&p, 0.0), 0);
        assert_eq!(draw(&p, 0.2499), 0);
        assert_eq!(draw(&p, 0.25), 2);
        assert_eq!(draw(&p, 0.74), 2);
        assert_eq!(draw(&p, 0.76), 3);
        assert_eq!(draw(&p, 0.999_999_9), 3);
        assert_eq!(draw(&[0.5, 0.5, 0.0], 1.0), 1, "rounding past the sum never picks a zero");
    }

    #[test]
    fn the_processors_run_in_transformers_order() {
        // Penalty before temperature: token 0 (seen) 4 → 2, then /0.5 → 4; tokens 1, 2: 6, 2.
        // top-k 2 keeps 4 and 6: softmax 1/(1+e²), e²/(1+e²).
        let mut s = Sampler::new(SamplingConfig { temperature: 0.5, top_k: 2, repetition_penalty: 2.0, ..Default::default() })
            .unwrap();
        let mut counts = [0usize; 3];
        for _ in 0..4000 {
            counts[s.next_token(&[4.0, 3.0, 1.0], &[0]).unwrap() as usize] += 1;
        }
        assert_eq!(counts[2], 0, "top-k removed token 2");
        let p0 = counts[0] as f64 / 4000.0;
        let want = 1.0 / (1.0 + 2f64.exp());
        assert!((p0 - want).abs() < 0.02, "token 0 drawn {p0}, want {want}");
    }

    /// The two-pass arg-max equals candle's on rows of every length around the 16 lanes, with
    /// ties (values on a coarse grid) and the maximum anywhere; NaNs are passed over.
    #[test]
    fn argmax_is_candles() {
        use rand::{Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(11);
        for len in [1usize, 2, 15, 16, 17, 31, 33, 100, 49152] {
            for _ in 0..20 {
                let row: Vec<f32> = (0..len).map(|_| rng.random_range(-8i32..8) as f32 * 0.5).collect();
                let t = candle_core::Tensor::from_slice(&row, len, &candle_core::Device::Cpu).unwrap();
                let want = t.argmax(0).unwrap().to_scalar::<u32>().unwrap() as usize;
                assert_eq!(argmax(&row), want, "length {len}");
            }
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, 3.0, f32::NAN, 3.0]), 2);
        assert_eq!(argmax(&[f32::NAN; 3]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }

    #[test]
    fn greedy_settings_take_the_argmax_after_the_penalty() {
        for cfg in [SamplingConfig::greedy(), SamplingConfig { top_k: 1, temperature: 3.0, ..Default::default() }] {
            let mut s = Sampler::new(SamplingConfig { repetition_penalty: 4.0, ..cfg }).unwrap();
            assert_eq!(s.next_token(&[1.0, 3.0, 2.0, 3.0], &[]).unwrap(), 1, "lowest id on a tie");
            assert_eq!(s.next_token(&[1.0, 3.0, 2.0, 3.0], &[1, 3]).unwrap(), 2);
        }
    }

    #[test]
    fn bad_settings_and_rows_are_errors() {
        for bad in [
            SamplingConfig { temperature: -1.0, ..Default::default() },
            SamplingConfig { temperature: f32::NAN, ..Default::default() },
            SamplingConfig { top_p: 0.0, ..Default::default() },
            SamplingConfig { min_p: 1.5, ..Default::default() },
            SamplingConfig { repetition_penalty: 0.0, ..Default::default() },
        ] {
            assert!(Sampler::new(bad).is_err());
        }
        let mut s = Sampler::new(SamplingConfig::default()).unwrap();
        assert!(s.next_token(&[], &[]).is_err());
        assert!(s.next_token(&[1.0, f32::NAN], &[]).is_err());
    }
}

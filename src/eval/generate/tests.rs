//! Generation tests on a tiny random model (vocabulary 12, so that exhaustive search over short
//! horizons is cheap) and on hand-made log-probabilities for the beam-search rules.

use candle_core::{DType, Device, Tensor, D};

use super::*;

const V: usize = 12;
/// An EOS id outside the vocabulary: no hypothesis ever ends early.
const NO_EOS: u32 = 1000;

fn model(seed: u64) -> Llama {
    Llama::random(LlamaConfig::tiny(V), seed, DType::F32, &Device::Cpu).unwrap()
}

fn config(max_new_tokens: usize, num_beams: usize, eos: u32) -> GenerationConfig {
    GenerationConfig { max_new_tokens, num_beams, eos_token_ids: vec![eos], pad_token_id: 0 }
}

fn prompts() -> Vec<Vec<u32>> {
    vec![vec![1, 5, 7], vec![1, 3, 4, 9, 10, 11, 6], vec![1], vec![1, 8, 8, 2, 4]]
}

/// Log-probs [b, t, vocab] of whole sequences (equal lengths), without a cache.
fn full_log_probs(model: &Llama, seqs: &[Vec<u32>]) -> Vec<Vec<Vec<f32>>> {
    let t = seqs[0].len();
    let ids: Vec<u32> = seqs.concat();
    let input = Tensor::from_vec(ids, (seqs.len(), t), &Device::Cpu).unwrap();
    let logits = model.forward(&input, None, None, false).unwrap();
    candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap().to_vec3().unwrap()
}

/// Greedy decoding by recomputing the whole sequence at each step (no cache, no batch).
fn reference_greedy(model: &Llama, prompt: &[u32], cfg: &GenerationConfig) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..cfg.max_new_tokens {
        let lp = full_log_probs(model, std::slice::from_ref(&seq)).remove(0);
        let last = lp.last().unwrap();
        let mut best = 0;
        for (i, &v) in last.iter().enumerate() {
            if v > last[best] {
                best = i;
            }
        }
        out.push(best as u32);
        seq.push(best as u32);
        if cfg.is_eos(best as u32) {
            break;
        }
    }
    out
}

#[test]
fn kv_cache_logits_match_the_full_forward() {
    kv_cache_logits_match_the_full_forward_in(DType::F32);
}

/// A cache kept in half precision: the full forward rounds its keys and values alike, so the
/// two still agree; against the f32 cache the logits move by the rounding only.
#[test]
fn a_half_precision_kv_cache_matches_the_full_forward_and_stays_near_f32() {
    for kv in [DType::F16, DType::BF16] {
        kv_cache_logits_match_the_full_forward_in(kv);
        let mut half = model(1);
        half.set_kv_dtype(kv);
        let seqs = vec![vec![1, 5, 7, 3, 9, 2, 11, 4]];
        let (a, b) = (full_log_probs(&model(1), &seqs), full_log_probs(&half, &seqs));
        let diff = a[0].iter().flatten().zip(b[0].iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let bound = if kv == DType::F16 { 2e-3 } else { 2e-2 };
        assert!(diff > 0.0 && diff < bound, "{kv:?}: max |log-prob diff| {diff}");
    }
}

fn kv_cache_logits_match_the_full_forward_in(kv: DType) {
    let mut m = model(1);
    m.set_kv_dtype(kv);
    let prompts = vec![vec![1, 5, 7, 3, 9], vec![1, 4, 6]];
    let continuation = [[2u32, 11, 4, 6], [10, 3, 3, 8]];
    // Room for none of the new positions (the buffers grow as they come), some, and all.
    for room in [0, 2, 64] {
        kv_cache_logits_match_with_room(&m, kv, room, &prompts, &continuation);
    }
}

fn kv_cache_logits_match_with_room(m: &Llama, kv: DType, room: usize, prompts: &[Vec<u32>], continuation: &[[u32; 4]; 2]) {
    let mut cache = KvCache::new();
    let mut logits = prefill(m, prompts, 0, &mut cache, room).unwrap();
    for step in 0..=continuation[0].len() {
        let got = logits.to_vec2::<f32>().unwrap();
        for (row, prompt) in prompts.iter().enumerate() {
            let seq: Vec<u32> = prompt.iter().chain(&continuation[row][..step]).copied().collect();
            let input = Tensor::new(seq.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let full = m.forward(&input, None, None, false).unwrap();
            let want = full.squeeze(0).unwrap().to_vec2::<f32>().unwrap().pop().unwrap();
            let diff = got[row].iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "{kv:?} cache with room for {room}, row {row}, step {step}: max |diff| {diff}");
        }
        if step < continuation[0].len() {
            logits = decode_step(m, &[continuation[0][step], continuation[1][step]], &mut cache).unwrap();
        }
    }
}

#[test]
fn greedy_matches_recomputing_the_sequence() {
    let m = model(2);
    let cfg = config(8, 1, NO_EOS);
    for p in prompts() {
        assert_eq!(greedy(&m, std::slice::from_ref(&p), &cfg).unwrap()[0], reference_greedy(&m, &p, &cfg));
    }
}

/// Sum of log-probs of every continuation of `prompt` of length `len`, by brute force:
/// (continuation, score) for all V^len continuations.
fn exhaustive(m: &Llama, prompt: &[u32], len: usize) -> Vec<(Vec<u32>, f32)> {
    let prefixes: Vec<Vec<u32>> = (0..V.pow(len as u32 - 1))
        .map(|k| (0..len - 1).map(|j| ((k / V.pow((len - 2 - j) as u32)) % V) as u32).collect())
        .collect();
    let seqs: Vec<Vec<u32>> = prefixes.iter().map(|p| prompt.iter().chain(p).copied().collect()).collect();
    let lp = full_log_probs(m, &seqs);
    let n = prompt.len();
    let mut out = Vec::new();
    for (k, prefix) in prefixes.iter().enumerate() {
        let head: f32 = prefix.iter().enumerate().map(|(j, &tok)| lp[k][n - 1 + j][tok as usize]).sum();
        for x in 0..V as u32 {
            let mut tokens = prefix.clone();
            tokens.push(x);
            out.push((tokens, head + lp[k][n + len - 2][x as usize]));
        }
    }
    out
}

#[test]
fn beam_search_keeping_every_prefix_is_the_exhaustive_argmax() {
    let m = model(3);
    let prompts = vec![vec![1, 5, 7], vec![1, 9, 4, 4, 10]];
    let mut greedy_missed = 0;
    for len in [2usize, 3] {
        // V^(len-1) beams keep every prefix alive, so the search is exact.
        let cfg = config(len, V.pow(len as u32 - 1), NO_EOS);
        let got = beam_search(&m, &prompts, &cfg).unwrap();
        for (prompt, tokens) in prompts.iter().zip(&got) {
            let all = exhaustive(&m, prompt, len);
            let best = all.iter().map(|(_, s)| *s).fold(f32::NEG_INFINITY, f32::max);
            let score = all.iter().find(|(t, _)| t == tokens).expect("a full-length continuation").1;
            assert!((score - best).abs() < 1e-4, "len {len}: beam {tokens:?} scores {score}, best {best}");
            let g = greedy(&m, std::slice::from_ref(prompt), &config(len, 1, NO_EOS)).unwrap().remove(0);
            let g_score = all.iter().find(|(t, _)| *t == g).unwrap().1;
            greedy_missed += usize::from(g_score < best - 1e-4);
        }
    }
    // The test has teeth: greedy decoding misses the best continuation in some of these cases.
    assert!(greedy_missed > 0, "greedy found every argmax; pick a harder seed");
}

#[test]
fn one_beam_without_eos_is_greedy() {
    let m = model(4);
    let cfg = config(8, 1, NO_EOS);
    let ps = prompts();
    assert_eq!(beam_search_impl(&m, &ps, &cfg).unwrap(), greedy(&m, &ps, &cfg).unwrap());
}

#[test]
fn batched_generation_equals_one_by_one() {
    let m = model(5);
    let ps = prompts();
    // Make EOS a token that greedy decoding of the first prompt emits at step 3, so that rows
    // finish at different steps.
    let eos = greedy(&m, &ps[..1], &config(8, 1, NO_EOS)).unwrap()[0][3];
    for num_beams in [1, 3] {
        let cfg = config(10, num_beams, eos);
        let batched = generate(&m, &ps, &cfg).unwrap();
        for (p, got) in ps.iter().zip(&batched) {
            assert_eq!(got, &generate(&m, std::slice::from_ref(p), &cfg).unwrap()[0], "num_beams {num_beams}");
            let eos_at = got.iter().position(|&t| t == eos);
            assert!(eos_at.is_none_or(|i| i + 1 == got.len()), "EOS ends the output: {got:?}");
        }
        if num_beams == 1 {
            assert!(batched[0].len() <= 4 && batched[0].last() == Some(&eos), "{:?}", batched[0]);
        }
    }
}

#[test]
fn rejects_empty_prompts_and_allows_zero_tokens() {
    let m = model(6);
    assert!(greedy(&m, &[vec![]], &config(4, 1, NO_EOS)).is_err());
    assert_eq!(beam_search(&m, &[vec![1, 2]], &config(0, 4, NO_EOS)).unwrap(), vec![Vec::<u32>::new()]);
}

/// Run one prompt's beam search on hand-made log-probs; the answer and the number of steps.
fn run_rules(logp_of: impl Fn(&[u32]) -> Vec<f32>, vocab: usize, cfg: &GenerationConfig) -> (Vec<u32>, usize) {
    let mut g = BeamGroup::new(cfg.num_beams);
    for step in 0..cfg.max_new_tokens {
        let logp: Vec<f32> = g.running.iter().flat_map(|h| logp_of(&h.tokens)).collect();
        g.advance(&logp, vocab, step + 1, cfg);
        if !g.open {
            return (g.best(), step + 1);
        }
    }
    (g.best(), cfg.max_new_tokens)
}

fn ln(p: &[f32]) -> Vec<f32> {
    p.iter().map(|x| x.ln()).collect()
}

#[test]
fn finished_scores_are_divided_by_the_new_tokens_eos_included() {
    // Token 0 is EOS. [EOS] scores ln .5 / 1 = -0.693; [1, 1] scores (ln .3 + ln .9) / 2 = -0.654
    // and wins. Unnormalised, [EOS] would win; divided by prompt + new tokens (transformers ≤ 4.2x),
    // with a 10-token prompt, [EOS] would win too (-0.063 against -0.109).
    let logp_of = |prefix: &[u32]| match prefix {
        [] => ln(&[0.5, 0.3, 0.2]),
        [1] => ln(&[0.05, 0.9, 0.05]),
        _ => ln(&[0.1, 0.1, 0.8]),
    };
    let (best, steps) = run_rules(logp_of, 3, &config(2, 2, 0));
    assert_eq!((best, steps), (vec![1, 1], 2));
}

#[test]
fn stops_when_no_running_beam_can_beat_the_full_finished_list() {
    // Step 1: [EOS] finishes (-0.511). Step 2: [1, EOS] finishes ((ln .3 + ln .6) / 2 = -0.857);
    // [2, EOS] ranks third of the four candidates, so it is only a backup and does not finish.
    // The list is full and the best running beam, [1, 1] at (ln .3 + ln .3) / 2 = -1.204, cannot
    // beat -0.857: the search stops after 2 of 5 steps with [EOS], which keeps its EOS.
    let logp_of = |_: &[u32]| ln(&[0.6, 0.3, 0.1]);
    let (best, steps) = run_rules(logp_of, 3, &config(5, 2, 0));
    assert_eq!((best, steps), (vec![0], 2));
}

#[test]
fn only_the_top_num_beams_candidates_can_finish() {
    // Two beams. Step 1: [1] (ln .5) and [2] (ln .3) run; [EOS] (ln .2) is ranked third: a backup.
    // At step 2 the max length finishes the top two candidates only.
    let logp_of = |prefix: &[u32]| match prefix {
        [] => ln(&[0.2, 0.5, 0.3]),
        _ => ln(&[0.1, 0.1, 0.8]),
    };
    let cfg = config(2, 2, 0);
    let mut g = BeamGroup::new(2);
    g.advance(&[logp_of(&[]), logp_of(&[])].concat(), 3, 1, &cfg);
    assert!(g.finished.is_empty(), "{:?}", g.finished);
    assert_eq!(g.running.iter().map(|h| h.tokens.clone()).collect::<Vec<_>>(), vec![vec![1], vec![2]]);
    let (best, _) = run_rules(logp_of, 3, &cfg);
    assert_eq!(best, vec![1, 2]);
}

#[test]
fn top_k_is_stable() {
    assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0, 3.0], 3), vec![1, 2, 4]);
    assert_eq!(top_k(&[1.0, 2.0], 5), vec![1, 0]);
    assert!(top_k(&[1.0], 0).is_empty());
}

/// Decode speed on a model of SmolLM2-135M's shape with random weights (f32, CPU). Run with
/// `cargo test --release --lib bench_decode -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: run in release"]
fn bench_decode_smollm2_shape() {
    let c = LlamaConfig::smollm2_135m();
    let m = Llama::random(c, 0, DType::F32, &Device::Cpu).unwrap();
    let prompt: Vec<u32> = (0..100).map(|i| 1 + (i * 7919) % 49000).collect();
    for (batch, num_beams) in [(1, 1), (8, 1), (1, 4)] {
        let prompts = vec![prompt.clone(); batch];
        let cfg = config(32, num_beams, NO_EOS);
        let start = std::time::Instant::now();
        let mut cache = KvCache::new();
        prefill(&m, &prompts, 0, &mut cache, 0).unwrap();
        let prefill_s = start.elapsed().as_secs_f64();
        let start = std::time::Instant::now();
        let out = generate(&m, &prompts, &cfg).unwrap();
        let total_s = start.elapsed().as_secs_f64();
        let decode_s = total_s - prefill_s;
        let steps = out[0].len() - 1;
        println!(
            "batch {batch}, beams {num_beams}: prefill of {} tokens {prefill_s:.2} s; {} steps in {decode_s:.2} s = \
             {:.1} steps/s, {:.1} tokens/s over the batch",
            prompt.len(),
            steps,
            steps as f64 / decode_s,
            (steps * batch) as f64 / decode_s,
        );
    }
}

/// A prompt longer than `PREFILL_CHUNK` goes in chunks: the last token's logits are those of one
/// forward over the whole prompt, for a lone prompt and for a left-padded batch whose shorter
/// row is all padding in the first chunk.
#[test]
fn chunked_prefill_matches_one_forward() {
    let model = model(3);
    let long: Vec<u32> = (0..PREFILL_CHUNK as u32 * 2 + 37).map(|i| 1 + i * 7 % (V as u32 - 1)).collect();
    let short: Vec<u32> = long[..PREFILL_CHUNK / 2].to_vec();
    let one_forward = |p: &[u32]| -> Vec<f32> {
        let input = Tensor::new(p, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let logits = model.forward(&input, None, None, false).unwrap();
        logits.squeeze(0).unwrap().get(p.len() - 1).unwrap().to_vec1().unwrap()
    };
    let mut cache = KvCache::new();
    let got: Vec<Vec<f32>> = prefill(&model, &[long.clone(), short.clone()], 0, &mut cache, 0).unwrap().to_vec2().unwrap();
    assert_eq!(cache.len(), long.len());
    for (row, p) in got.iter().zip([&long, &short]) {
        let want = one_forward(p);
        let diff = row.iter().zip(&want).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
        assert!(diff < 1e-4, "prompt of {} tokens: chunked prefill off by {diff}", p.len());
    }
}

/// In bf16, up to `ops::matmul_bf16::ROWS_MAX` rows of x take the bf16 product that reads W as
/// stored and more rows take candle's GEMM: a 16-token and a 20-token forward give the same
/// logits at the first 16 positions (causal attention), up to bf16's rounding of activations.
#[test]
fn bf16_decoding_products_agree_with_candles_gemm() {
    assert_eq!(crate::ops::matmul_bf16::ROWS_MAX, 16);
    let model = Llama::random(LlamaConfig::tiny(V), 3, DType::BF16, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..20).map(|i| (i * 7 % V) as u32).collect();
    let logits = |n: usize| {
        let input = Tensor::new(&ids[..n], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        model.forward(&input, None, None, false).unwrap().narrow(1, 0, 16).unwrap().to_dtype(DType::F32).unwrap()
    };
    let (few, many) = (logits(16), logits(20));
    let max = |t: &Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let err = max(&(&few - &many).unwrap()) / max(&many);
    assert!(err < 3e-2, "bf16 logits of the two products differ by {err} of their scale");
}

/// Each prompt alone: the logits after its prompt and after each of `next`.
fn logits_alone(m: &Llama, prompt: &[u32], next: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new();
    let mut out = vec![prefill(m, &[prompt.to_vec()], 0, &mut cache, next.len()).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap()];
    for &token in next {
        out.push(decode_step(m, &[token], &mut cache).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

#[test]
fn rows_joined_into_a_running_batch_decode_as_they_do_alone() {
    let m = model(2);
    let prompts = [vec![1u32, 5, 7, 3, 9, 2, 8], vec![1u32, 4], vec![1u32, 6, 6]];
    let next = [[3u32, 9, 4, 11], [7, 7, 2, 5], [10, 1, 3, 3]];
    let want: Vec<Vec<Vec<f32>>> = prompts.iter().zip(&next).map(|(p, n)| logits_alone(&m, p, n)).collect();
    // Row 0 runs two steps alone; row 1 (shorter: padded) joins, then row 2; then row 0 leaves.
    let mut batch = KvCache::new();
    prefill(&m, &[prompts[0].clone()], 0, &mut batch, 4).unwrap();
    let close = |got: &[f32], want: &[f32], what: &str| {
        let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "{what}: max |diff| {diff}");
    };
    for step in 0..2 {
        let got = decode_step(&m, &[next[0][step]], &mut batch).unwrap().to_vec2::<f32>().unwrap();
        close(&got[0], &want[0][step + 1], &format!("row 0 alone, step {step}"));
    }
    for row in [1, 2] {
        let mut joining = KvCache::new();
        prefill(&m, &[prompts[row].clone()], 0, &mut joining, 4).unwrap();
        batch.join(joining).unwrap();
    }
    assert_eq!(batch.rows(), 3);
    let got = decode_step(&m, &[next[0][2], next[1][0], next[2][0]], &mut batch).unwrap().to_vec2::<f32>().unwrap();
    close(&got[0], &want[0][3], "row 0 in the batch");
    close(&got[1], &want[1][1], "row 1 joined");
    close(&got[2], &want[2][1], "row 2 joined");
    batch.select_rows(&[1, 2]).unwrap();
    for step in 1..4 {
        let got = decode_step(&m, &[next[1][step], next[2][step]], &mut batch).unwrap().to_vec2::<f32>().unwrap();
        close(&got[0], &want[1][step + 1], &format!("row 1, step {step}"));
        close(&got[1], &want[2][step + 1], &format!("row 2, step {step}"));
    }
}

#[test]
fn a_join_that_fails_leaves_the_batch_as_it_was() {
    let m = model(2);
    let mut narrow_cfg = LlamaConfig::tiny(V);
    narrow_cfg.num_key_value_heads = 1;
    let other = Llama::random(narrow_cfg, 3, DType::F32, &Device::Cpu).unwrap();
    let (prompt, next) = (vec![1u32, 5, 7, 3], [3u32, 9]);
    let want = logits_alone(&m, &prompt, &next);
    let mut batch = KvCache::new();
    prefill(&m, std::slice::from_ref(&prompt), 0, &mut batch, 4).unwrap();
    let mut foreign = KvCache::new();
    prefill(&other, &[vec![1u32, 2]], 0, &mut foreign, 4).unwrap();
    assert!(batch.join(foreign).is_err(), "keys of another width cannot join");
    assert_eq!(batch.rows(), 1);
    for (step, &token) in next.iter().enumerate() {
        let got = decode_step(&m, &[token], &mut batch).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, want[step + 1], "step {step}");
    }
}

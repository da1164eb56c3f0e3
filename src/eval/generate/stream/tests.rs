//! Sampled and streamed generation on a tiny random model (vocabulary 12) with a made-up
//! decoder, and the incremental decoding on hand-made byte pieces.

use candle_core::{DType, Device};

use super::*;
use crate::eval::generate::greedy;
use crate::model::LlamaConfig;

const V: usize = 12;
const NO_EOS: u32 = 1000;

fn model(seed: u64) -> Llama {
    Llama::random(LlamaConfig::tiny(V), seed, DType::F32, &Device::Cpu).unwrap()
}

fn sampled(m: &Llama, prompt: &[u32], n: usize, eos: u32, sampling: SamplingConfig) -> Vec<u32> {
    sample_tokens(m, prompt, n, &[eos], &sampling, |_| Ok(true)).unwrap()
}

/// Token i is the letter `a` + i.
fn letters(ids: &[u32]) -> Result<String> {
    Ok(ids.iter().map(|&i| char::from(b'a' + i as u8)).collect())
}

#[test]
fn top_k_1_and_temperature_0_are_greedy() {
    let m = model(11);
    let prompt = [1, 5, 7, 2];
    let want = greedy(&m, &[prompt.to_vec()], &GenerationConfig { max_new_tokens: 12, num_beams: 1, eos_token_ids: vec![NO_EOS], pad_token_id: 0 })
        .unwrap()
        .remove(0);
    for cfg in [SamplingConfig { top_k: 1, temperature: 5.0, seed: 3, ..Default::default() }, SamplingConfig::greedy()] {
        assert_eq!(sampled(&m, &prompt, 12, NO_EOS, cfg), want);
    }
}

#[test]
fn the_same_seed_gives_the_same_tokens_and_other_seeds_differ() {
    let m = model(12);
    let prompt = [1, 4, 9];
    let at = |seed| sampled(&m, &prompt, 16, NO_EOS, SamplingConfig { seed, temperature: 1.5, ..Default::default() });
    let first = at(7);
    assert_eq!(first.len(), 16);
    assert_eq!(at(7), first);
    let differing = (8..12).filter(|&s| at(s) != first).count();
    assert!(differing >= 3, "only {differing} of 4 other seeds changed the tokens");
    // Sampling, not greedy: the draw is not always the arg-max.
    assert_ne!(first, sampled(&m, &prompt, 16, NO_EOS, SamplingConfig::greedy()));
}

#[test]
fn eos_ends_the_answer_and_is_not_in_its_text() {
    let m = model(13);
    let prompt = [1, 3, 3];
    let sampling = SamplingConfig { seed: 5, ..Default::default() };
    let free = sampled(&m, &prompt, 16, NO_EOS, sampling.clone());
    let eos = free[4];
    let first = free.iter().position(|&t| t == eos).unwrap();
    let cfg = TextGenerationConfig { max_new_tokens: 16, eos_token_ids: vec![eos], stop_strings: vec![], sampling };
    let mut streamed = String::new();
    let got = generate_text(&m, letters, &prompt, &cfg, |s| {
        streamed.push_str(s);
        Ok(())
    }).unwrap();
    assert_eq!(got.tokens, free[..=first]);
    assert_eq!(got.stop, StopReason::Eos);
    assert_eq!(got.text, letters(&free[..first]).unwrap());
    assert_eq!(streamed, got.text);
}

#[test]
fn a_stop_string_ends_the_answer_and_is_cut() {
    let m = model(14);
    let prompt = [1, 2, 6];
    let sampling = SamplingConfig { seed: 9, ..Default::default() };
    let free = letters(&sampled(&m, &prompt, 20, NO_EOS, sampling.clone())).unwrap();
    let stop = free[6..8].to_string();
    let at = free.find(&stop).unwrap();
    let cfg = TextGenerationConfig { max_new_tokens: 20, eos_token_ids: vec![NO_EOS], stop_strings: vec!["zz".into(), stop.clone()], sampling };
    let mut pieces = Vec::new();
    let got = generate_text(&m, letters, &prompt, &cfg, |s| {
        pieces.push(s.to_string());
        Ok(())
    }).unwrap();
    assert_eq!(got.stop, StopReason::StopString);
    assert_eq!(got.text, free[..at], "stop {stop:?} in {free:?}");
    assert_eq!(got.tokens.len(), at + stop.len(), "generation ends at the token that completes the stop string");
    assert_eq!(pieces.concat(), got.text);
    // Without it the text runs to max_new_tokens.
    let cfg = TextGenerationConfig { stop_strings: vec![], ..cfg };
    let all = generate_text(&m, letters, &prompt, &cfg, |_| Ok(())).unwrap();
    assert_eq!((all.text.as_str(), all.stop), (free.as_str(), StopReason::MaxNewTokens));
}

/// A byte-level decoder: token i is `PIECES[i]`, the text is the bytes read as UTF-8 with
/// U+FFFD for what is not (yet) a whole character, as byte-level BPE decoders do.
fn bytes_decoder(ids: &[u32]) -> Result<String> {
    const PIECES: [&[u8]; 5] = [b"a", &[0xE7, 0x8C], &[0xAB], b"X", b"Z"];
    let bytes: Vec<u8> = ids.iter().flat_map(|&i| PIECES[i as usize].iter().copied()).collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[test]
fn split_characters_and_stop_string_prefixes_are_held_back() {
    let mut s = TextStream::new(bytes_decoder, vec!["XY".into()]);
    let steps: Vec<(String, bool)> = [0, 1, 2, 3, 4, 3].into_iter().map(|t| s.push(t).unwrap()).collect();
    let shown: Vec<&str> = steps.iter().map(|(p, _)| p.as_str()).collect();
    // "a"; half of 猫 (held); 猫 whole; "X" may start "XY" (held); "XZ" cannot; "X" held again.
    assert_eq!(shown, ["a", "", "猫", "", "XZ", ""]);
    assert!(steps.iter().all(|(_, hit)| !hit));
    // At the end, held-back text is final.
    assert_eq!(s.finish(), ("X".to_string(), "a猫XZX".to_string()));

    let mut s = TextStream::new(bytes_decoder, vec!["猫X".into()]);
    assert_eq!(s.push(0).unwrap(), ("a".to_string(), false));
    assert_eq!(s.push(1).unwrap(), (String::new(), false));
    assert_eq!(s.push(2).unwrap(), (String::new(), false), "猫 may begin the stop string");
    assert_eq!(s.push(3).unwrap(), (String::new(), true));
    assert_eq!(s.finish(), (String::new(), "a".to_string()));
}

#[test]
fn empty_prompts_and_prompts_past_the_context_are_errors() {
    let m = model(15);
    let sampling = SamplingConfig::default();
    let err = sample_tokens(&m, &[], 4, &[NO_EOS], &sampling, |_| Ok(true)).unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");
    let context = m.config.max_position_embeddings;
    let long = vec![1u32; context + 3];
    let err = sample_tokens(&m, &long, 4, &[NO_EOS], &sampling, |_| Ok(true)).unwrap_err().to_string();
    assert!(err.contains(&format!("{} tokens", context + 3)) && err.contains(&format!("context of {context}")), "{err}");
    // Within the context alone, but not with the new tokens.
    let err = sample_tokens(&m, &vec![1u32; context - 2], 4, &[NO_EOS], &sampling, |_| Ok(true)).unwrap_err().to_string();
    assert!(err.contains("4 new tokens"), "{err}");
    let bad = SamplingConfig { top_p: 2.0, ..Default::default() };
    assert!(sample_tokens(&m, &[1], 4, &[NO_EOS], &bad, |_| Ok(true)).unwrap_err().to_string().contains("--top-p"));
}

//! Tokenize a training example the way LLM-Adapters' `finetune.py` does.
//!
//! Source: `docs/METHODS.md` §0.3 (`tokenize` and `generate_and_tokenize_prompt`):
//! encode the full training prompt with the tokenizer's special tokens (BOS), truncate to
//! `cutoff_len`, append EOS when the last token is not EOS and there is room, and copy the ids
//! into the labels (`train_on_inputs=True`, the default the recipe uses). With
//! `train_on_inputs=False` the tokens of the prompt without its answer are masked with -100.

use tokenizers::Tokenizer;

use super::dataset::Example;
use super::prompt::{train_prompt, train_prompt_prefix};
use crate::error::{Error, Result};

/// The label value the loss ignores (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizeOptions {
    /// `cutoff_len`: the most tokens an example keeps, BOS and EOS included.
    pub cutoff_len: usize,
    /// Compute the loss on the prompt too (LLM-Adapters' default and the recipe's choice).
    pub train_on_inputs: bool,
    /// Append EOS after the answer (`add_eos_token`).
    pub add_eos: bool,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        Self {
            cutoff_len: 256,
            train_on_inputs: true,
            add_eos: true,
        }
    }
}

/// One tokenized training example; `labels` has the length of `input_ids`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

/// Tokenize `example` for training. `bos` is prepended when the tokenizer's post-processor did
/// not already put it first; `eos` is the id appended after the answer.
pub fn tokenize_example(
    tokenizer: &Tokenizer,
    example: &Example,
    bos: Option<u32>,
    eos: u32,
    opts: &TokenizeOptions,
) -> Result<Tokenized> {
    let full = train_prompt(&example.instruction, &example.input, &example.output);
    let input_ids = encode(tokenizer, &full, bos, Some(eos), opts)?;
    let mut labels: Vec<i64> = input_ids.iter().map(|&id| id as i64).collect();
    if !opts.train_on_inputs {
        let user = train_prompt_prefix(&example.instruction, &example.input);
        let user_len = encode(tokenizer, &user, bos, None, opts)?
            .len()
            .min(labels.len());
        labels[..user_len].fill(IGNORE_INDEX);
    }
    Ok(Tokenized { input_ids, labels })
}

/// The ids of `text`; `add_special_tokens` runs the tokenizer's post-processor (BOS for LLaMA).
pub fn encode_ids(tokenizer: &Tokenizer, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
    Ok(tokenizer.encode(text, add_special_tokens).map_err(|e| Error::Tokenizer(e.to_string()))?.get_ids().to_vec())
}

/// The text of `ids`, special tokens skipped.
pub fn decode_text(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer.decode(ids, true).map_err(|e| Error::Tokenizer(e.to_string()))
}

/// `tokenize(prompt, add_eos_token)` of finetune.py; `eos: None` means `add_eos_token=False`.
fn encode(
    tokenizer: &Tokenizer,
    text: &str,
    bos: Option<u32>,
    eos: Option<u32>,
    opts: &TokenizeOptions,
) -> Result<Vec<u32>> {
    let mut ids = encode_ids(tokenizer, text, true)?;
    if let Some(bos) = bos {
        if ids.first() != Some(&bos) {
            ids.insert(0, bos);
        }
    }
    ids.truncate(opts.cutoff_len);
    if let Some(eos) = eos.filter(|_| opts.add_eos) {
        if ids.last() != Some(&eos) && ids.len() < opts.cutoff_len {
            ids.push(eos);
        }
    }
    Ok(ids)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A word-level tokenizer over whitespace-separated words: every distinct word of `words`
    /// gets an id from 3 on (0 = <unk>/pad, 1 = <s>, 2 = </s>). With `with_bos`, the
    /// post-processor prepends <s> as LLaMA's does.
    pub(crate) fn word_tokenizer(words: &str, with_bos: bool) -> Tokenizer {
        let mut vocab = serde_json::Map::new();
        for (i, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
            vocab.insert(t.to_string(), (i as u32).into());
        }
        for w in words.split_whitespace() {
            let next = vocab.len() as u32;
            vocab.entry(w.to_string()).or_insert(next.into());
        }
        let post = if with_bos {
            serde_json::json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
            })
        } else {
            serde_json::Value::Null
        };
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "WhitespaceSplit"},
            "post_processor": post,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        serde_json::from_value(json).expect("test tokenizer")
    }

    const HEADER: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request. ### Instruction: ### Response:";

    fn example(instr: &str, out: &str) -> Example {
        Example {
            instruction: instr.into(),
            input: String::new(),
            output: out.into(),
            answer: None,
        }
    }

    fn ids_of(tok: &Tokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, false).unwrap().get_ids().to_vec()
    }

    #[test]
    fn full_prompt_with_bos_eos_and_labels_equal_ids() {
        let tok = word_tokenizer(
            &format!("{HEADER} pick one the correct answer is answer2"),
            true,
        );
        let ex = example("pick one", "the correct answer is answer2");
        let t = tokenize_example(&tok, &ex, Some(1), 2, &TokenizeOptions::default()).unwrap();
        let body = ids_of(&tok, &train_prompt(&ex.instruction, "", &ex.output));
        let expected: Vec<u32> = [vec![1], body, vec![2]].concat();
        assert_eq!(t.input_ids, expected);
        assert_eq!(
            t.labels,
            expected.iter().map(|&x| x as i64).collect::<Vec<_>>()
        );
    }

    #[test]
    fn bos_is_added_when_the_tokenizer_does_not() {
        let tok = word_tokenizer(&format!("{HEADER} q a"), false);
        let t = tokenize_example(
            &tok,
            &example("q", "a"),
            Some(1),
            2,
            &TokenizeOptions::default(),
        )
        .unwrap();
        assert_eq!(t.input_ids[0], 1);
        assert_eq!(t.input_ids.iter().filter(|&&x| x == 1).count(), 1);
        let t = tokenize_example(
            &tok,
            &example("q", "a"),
            None,
            2,
            &TokenizeOptions::default(),
        )
        .unwrap();
        assert_ne!(t.input_ids[0], 1);
        assert_eq!(*t.input_ids.last().unwrap(), 2);
    }

    #[test]
    fn truncation_keeps_cutoff_and_skips_eos() {
        let tok = word_tokenizer(&format!("{HEADER} q a"), true);
        let ex = example("q", "a");
        let full = tokenize_example(&tok, &ex, Some(1), 2, &TokenizeOptions::default()).unwrap();
        let n = full.input_ids.len(); // BOS + words + EOS
                                      // Exactly room for the words: EOS no longer fits (len == cutoff).
        let opts = TokenizeOptions {
            cutoff_len: n - 1,
            ..Default::default()
        };
        let t = tokenize_example(&tok, &ex, Some(1), 2, &opts).unwrap();
        assert_eq!(t.input_ids, full.input_ids[..n - 1]);
        let opts = TokenizeOptions {
            cutoff_len: 5,
            ..Default::default()
        };
        let t = tokenize_example(&tok, &ex, Some(1), 2, &opts).unwrap();
        assert_eq!(t.input_ids, full.input_ids[..5]);
        assert_eq!(t.labels.len(), 5);
    }

    #[test]
    fn train_on_inputs_false_masks_the_prompt() {
        let tok = word_tokenizer(&format!("{HEADER} q the answer"), true);
        let ex = example("q", "the answer");
        let opts = TokenizeOptions {
            train_on_inputs: false,
            ..Default::default()
        };
        let t = tokenize_example(&tok, &ex, Some(1), 2, &opts).unwrap();
        let n = t.input_ids.len();
        // Unmasked: "the", "answer", EOS.
        let tail: Vec<i64> = t.input_ids[n - 3..].iter().map(|&x| x as i64).collect();
        assert_eq!(t.labels[n - 3..], tail);
        assert!(t.labels[..n - 3].iter().all(|&l| l == IGNORE_INDEX));
    }
}

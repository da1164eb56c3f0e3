//! The commonsense evaluation loop: prompt, generate, decode, extract, compare.
//!
//! Source: `docs/METHODS.md` §0.4 (LLM-Adapters `commonsense_evaluate.py`, ParallelControl
//! `llama_evaluation.py`). Each example becomes `eval_prompt(instruction, input)`, tokenized with
//! the tokenizer's special tokens (BOS where its post-processor adds one, as `tokenizer(prompt)`
//! does). The reference decodes the whole sequence, prompt included, with
//! `skip_special_tokens=True`, and keeps the text after the last "### Response:". Here only the
//! new tokens are decoded, then cut after the last "### Response:" they contain (`response_text`):
//! the same text, without relying on the tokenizer to decode the prompt's marker byte for byte
//! (a word-level tokenizer decodes "Response:" as "Response :"). The prediction is the
//! first match of the task's pattern (`extract_answer`), correct iff it equals the gold answer.
//!
//! The reference generates one prompt at a time; here prompts are batched (left-padded), which
//! gives the same tokens (see `generate`), and sorted by length so that a batch pads little.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use super::answer::{extract_answer, response_text, Task};
use super::generate::{generate, GenerationConfig};
use super::report::EvalReport;
use crate::data::tokenize::{decode_text, encode_ids};
use crate::data::{eval_prompt, load_examples, Example};
use crate::error::{Error, Result};
use crate::model::Llama;

/// One evaluated example, for the JSON dump of the predictions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prediction {
    pub instruction: String,
    /// The model's response (decoded, after the last "### Response:", stripped).
    pub output: String,
    /// What `extract_answer` found in `output` ("" when nothing matched).
    pub prediction: String,
    pub answer: String,
    pub correct: bool,
}

/// What `evaluate_dir` reports while it runs.
#[derive(Debug)]
pub enum EvalEvent<'a> {
    /// `done` of the `total` examples of `task` are evaluated.
    Progress { task: Task, done: usize, total: usize },
    /// `task` is finished; `report` includes it.
    TaskDone { task: Task, report: &'a EvalReport, predictions: &'a [Prediction] },
}

/// Evaluate `task` on the first `limit` examples (all when `None`), `batch_size` prompts per
/// `generate` call. `on_progress` gets the number of examples done so far after each batch.
/// Returns (correct, total, the predictions in the order of `examples`).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_task(
    model: &Llama,
    tokenizer: &Tokenizer,
    task: Task,
    examples: &[Example],
    cfg: &GenerationConfig,
    batch_size: usize,
    limit: Option<usize>,
    mut on_progress: impl FnMut(usize),
) -> Result<(usize, usize, Vec<Prediction>)> {
    let examples = &examples[..limit.map_or(examples.len(), |n| n.min(examples.len()))];
    let answers = gold_answers(task, examples)?;
    let prompts: Vec<Vec<u32>> = examples.iter().map(|e| encode_prompt(tokenizer, e)).collect::<Result<_>>()?;
    for (row, prompt) in prompts.iter().enumerate() {
        super::generate::check_context(model, std::slice::from_ref(prompt), cfg)
            .map_err(|e| Error::msg(format!("{task}, record {row}: {e}")))?;
    }
    // Longest first: the largest batch comes first, so a memory problem shows at once.
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
    let mut predictions: Vec<Option<Prediction>> = vec![None; examples.len()];
    let mut done = 0;
    for chunk in order.chunks(batch_size.max(1)) {
        let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let outputs = generate(model, &batch, cfg)?;
        for (&i, new_tokens) in chunk.iter().zip(&outputs) {
            let p = score_output(tokenizer, task, &examples[i], answers[i], new_tokens)?;
            predictions[i] = Some(p);
        }
        done += chunk.len();
        on_progress(done);
    }
    let predictions: Vec<Prediction> = predictions.into_iter().flatten().collect();
    let correct = predictions.iter().filter(|p| p.correct).count();
    Ok((correct, predictions.len(), predictions))
}

/// Evaluate each task on `dataset_dir/<task dir>/test.json` (LLM-Adapters' `dataset/` layout).
/// Every test file is checked before the first generation, so a typo fails at once.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_dir(
    model: &Llama,
    tokenizer: &Tokenizer,
    dataset_dir: &Path,
    tasks: &[Task],
    cfg: &GenerationConfig,
    batch_size: usize,
    limit: Option<usize>,
    mut on_event: impl FnMut(EvalEvent<'_>),
) -> Result<EvalReport> {
    let files: Vec<PathBuf> = tasks.iter().map(|&t| test_file(dataset_dir, t)).collect::<Result<_>>()?;
    let mut report = EvalReport::new();
    for (&task, path) in tasks.iter().zip(&files) {
        let examples = load_examples(path)?;
        let total = limit.map_or(examples.len(), |n| n.min(examples.len()));
        let progress = |done| on_event(EvalEvent::Progress { task, done, total });
        let (correct, n, predictions) =
            evaluate_task(model, tokenizer, task, &examples, cfg, batch_size, limit, progress)?;
        report.add(task, correct, n);
        on_event(EvalEvent::TaskDone { task, report: &report, predictions: &predictions });
    }
    Ok(report)
}

/// `dataset_dir/<task dir>/test.json`, or an error naming it when it is missing.
pub fn test_file(dataset_dir: &Path, task: Task) -> Result<PathBuf> {
    let path = dataset_dir.join(task.dir_name()).join("test.json");
    if !path.is_file() {
        return Err(Error::BadFile {
            path,
            msg: format!("missing test set of task {task} (expected <dataset>/{}/test.json)", task.dir_name()),
        });
    }
    Ok(path)
}

/// The gold answer of every example; an example without one is an error.
fn gold_answers(task: Task, examples: &[Example]) -> Result<Vec<&str>> {
    examples
        .iter()
        .enumerate()
        .map(|(i, e)| {
            e.answer
                .as_deref()
                .ok_or_else(|| Error::msg(format!("{task}: example {i} has no `answer`, which evaluation needs")))
        })
        .collect()
}

/// The evaluation prompt's ids, with the tokenizer's special tokens (BOS).
fn encode_prompt(tokenizer: &Tokenizer, example: &Example) -> Result<Vec<u32>> {
    let text = eval_prompt(&example.instruction, &example.input);
    encode_ids(tokenizer, &text, true)
}

/// Decode the new tokens and score the response.
fn score_output(
    tokenizer: &Tokenizer,
    task: Task,
    example: &Example,
    answer: &str,
    new_tokens: &[u32],
) -> Result<Prediction> {
    let text = decode_text(tokenizer, new_tokens)?;
    let output = response_text(&text).to_string();
    let prediction = extract_answer(task, &output);
    let correct = !prediction.is_empty() && prediction == answer;
    Ok(Prediction { instruction: example.instruction.clone(), output, prediction, answer: answer.to_string(), correct })
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use tokenizers::AddedToken;

    use super::*;
    use crate::data::tokenize::tests::word_tokenizer;
    use crate::model::LlamaConfig;

    const WORDS: &str = "Below is an instruction that describes a task. Write a response appropriately completes \
                         the request. ### Instruction: Response: Input: correct answer true false solution1 solution2 \
                         is it raining sky blue";

    /// The test word tokenizer with <unk>, <s>, </s> marked special (skipped when decoding).
    fn tokenizer() -> Tokenizer {
        let mut tok = word_tokenizer(WORDS, true);
        let specials: Vec<AddedToken> = ["<unk>", "<s>", "</s>"].iter().map(|t| AddedToken::from(*t, true)).collect();
        tok.add_special_tokens(specials).unwrap();
        tok
    }

    fn ids(tok: &Tokenizer, text: &str) -> Vec<u32> {
        tok.encode(text, false).unwrap().get_ids().to_vec()
    }

    fn example(instruction: &str, input: &str, answer: &str) -> Example {
        Example { instruction: instruction.into(), input: input.into(), output: String::new(), answer: Some(answer.into()) }
    }

    fn examples() -> Vec<Example> {
        vec![
            example("is it raining", "", "true"),
            example("is the sky blue", "", "false"),
            example("is it", "sky", "true"),
            example("correct", "", "false"),
            example("is the answer true", "it is", "true"),
        ]
    }

    fn setup() -> (Llama, Tokenizer, GenerationConfig) {
        let tok = tokenizer();
        let vocab = tok.get_vocab_size(true);
        let model = Llama::random(LlamaConfig::tiny(vocab), 7, DType::F32, &Device::Cpu).unwrap();
        let cfg = GenerationConfig { max_new_tokens: 4, num_beams: 2, eos_token_ids: vec![2], pad_token_id: 0 };
        (model, tok, cfg)
    }

    #[test]
    fn the_response_is_decoded_after_the_marker_without_special_tokens() {
        let tok = tokenizer();
        let ex = example("is it raining", "", "true");
        let prompt = encode_prompt(&tok, &ex).unwrap();
        assert_eq!(prompt[0], 1, "BOS from the post-processor");
        let mut new = ids(&tok, "the correct answer is true");
        new.push(2);
        let p = score_output(&tok, Task::BoolQ, &ex, "true", &new).unwrap();
        assert_eq!(p.output, "the correct answer is true");
        assert_eq!((p.prediction.as_str(), p.correct), ("true", true));
        // A second marker in the generated text: only what follows it counts (reference `[-1]`).
        let new = ids(&tok, "true ### Response: false");
        let p = score_output(&tok, Task::BoolQ, &ex, "true", &new).unwrap();
        assert_eq!((p.output.as_str(), p.prediction.as_str(), p.correct), ("false", "false", false));
    }

    #[test]
    fn evaluates_end_to_end_and_batching_does_not_change_predictions() {
        let (model, tok, cfg) = setup();
        let exs = examples();
        let mut progress = Vec::new();
        let (correct, total, preds) =
            evaluate_task(&model, &tok, Task::BoolQ, &exs, &cfg, 2, None, |d| progress.push(d)).unwrap();
        assert_eq!(total, 5);
        assert_eq!(progress, vec![2, 4, 5]);
        assert_eq!(correct, preds.iter().filter(|p| p.correct).count());
        for (p, e) in preds.iter().zip(&exs) {
            assert_eq!((&p.instruction, Some(&p.answer)), (&e.instruction, e.answer.as_ref()));
            assert_eq!(p.prediction, extract_answer(Task::BoolQ, &p.output));
        }
        let (_, _, one_by_one) = evaluate_task(&model, &tok, Task::BoolQ, &exs, &cfg, 1, None, |_| {}).unwrap();
        assert_eq!(one_by_one, preds);
        let (_, total, limited) = evaluate_task(&model, &tok, Task::BoolQ, &exs, &cfg, 8, Some(3), |_| {}).unwrap();
        assert_eq!((total, limited.as_slice()), (3, &preds[..3]));
        let json = serde_json::to_string(&preds).unwrap();
        assert_eq!(serde_json::from_str::<Vec<Prediction>>(&json).unwrap(), preds);
    }

    #[test]
    fn an_example_without_answer_is_an_error() {
        let (model, tok, cfg) = setup();
        let mut exs = examples();
        exs[3].answer = None;
        let err = evaluate_task(&model, &tok, Task::BoolQ, &exs, &cfg, 2, None, |_| {}).unwrap_err().to_string();
        assert!(err.contains("example 3 has no `answer`"), "{err}");
    }

    #[test]
    fn evaluates_a_dataset_directory() {
        let (model, tok, cfg) = setup();
        let dir = tempfile::tempdir().unwrap();
        for (task, exs) in [(Task::BoolQ, examples()), (Task::Piqa, examples()[..2].to_vec())] {
            let sub = dir.path().join(task.dir_name());
            std::fs::create_dir_all(&sub).unwrap();
            std::fs::write(sub.join("test.json"), serde_json::to_string(&exs).unwrap()).unwrap();
        }
        let mut finished = Vec::new();
        let report = evaluate_dir(&model, &tok, dir.path(), &[Task::BoolQ, Task::Piqa], &cfg, 4, None, |e| {
            if let EvalEvent::TaskDone { task, predictions, .. } = e {
                finished.push((task, predictions.len()));
            }
        })
        .unwrap();
        assert_eq!(finished, vec![(Task::BoolQ, 5), (Task::Piqa, 2)]);
        assert_eq!(report.get(Task::BoolQ).unwrap().total, 5);
        assert_eq!(report.get(Task::Piqa).unwrap().total, 2);
        // Piqa's gold answers are "true"/"false", which its pattern never produces.
        assert_eq!(report.get(Task::Piqa).unwrap().correct, 0);

        let err = evaluate_dir(&model, &tok, dir.path(), &[Task::BoolQ, Task::ArcEasy], &cfg, 4, None, |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("ARC-Easy/test.json") && err.contains("missing test set"), "{err}");
    }
}

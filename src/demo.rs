//! The demo: on a fresh machine, with no download, build a small LLaMA-architecture model and a
//! task, then show LoRA learning the task — accuracy before (near chance) and after.
//!
//! The task is a two-choice question in LLM-Adapters' winogrande format: a sentence whose blank
//! takes a colour, with one colour and one animal as options, in random order. The model must
//! learn which words are colours and answer `option1` or `option2`; the test set holds pairs
//! never seen in training, so a right answer is not a memorised pair. Chance is 50%.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::json;

use crate::adapters::{inject, AdapterConfig, LoraConfig, Targets};
use crate::data::dataset::Example;
use crate::data::tokenize::{tokenize_example, TokenizeOptions};
use crate::error::{Error, Result};
use crate::eval::answer::Task;
use crate::eval::evaluate::evaluate_task;
use crate::eval::generate::GenerationConfig;
use crate::model::{Llama, LlamaConfig};
use crate::training::run::{steps_for_epochs, train, RunConfig};
use crate::training::{AdamWConfig, StepConfig};

const COLOURS: [&str; 12] = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white", "gray", "gold"];
const ANIMALS: [&str; 12] = ["cat", "dog", "horse", "cow", "sheep", "goat", "lion", "tiger", "bear", "wolf", "fox", "mouse"];
const SENTENCES: [&str; 3] = ["She painted the old door _ .", "The sky at dusk turned _ .", "He wore a bright _ coat ."];

/// How big the demo is; the test runs a smaller one.
#[derive(Debug, Clone)]
pub struct DemoSize {
    pub config: LlamaConfig,
    pub epochs: f64,
    pub lr: f64,
    pub rank: usize,
    pub test_size: usize,
}

impl Default for DemoSize {
    fn default() -> Self {
        let mut config = LlamaConfig::tiny(0);
        config.hidden_size = 128;
        config.intermediate_size = 352;
        config.head_dim = 32;
        Self { config, epochs: 4.0, lr: 3e-3, rank: 8, test_size: 150 }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoResult {
    pub accuracy_before: f64,
    pub accuracy_after: f64,
    pub train_examples: usize,
    pub test_examples: usize,
    pub train_loss_first: Option<f64>,
    pub train_loss_last: Option<f64>,
    pub seconds: f64,
}

fn example(sentence: &str, colour: &str, animal: &str, colour_first: bool) -> Example {
    let (o1, o2) = if colour_first { (colour, animal) } else { (animal, colour) };
    let answer = if colour_first { "option1" } else { "option2" };
    Example {
        instruction: format!(
            "Please choose the correct answer to fill in the blank to complete the given sentence: {sentence}\n\nOption1: {o1} Option2: {o2} Answer format: option1/option2"
        ),
        input: String::new(),
        output: format!("the correct answer is {answer}"),
        answer: Some(answer.to_string()),
    }
}

/// Every (sentence, colour, animal, order) question, shuffled with `seed`, split into train and
/// test so that no (colour, animal) pair of the test set occurs in training.
pub fn task(seed: u64, test_size: usize) -> (Vec<Example>, Vec<Example>) {
    let mut pairs: Vec<(usize, usize)> = (0..COLOURS.len()).flat_map(|c| (0..ANIMALS.len()).map(move |a| (c, a))).collect();
    let order = crate::data::dataset::seeded_permutation(pairs.len(), seed);
    pairs = order.into_iter().map(|i| pairs[i]).collect();
    let per_pair = SENTENCES.len() * 2;
    let test_pairs = test_size.div_ceil(per_pair);
    let build = |ps: &[(usize, usize)]| -> Vec<Example> {
        let mut out = Vec::new();
        for &(c, a) in ps {
            for s in SENTENCES {
                for first in [true, false] {
                    out.push(example(s, COLOURS[c], ANIMALS[a], first));
                }
            }
        }
        out
    };
    let mut test = build(&pairs[..test_pairs]);
    test.truncate(test_size);
    (build(&pairs[test_pairs..]), test)
}

/// A word-level tokenizer over the words of the prompt templates and the task, with `<s>`
/// prepended as BOS (as LLaMA's tokenizer does).
pub fn tokenizer(examples: &[Example]) -> Result<tokenizers::Tokenizer> {
    let mut words: Vec<String> = ["<unk>", "<s>", "</s>"].iter().map(|s| s.to_string()).collect();
    let mut seen: std::collections::HashSet<String> = words.iter().cloned().collect();
    let template = crate::data::prompt::train_prompt("x", "", "x") + &crate::data::prompt::eval_prompt("x", "");
    let texts = examples.iter().flat_map(|e| [e.instruction.clone(), e.output.clone()]).chain([template]);
    let split = regex::Regex::new(r"\w+|[^\w\s]+").expect("valid regex");
    for text in texts {
        for w in split.find_iter(&text) {
            if seen.insert(w.as_str().to_string()) {
                words.push(w.as_str().to_string());
            }
        }
    }
    let vocab: serde_json::Map<String, serde_json::Value> = words.iter().enumerate().map(|(i, w)| (w.clone(), json!(i))).collect();
    let spec = json!({
        "version": "1.0",
        "added_tokens": [
            {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    crate::loading::parse_tokenizer(&spec.to_string())
}

fn accuracy(model: &Llama, tok: &tokenizers::Tokenizer, test: &[Example]) -> Result<f64> {
    let cfg = GenerationConfig { max_new_tokens: 8, num_beams: 1, eos_token_ids: vec![2], pad_token_id: 0 };
    let (correct, total, _) = evaluate_task(model, tok, Task::WinoGrande, test, &cfg, 32, None, |_| {})?;
    Ok(correct as f64 / total.max(1) as f64)
}

/// `out/run-N` for the first N not taken: each demo run gets a folder of its own, so running the
/// demo again never replaces an earlier run's adapter or results.
fn new_run_dir(out: &Path) -> PathBuf {
    (1..).map(|n| out.join(format!("run-{n}"))).find(|p| !p.exists()).expect("an unused run number")
}

/// Run the demo, writing the adapter and the results under a new `out/run-N`.
pub fn run(out: &Path, seed: u64, size: &DemoSize) -> Result<DemoResult> {
    let start = std::time::Instant::now();
    let out = &new_run_dir(out);
    let (train_examples, test) = task(seed, size.test_size);
    let tok = tokenizer(&[train_examples.clone(), test.clone()].concat())?;
    let mut config = size.config.clone();
    config.vocab_size = tok.get_vocab_size(true);
    let device = Device::Cpu;
    let mut model = Llama::random(config, seed, DType::F32, &device)?;
    println!(
        "demo: a {}-layer LLaMA (hidden {}, {} heads / {} kv heads, vocab {}) with random weights; {} training and {} test questions (chance 50%)",
        model.config.num_hidden_layers,
        model.config.hidden_size,
        model.config.num_attention_heads,
        model.config.num_key_value_heads,
        model.config.vocab_size,
        train_examples.len(),
        test.len()
    );
    let before = accuracy(&model, &tok, &test)?;
    println!("accuracy before fine-tuning: {:.1}% (an answer that names no option counts as wrong)", 100.0 * before);

    let adapter = AdapterConfig::new(LoraConfig {
        r: size.rank,
        lora_alpha: 2.0 * size.rank as f64,
        lora_dropout: 0.0,
        target_modules: Targets::List(crate::model::llama::LINEAR_NAMES.iter().map(|s| s.to_string()).collect()),
        use_rslora: false,
        use_dora: false,
    });
    inject(&mut model, &adapter, seed)?;
    let opts = TokenizeOptions { cutoff_len: 256, train_on_inputs: false, add_eos: true };
    let train_set = train_examples.iter().map(|e| tokenize_example(&tok, e, None, 2, &opts)).collect::<Result<Vec<_>>>()?;
    let batch_size = 16;
    let total_steps = steps_for_epochs(train_set.len(), batch_size, size.epochs);
    let cfg = RunConfig {
        output_dir: out.join("adapter"),
        batch_size,
        micro_batch_size: batch_size,
        steps: StepConfig {
            optim: AdamWConfig { lr: size.lr, ..Default::default() },
            warmup_steps: total_steps / 10,
            total_steps,
            max_grad_norm: Some(1.0),
            gradient_checkpointing: false,
        },
        eval_steps: 0,
        save_steps: 0,
        seed,
        pad_id: 0,
        resume: false,
        base_model: Some("demo-model".into()),
        progress: true,
    };
    println!("fine-tuning LoRA r={} on all 7 projections for {total_steps} steps...", size.rank);
    let summary = train(&model, &adapter, &train_set, &[], &cfg, |_| 1.0)?;
    let after = accuracy(&model, &tok, &test)?;
    println!(
        "train loss {:.3} -> {:.3}, {:.0} tokens/s",
        summary.first_loss.unwrap_or(f64::NAN),
        summary.last_loss.unwrap_or(f64::NAN),
        summary.tokens_per_second
    );
    println!("accuracy after fine-tuning:  {:.1}%", 100.0 * after);
    let result = DemoResult {
        accuracy_before: before,
        accuracy_after: after,
        train_examples: train_set.len(),
        test_examples: test.len(),
        train_loss_first: summary.first_loss,
        train_loss_last: summary.last_loss,
        seconds: start.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_string_pretty(&result).map_err(|e| Error::msg(e.to_string()))?;
    crate::fsutil::write_file_atomic(&out.join("demo_result.json"), json.as_bytes())?;
    println!("done in {:.0} s; adapter and results in {}", result.seconds, out.display());
    Ok(result)
}

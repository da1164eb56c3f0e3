//! `eval` (accuracy on the commonsense test sets), `generate` (one prompt) and `chat` (a
//! conversation on stdin).

use std::io::Write;

use super::commands::{load_with_adapter, require_tokenizer};
use crate::validate;
use super::{ChatArgs, EvalArgs, GenerateArgs, GenerationArgs};
use crate::error::{Error, Result};
use crate::eval::answer::Task;
use crate::eval::chat::session::run_chat;
use crate::eval::chat::{model_chat_template, ChatTemplate, Message};
use crate::eval::evaluate::{evaluate_dir, EvalEvent};
use crate::data::tokenize::{decode_text, encode_ids};
use crate::eval::generate::stream::{generate_text, stop_at, TextGenerationConfig};
use crate::eval::generate::{beam_search, GenerationConfig};
use crate::model::{Llama, LlamaConfig};

fn generation_config(model: &Llama, args: &GenerationArgs) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        num_beams: args.num_beams.max(1),
        eos_token_ids: model.config.eos_token_ids.clone(),
        pad_token_id: model.config.pad_token_id.unwrap_or(0),
    }
}

pub fn eval(args: &EvalArgs) -> Result<()> {
    args.generation.validate()?;
    validate::int_in("batch-size", args.batch_size, 1, 1 << 16)?;
    if let Some(path) = &args.output {
        let files = [path.clone(), path.with_extension("predictions.json"), path.with_extension("png")];
        crate::fsutil::refuse_to_replace(&files, "--output", args.overwrite)?;
    }
    let loaded = load_with_adapter(&args.model, args.adapter.as_deref(), false)?;
    let tokenizer = require_tokenizer(&loaded)?;
    let tasks = if args.tasks.is_empty() {
        Task::ALL.to_vec()
    } else {
        args.tasks.iter().map(|t| Task::from_name(t)).collect::<Result<Vec<_>>>()?
    };
    let cfg = generation_config(&loaded.model, &args.generation);
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]").expect("valid template"));
    let mut predictions = serde_json::Map::new();
    let report = evaluate_dir(&loaded.model, tokenizer, &args.dataset_dir, &tasks, &cfg, args.batch_size, args.limit, |event| match event {
        EvalEvent::Progress { task, done, total } => {
            bar.set_message(task.to_string());
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        EvalEvent::TaskDone { task, report, predictions: preds } => {
            if let Some(score) = report.get(task) {
                bar.println(format!("{task}: {}/{} = {:.1}%", score.correct, score.total, 100.0 * score.accuracy));
            }
            predictions.insert(task.to_string(), serde_json::json!(preds));
        }
    })?;
    bar.finish_and_clear();
    println!("{}", report.table());
    if let Some(path) = &args.output {
        report.save_json(path)?;
        let preds = path.with_extension("predictions.json");
        let text = serde_json::to_string_pretty(&predictions).map_err(|e| Error::msg(e.to_string()))?;
        crate::fsutil::write_file_atomic(&preds, text.as_bytes())?;
        println!("wrote {} and {}", path.display(), preds.display());
        let png = path.with_extension("png");
        let label = path.file_stem().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        match crate::plot::bar_chart(&png, &crate::plot::runs::accuracy_chart(&[(label, report.clone())])) {
            Ok(()) => println!("wrote {}", png.display()),
            Err(e) => eprintln!("warning: no accuracy chart: {e}"),
        }
    }
    Ok(())
}

pub fn generate(args: &GenerateArgs) -> Result<()> {
    args.generation.validate()?;
    let sampling = args.sampling.config()?;
    if args.generation.num_beams > 1 && args.sampling.is_set() {
        return Err(Error::msg(
            "--num-beams above 1 is beam search, which does not sample: drop --temperature, --top-k, --top-p, --min-p \
             and --repetition-penalty, or use --num-beams 1",
        ));
    }
    if args.prompt.is_empty() {
        return Err(Error::msg("--prompt is empty: give the text to continue"));
    }
    if args.system.is_some() && !args.chat {
        return Err(Error::msg("--system needs --chat (it is a message of the chat template)"));
    }
    args.adapter_dtype.dtype()?;
    let mut loaded = load_with_adapter(&args.model, args.adapter.as_deref(), true)?;
    args.adapter_dtype.apply(&mut loaded.model)?;
    let tokenizer = require_tokenizer(&loaded)?;
    let (ids, eos) = if args.chat {
        let template = chat_template(&args.model.model, &loaded.model.config, tokenizer)?;
        let messages: Vec<Message> =
            args.system.iter().map(|s| Message::new("system", s)).chain([Message::new("user", &args.prompt)]).collect();
        let text = template.render(&messages, true)?;
        // The template writes the special tokens (apply_chat_template tokenizes with add_special_tokens=False).
        (encode_ids(tokenizer, &text, false)?, chat_eos(&loaded.model.config, tokenizer, &template))
    } else {
        (encode_ids(tokenizer, &args.prompt, true)?, loaded.model.config.eos_token_ids.clone())
    };
    let cfg = GenerationConfig { eos_token_ids: eos, ..generation_config(&loaded.model, &args.generation) };
    crate::eval::generate::check_context(&loaded.model, std::slice::from_ref(&ids), &cfg)
        .map_err(|e| Error::msg(format!("--prompt / --max-new-tokens: {e}")))?;
    let decode = |ids: &[u32]| decode_text(tokenizer, ids);
    let start = std::time::Instant::now();
    let new = if cfg.num_beams > 1 {
        // Beam search knows its answer only at the end: printed whole, cut at a stop string.
        let new = beam_search(&loaded.model, &[ids], &cfg)?.remove(0);
        let mut text = decode(&new)?;
        if let Some(at) = stop_at(&text, &args.sampling.stop) {
            text.truncate(at);
        }
        println!("{text}");
        new
    } else {
        let text_cfg = TextGenerationConfig {
            max_new_tokens: cfg.max_new_tokens,
            eos_token_ids: cfg.eos_token_ids.clone(),
            stop_strings: args.sampling.stop.clone(),
            sampling,
        };
        let mut stdout = std::io::stdout();
        let answer = generate_text(&loaded.model, decode, &ids, &text_cfg, |piece| {
            write!(stdout, "{piece}").and_then(|()| stdout.flush()).map_err(|e| Error::msg(format!("stdout: {e}")))
        })?;
        println!();
        answer.tokens
    };
    let seconds = start.elapsed().as_secs_f64();
    eprintln!("{} tokens in {seconds:.2} s ({:.1} tokens/s)", new.len(), new.len() as f64 / seconds.max(1e-9));
    Ok(())
}

/// `chat`: a conversation on stdin and stdout.
pub fn chat(args: &ChatArgs) -> Result<()> {
    validate::int_in("max-new-tokens", args.max_new_tokens, 1, 1 << 20)?;
    let sampling = args.sampling.config()?;
    args.adapter_dtype.dtype()?;
    let mut loaded = load_with_adapter(&args.model, args.adapter.as_deref(), true)?;
    args.adapter_dtype.apply(&mut loaded.model)?;
    let tokenizer = require_tokenizer(&loaded)?;
    let template = chat_template(&args.model.model, &loaded.model.config, tokenizer)?;
    let eos = chat_eos(&loaded.model.config, tokenizer, &template);
    let cfg = TextGenerationConfig { max_new_tokens: args.max_new_tokens, eos_token_ids: eos, stop_strings: args.sampling.stop.clone(), sampling };
    eprintln!("{}: type a message and Enter; end with Ctrl-D (EOF)", loaded.source);
    let stdin = std::io::stdin();
    run_chat(&loaded.model, tokenizer, &template, args.system.as_deref(), &cfg, &mut stdin.lock(), &mut std::io::stdout(), &mut std::io::stderr())?;
    Ok(())
}

/// The model's EOS ids and the chat template's end-of-turn token: a chat answer ends at either.
pub(super) fn chat_eos(config: &LlamaConfig, tokenizer: &tokenizers::Tokenizer, template: &ChatTemplate) -> Vec<u32> {
    let mut eos = config.eos_token_ids.clone();
    eos.extend(tokenizer.token_to_id(&template.eos_token).filter(|id| !eos.contains(id)));
    eos
}

/// The model's own chat template, or ChatML (said on stderr) when it has none.
pub(super) fn chat_template(spec: &str, config: &LlamaConfig, tokenizer: &tokenizers::Tokenizer) -> Result<ChatTemplate> {
    let text = |id: u32| tokenizer.id_to_token(id);
    let found = model_chat_template(spec, config.bos_token_id, config.eos_token_ids.first().copied(), text)?;
    Ok(found.unwrap_or_else(|| {
        eprintln!("{spec}: the model has no chat template (tokenizer_config.json, chat_template.jinja or GGUF metadata); using ChatML");
        let token = |id: Option<u32>| id.and_then(text).unwrap_or_default();
        ChatTemplate::chatml(&token(config.bos_token_id), &token(config.eos_token_ids.first().copied()))
    }))
}

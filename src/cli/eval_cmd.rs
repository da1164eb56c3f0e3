//! `eval` (accuracy on the commonsense test sets) and `generate` (one prompt).

use super::commands::{load_with_adapter, require_tokenizer};
use super::{EvalArgs, GenerateArgs, GenerationArgs};
use crate::error::{Error, Result};
use crate::eval::answer::Task;
use crate::eval::evaluate::{evaluate_dir, EvalEvent};
use crate::eval::generate::{beam_search, greedy, GenerationConfig};
use crate::model::Llama;

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
    super::validate::int_in("batch-size", args.batch_size, 1, 1 << 16)?;
    if let Some(path) = &args.output {
        let files = [path.clone(), path.with_extension("predictions.json"), path.with_extension("png")];
        crate::fsutil::refuse_to_replace(&files, "--output", args.overwrite)?;
    }
    let loaded = load_with_adapter(&args.model, args.adapter.as_deref())?;
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
    let loaded = load_with_adapter(&args.model, args.adapter.as_deref())?;
    let tokenizer = require_tokenizer(&loaded)?;
    let text = if args.chat {
        format!("<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", args.prompt)
    } else {
        args.prompt.clone()
    };
    let ids = tokenizer.encode(text, true).map_err(|e| Error::Tokenizer(e.to_string()))?.get_ids().to_vec();
    let cfg = generation_config(&loaded.model, &args.generation);
    crate::eval::generate::check_context(&loaded.model, std::slice::from_ref(&ids), &cfg)
        .map_err(|e| Error::msg(format!("--prompt / --max-new-tokens: {e}")))?;
    let start = std::time::Instant::now();
    let out = if cfg.num_beams > 1 { beam_search(&loaded.model, &[ids], &cfg)? } else { greedy(&loaded.model, &[ids], &cfg)? };
    let seconds = start.elapsed().as_secs_f64();
    let new = &out[0];
    println!("{}", tokenizer.decode(new, true).map_err(|e| Error::Tokenizer(e.to_string()))?);
    eprintln!("{} tokens in {seconds:.2} s ({:.1} tokens/s)", new.len(), new.len() as f64 / seconds.max(1e-9));
    Ok(())
}

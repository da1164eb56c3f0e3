//! What each subcommand does, on top of the library.

use std::path::Path;

use super::{Command, DataCommand, FinetuneArgs, MergeArgs, ModelArgs};
use crate::adapters::{inject, load_adapter};
use crate::data::dataset::{load_examples, train_val_split};
use crate::data::tokenize::{tokenize_example, TokenizeOptions, Tokenized};
use crate::error::{Error, Result};
use crate::hub::ModelSource;
use crate::loading::{load_model_with, LoadedModel};
use crate::training::run::{steps_for_epochs, train, RunConfig};
use crate::training::{AdamWConfig, StepConfig};

/// Run `command` on a worker of the thread pool: candle's CPU ops and the packed products are
/// parallel loops, which from a pool worker split directly, where from the main thread each is
/// a scheduler round trip (`threads::in_thread_pool`; measured: decode 1.3x, a training step
/// 1.1x).
pub fn run(command: Command) -> Result<()> {
    crate::threads::in_thread_pool(|| dispatch(command))
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Finetune(args) => finetune(&args),
        Command::Eval(args) => super::eval_cmd::eval(&args),
        Command::Generate(args) => super::eval_cmd::generate(&args),
        Command::Chat(args) => super::eval_cmd::chat(&args),
        Command::Serve(args) => super::serve_cmd::serve(&args),
        Command::Merge(args) => merge(&args),
        Command::Convert(args) => {
            crate::loading::convert::gguf_to_hf_dir(&args.gguf, &args.output)?;
            println!("wrote {}", args.output.display());
            Ok(())
        }
        Command::Data(DataCommand::Commonsense { olmo_dir, output_dir }) => {
            let report = crate::data::commonsense::convert_commonsense(&olmo_dir, &output_dir)?;
            println!("{report}");
            Ok(())
        }
        Command::Bench(super::BenchCommand::Methods(args)) => super::bench::methods(&args).map(|_| ()),
        Command::Bench(super::BenchCommand::Step(args)) => super::bench::step(&args),
        Command::Bench(super::BenchCommand::Decode(args)) => super::bench_decode::decode(&args).map(|_| ()),
        Command::Bench(super::BenchCommand::Kernels(args)) => super::bench_kernels::kernels(&args).map(|_| ()),
        Command::Bench(super::BenchCommand::Serve(args)) => super::bench_serve::serve(&args).map(|_| ()),
        Command::Bench(super::BenchCommand::Nf4(args)) => {
            super::bench_kernels::kernels(&super::BenchKernelsArgs { ops: vec!["nf4".into()], ..args }).map(|_| ())
        }
        Command::Bench(super::BenchCommand::Snell(args)) => {
            super::bench_kernels::kernels(&super::BenchKernelsArgs { ops: vec!["snell".into()], ..args }).map(|_| ())
        }
        Command::Selftest(args) => selftest(&args),
        Command::Plot(args) => {
            for path in super::plot_cmd::plot(&args)? {
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Probe(args) => super::vision_cmd::probe(&args).map(|_| ()),
        Command::VisionFinetune(args) => super::vision_cmd::vision_finetune(&args).map(|_| ()),
        Command::VisionEval(args) => super::vision_cmd::vision_eval(&args).map(|_| ()),
        Command::Demo(args) => crate::demo::run(&args.output_dir, args.seed, &crate::demo::DemoSize::default()).map(|_| ()),
    }
}

/// Load the model and, when given, attach an adapter. For `inference` (generation) a GGUF model
/// on the CPU keeps its weights packed (`loading::load_model_for_inference`).
pub fn load_with_adapter(model: &ModelArgs, adapter: Option<&str>, inference: bool) -> Result<LoadedModel> {
    let load = if inference { crate::loading::load_model_for_inference } else { load_model_with };
    let mut loaded = load(&model.model, model.dtype()?, &model.device()?, model.quantize()?)?;
    if let Some(spec) = adapter {
        let cfg = load_adapter(&mut loaded.model, &ModelSource::parse(spec)?)?;
        tracing::info!("adapter {spec}: {}", cfg.peft_type());
    }
    Ok(loaded)
}

/// The model's tokenizer, which must not produce an id past the model's vocabulary (the
/// embedding lookup would fail deep inside the forward, naming neither file).
pub fn require_tokenizer(loaded: &LoadedModel) -> Result<&tokenizers::Tokenizer> {
    let tokenizer = loaded.tokenizer.as_ref().ok_or_else(|| {
        Error::msg(format!("{}: no tokenizer (tokenizer.json, or the vocabulary inside the GGUF) was found", loaded.source))
    })?;
    let vocab = loaded.model.config.vocab_size;
    let largest = tokenizer.get_vocab(true).into_values().max().unwrap_or(0) as usize;
    if largest >= vocab {
        return Err(Error::msg(format!(
            "{}: the tokenizer has token id {largest}, past the model's vocabulary of {vocab} (config vocab_size)",
            loaded.source
        )));
    }
    Ok(tokenizer)
}


fn finetune(args: &FinetuneArgs) -> Result<()> {
    args.validate()?;
    let mut loaded = crate::loading::load_model_for_training(&args.model.model, args.model.dtype()?, &args.model.device()?, args.model.quantize()?)?;
    let tokenizer = require_tokenizer(&loaded)?.clone();
    let vocab = loaded.model.config.vocab_size;
    if args.pad_token_id as usize >= vocab {
        return Err(Error::msg(format!("--pad-token-id {}: must be below the model's vocabulary size {vocab}", args.pad_token_id)));
    }
    let mut adapter = args.adapter.to_config()?;
    let n = inject(&mut loaded.model, &adapter, args.seed)?;
    let trainable: usize = loaded.model.trainable_params().iter().map(|(_, v)| v.elem_count()).sum();
    println!("{}: {} on {n} modules, {trainable} trainable parameters", loaded.source, adapter.peft_type());

    let mut examples = load_examples(&args.data)?;
    if let Some(limit) = args.limit {
        examples.truncate(limit);
    }
    let (train_examples, val_examples) = train_val_split(&examples, args.val_set_size, args.seed)?;
    let eos = *loaded.model.config.eos_token_ids.first().ok_or_else(|| Error::msg("the model config names no eos_token_id"))?;
    let opts = TokenizeOptions { cutoff_len: args.cutoff_len, train_on_inputs: args.train_on_inputs, add_eos: true };
    let tokenize = |xs: &[crate::data::dataset::Example]| -> Result<Vec<Tokenized>> {
        xs.iter().map(|e| tokenize_example(&tokenizer, e, None, eos, &opts)).collect()
    };
    let (train_set, val_set) = (tokenize(&train_examples)?, tokenize(&val_examples)?);
    if adapter.init_batches() > 0 {
        // A data-driven init (EVA's) on the first few micro-batches.
        let batches = train_set
            .chunks(args.micro_batch_size.max(1))
            .take(adapter.init_batches())
            .map(|rows| {
                let b = crate::data::batch::Batch::collate(&rows.iter().collect::<Vec<_>>(), args.pad_token_id, 8)?;
                crate::training::run::to_train_batch(&b, loaded.model.device())
            })
            .collect::<crate::error::Result<Vec<_>>>()?;
        if let Some(what) = adapter.initialize_from_data(&mut loaded.model, &batches, args.seed)? {
            println!("{what}");
        }
    }
    let total_steps = args.max_steps.unwrap_or_else(|| steps_for_epochs(train_set.len(), args.batch_size, args.num_epochs));
    let cfg = RunConfig {
        output_dir: args.output_dir.clone(),
        batch_size: args.batch_size,
        micro_batch_size: args.micro_batch_size,
        steps: StepConfig {
            optim: AdamWConfig { lr: args.learning_rate, weight_decay: args.weight_decay, ..Default::default() },
            warmup_steps: args.warmup_steps,
            total_steps,
            max_grad_norm: Some(args.max_grad_norm),
            gradient_checkpointing: args.gradient_checkpointing,
        },
        eval_steps: args.eval_steps,
        save_steps: args.save_steps,
        seed: args.seed,
        pad_id: args.pad_token_id,
        resume: args.resume,
        base_model: Some(args.model.model.clone()),
        progress: true,
    };
    let ratio = args.lr_ratio_v;
    let summary = train(&loaded.model, &adapter, &train_set, &val_set, &cfg, |name| {
        if name.contains(".v_proj.") {
            ratio
        } else {
            1.0
        }
    })?;
    println!("{}", serde_json::to_string_pretty(&summary).map_err(|e| Error::msg(e.to_string()))?);
    println!("adapter written to {}", args.output_dir.display());
    // The adapter is safe on disk by now: a chart that cannot be drawn is worth a warning only.
    let png = args.output_dir.join("loss.png");
    let label = args.output_dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    match crate::plot::runs::write_run_loss_chart(&args.output_dir.join("metrics.jsonl"), &label, &png) {
        Ok(()) => println!("loss curve written to {}", png.display()),
        Err(e) => eprintln!("warning: no loss chart: {e}"),
    }
    Ok(())
}

fn merge(args: &MergeArgs) -> Result<()> {
    crate::fsutil::require_new_dir(&args.output)?;
    let mut loaded = load_with_adapter(&args.model, Some(&args.adapter), false)?;
    for (_, linear) in loaded.model.named_linears_mut() {
        linear.merge()?;
    }
    write_hf_dir(&loaded, &args.output)?;
    println!("merged model written to {}", args.output.display());
    Ok(())
}

/// Write a model as a Hugging Face directory: config.json, model.safetensors, tokenizer.json.
/// A file, or a directory that is not empty, is refused rather than replaced.
pub fn write_hf_dir(loaded: &LoadedModel, out: &Path) -> Result<()> {
    crate::fsutil::require_new_dir(out)?;
    let model = &loaded.model;
    let tensors: std::collections::HashMap<_, _> =
        model.hf_weights()?.into_iter().map(|(k, v)| Ok((k, v.contiguous()?))).collect::<Result<_>>()?;
    let mut config = model.config.to_hf_json();
    config["torch_dtype"] = serde_json::json!(match model.dtype() {
        candle_core::DType::BF16 => "bfloat16",
        candle_core::DType::F16 => "float16",
        _ => "float32",
    });
    crate::fsutil::write_dir_atomic(out, |tmp| {
        let json = serde_json::to_string_pretty(&config).map_err(|e| Error::msg(e.to_string()))?;
        std::fs::write(tmp.join("config.json"), json).map_err(|source| Error::Io { path: tmp.join("config.json"), source })?;
        let path = tmp.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &path).map_err(|e| Error::BadFile { path, msg: e.to_string() })?;
        if let Some(tok) = &loaded.tokenizer {
            tok.save(tmp.join("tokenizer.json"), false).map_err(|e| Error::Tokenizer(e.to_string()))?;
        }
        Ok(())
    })
}

/// Runs the GPU self-test, prints its table, fails when any check fails.
fn selftest(args: &super::SelftestArgs) -> Result<()> {
    if let Some(path) = &args.json {
        crate::fsutil::refuse_to_replace(std::slice::from_ref(path), "--json", args.overwrite)?;
    }
    let device = super::parse_device(&args.device)?;
    let checks = super::selftest::run(&device, args.seed, args.rounds)?;
    print!("{}", super::selftest::table(&checks));
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&checks).map_err(|e| Error::msg(e.to_string()))?;
        crate::fsutil::write_file_atomic(path, json.as_bytes())?;
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    if failed > 0 {
        return Err(Error::msg(format!("selftest: {failed} of {} checks failed", checks.len())));
    }
    Ok(())
}

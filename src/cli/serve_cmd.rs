//! `candle-peft serve`: load the base once, attach each `--adapter NAME=PATH` to its own model
//! over the base's weights, and hand them to `serving::serve`.

use clap::Args;

use super::commands::require_tokenizer;
use super::ModelArgs;
use crate::adapters::load_adapter;
use crate::error::{Error, Result};
use crate::hub::ModelSource;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An adapter to serve, as NAME=PATH (a PEFT adapter directory); repeat the flag for several.
    /// A request's `model` field names it; the base answers to its own name (`--name`).
    #[arg(long)]
    pub adapter: Vec<String>,
    #[command(flatten)]
    pub adapter_dtype: super::AdapterDtypeArgs,
    /// The name the base model answers to (default: the model's file or directory name).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests decoded at once (rows of the running batches).
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Requests that may wait for a place in the batch; more are answered 429.
    #[arg(long, default_value_t = 64)]
    pub queue_size: usize,
    /// The most `max_tokens` a request may ask for (at most the model's context).
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_limit: usize,
    /// Adapters attached at once; a request for another brings it in and the least recently
    /// used one without requests in flight goes.
    #[arg(long, default_value_t = 16)]
    pub max_resident_adapters: usize,
}

/// `NAME=PATH`, both non-empty.
fn adapter_spec(spec: &str) -> Result<(&str, &str)> {
    match spec.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok((name, path)),
        _ => Err(Error::msg(format!("--adapter {spec}: expected NAME=PATH (the name requests use, then the adapter directory)"))),
    }
}

pub fn serve(args: &ServeArgs) -> Result<()> {
    crate::validate::int_in("max-batch", args.max_batch, 1, 4096)?;
    crate::validate::int_in("queue-size", args.queue_size, 1, 1 << 20)?;
    crate::validate::int_in("max-tokens-limit", args.max_tokens_limit, 1, 1 << 24)?;
    crate::validate::int_in("max-resident-adapters", args.max_resident_adapters, 1, 4096)?;
    args.adapter_dtype.dtype()?;
    let specs = args.adapter.iter().map(|s| adapter_spec(s)).collect::<Result<Vec<_>>>()?;
    let loaded = super::commands::load_with_adapter(&args.model, None, true)?;
    let tokenizer = require_tokenizer(&loaded)?.clone();
    let template = super::eval_cmd::chat_template(&args.model.model, &loaded.model.config, &tokenizer)?;
    let chat_eos = super::eval_cmd::chat_eos(&loaded.model.config, &tokenizer, &template);
    let base_name = args.name.clone().unwrap_or_else(|| {
        let path = std::path::Path::new(&args.model.model);
        path.file_name().map_or(args.model.model.clone(), |n| n.to_string_lossy().into_owned())
    });
    let mut adapters: Vec<(String, crate::serving::registry::Loader)> = Vec::with_capacity(specs.len());
    for (name, path) in &specs {
        if *name == base_name || adapters.iter().any(|(n, _)| n == name) {
            return Err(Error::msg(format!("--adapter {name}={path}: the name `{name}` is taken")));
        }
        let (spec, path) = (format!("--adapter {name}={path}"), path.to_string());
        let dtype = args.adapter_dtype.clone();
        adapters.push((name.to_string(), std::sync::Arc::new(move |base: &crate::model::Llama| adapter_model(base, &path, &dtype).map_err(|e| Error::msg(format!("{spec}: {e}"))))));
    }
    let eos = loaded.model.config.eos_token_ids.clone();
    crate::serving::serve(crate::serving::ServerConfig {
        base_name,
        base: loaded.model,
        adapters,
        max_resident: args.max_resident_adapters,
        path_loader: Some({
            let dtype = args.adapter_dtype.clone();
            std::sync::Arc::new(move |base: &crate::model::Llama, path: &str| adapter_model(base, path, &dtype))
        }),
        tokenizer,
        template,
        eos_token_ids: eos,
        chat_eos_token_ids: chat_eos,
        host: args.host.clone(),
        port: args.port,
        max_batch: args.max_batch,
        queue_size: args.queue_size,
        max_tokens_limit: args.max_tokens_limit,
    })
}

/// The adapter directory `path` attached to a model over `base`'s weights, its LoRA factors in
/// `--adapter-dtype`.
fn adapter_model(base: &crate::model::Llama, path: &str, dtype: &super::AdapterDtypeArgs) -> Result<crate::model::Llama> {
    let mut model = base.share_base();
    let cfg = load_adapter(&mut model, &ModelSource::parse(path)?)?;
    dtype.apply(&mut model)?;
    tracing::info!("adapter {path}: {}", cfg.peft_type());
    Ok(model)
}

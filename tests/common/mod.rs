//! Shared by the integration tests: the tiny random model and the left-padded batch they train
//! and compare on.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use candle_peft::model::{Llama, LlamaConfig};
use candle_peft::training::TrainBatch;

/// A 2-layer random LLaMA (hidden 64, GQA 4/2, vocab 50).
pub fn tiny(dtype: DType) -> Llama {
    Llama::random(LlamaConfig::tiny(50), 7, dtype, &Device::Cpu).unwrap()
}

/// Two rows of 8 tokens; the first is left-padded by 2.
pub fn batch() -> TrainBatch {
    let d = &Device::Cpu;
    let ids = Tensor::new(&[[0u32, 0, 5, 9, 13, 2, 7, 11], [3, 4, 5, 6, 7, 8, 9, 10]], d).unwrap();
    let mask = vec![vec![0, 0, 1, 1, 1, 1, 1, 1], vec![1; 8]];
    let labels = Tensor::new(&[[-100i64, -100, 5, 9, 13, 2, 7, 11], [3, 4, 5, 6, 7, 8, 9, 10]], d).unwrap();
    TrainBatch { input_ids: ids, mask, labels }
}

/// The model's logits on `batch()`.
pub fn logits(model: &Llama) -> Tensor {
    let b = batch();
    model.forward(&b.input_ids, Some(&b.mask), None, false).unwrap()
}

/// The training loss of `model` on `b`, as f64.
pub fn loss_value(model: &Llama, b: &TrainBatch) -> f64 {
    candle_peft::training::causal_lm_loss(model, b, true).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// `(L(θ + ε) − L(θ − ε)) / 2ε` for entry `idx` of `var`, restoring the entry afterwards.
pub fn central_difference(model: &Llama, var: &candle_core::Var, idx: usize, eps: f32, b: &TrainBatch) -> f64 {
    let orig = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let set = |v: Vec<f32>| var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap()).unwrap();
    let eval = |delta: f32| {
        let mut v = orig.clone();
        v[idx] += delta;
        set(v);
        loss_value(model, b)
    };
    let (plus, minus) = (eval(eps), eval(-eps));
    set(orig.clone());
    (plus - minus) / (2.0 * eps as f64)
}

/// Save `model`'s adapter, load it onto a fresh `tiny` model: (the loaded config, that model).
pub fn save_and_reload(model: &Llama, cfg: &candle_peft::adapters::AdapterConfig) -> (candle_peft::adapters::AdapterConfig, Llama) {
    let dir = tempfile::tempdir().unwrap();
    candle_peft::adapters::save_adapter(model, cfg, dir.path(), None).unwrap();
    let mut fresh = tiny(model.dtype());
    let source = candle_peft::hub::ModelSource::parse(dir.path().to_str().unwrap()).unwrap();
    let loaded = candle_peft::adapters::load_adapter(&mut fresh, &source).unwrap();
    (loaded, fresh)
}

/// AdamW at a constant `lr` for `total` steps, clipping at 1.
pub fn trainer(model: &Llama, lr: f64, total: usize) -> candle_peft::training::Trainer {
    use candle_peft::training::{AdamWConfig, StepConfig, Trainer};
    let steps = StepConfig { optim: AdamWConfig { lr, ..Default::default() }, warmup_steps: 0, total_steps: total, max_grad_norm: Some(1.0), gradient_checkpointing: false };
    Trainer::new(model, steps, |_| 1.0).unwrap()
}

/// A Hugging Face model directory (config, safetensors, tokenizer) of a tiny random LLaMA whose
/// tokenizer knows the demo task's words; returns the task's (train, test) records.
pub fn write_tiny_model_dir(model: &std::path::Path) -> (Vec<candle_peft::data::dataset::Example>, Vec<candle_peft::data::dataset::Example>) {
    let (train, test) = candle_peft::demo::task(0, 12);
    let tok = candle_peft::demo::tokenizer(&[train.clone(), test.clone()].concat()).unwrap();
    let mut c = LlamaConfig::tiny(tok.get_vocab_size(true));
    c.pad_token_id = Some(0);
    std::fs::create_dir_all(model).unwrap();
    std::fs::write(model.join("config.json"), c.to_hf_json().to_string()).unwrap();
    candle_core::safetensors::save(&candle_peft::model::llama::random_weights(&c, 0.1, 1).unwrap(), model.join("model.safetensors")).unwrap();
    tok.save(model.join("tokenizer.json"), false).unwrap();
    (train, test)
}

/// `tests/fixtures/<relative>`, which ships in the repository: a missing fixture fails the test
/// that asked for it, naming the path (never a silent pass). `tests/fixtures/README.md` says what
/// made each one and how CI regenerates them.
pub fn fixture(relative: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(relative);
    assert!(path.exists(), "fixture {} is missing (it ships with the repository; see tests/fixtures/README.md)", path.display());
    path
}

/// `max |a − b|` over every element, in f64 (any float dtype, any device).
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// A small LLaMA GGUF that loads: the metadata a loader reads and tensors in F32, F16, Q8_0,
/// Q4_0 and Q4_1 (the seed of the parser fuzzing and of the malformed corpus).
pub fn write_tiny_gguf(path: &std::path::Path) {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{DType, Device, Tensor};
    use gguf_file::Value as V;
    let md = [
        ("general.architecture", V::String("llama".into())),
        ("llama.block_count", V::U32(1)),
        ("llama.embedding_length", V::U32(32)),
        ("llama.feed_forward_length", V::U32(64)),
        ("llama.attention.head_count", V::U32(4)),
        ("llama.attention.head_count_kv", V::U32(2)),
        ("llama.context_length", V::U32(128)),
        ("tokenizer.ggml.model", V::String("gpt2".into())),
        ("tokenizer.ggml.tokens", V::Array(["<s>", "</s>", "a", "b", "ab"].map(|t| V::String(t.into())).to_vec())),
        ("tokenizer.ggml.merges", V::Array(vec![V::String("a b".into())])),
        ("tokenizer.ggml.eos_token_id", V::U32(1)),
    ];
    let w = |rows: usize, cols: usize, ty| QTensor::quantize(&Tensor::randn(0f32, 0.1, (rows, cols), &Device::Cpu).unwrap(), ty).unwrap();
    let norm = || QTensor::quantize(&Tensor::ones(32, DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
    let tensors = [
        ("token_embd.weight", w(5, 32, GgmlDType::Q8_0)),
        ("blk.0.attn_q.weight", w(32, 32, GgmlDType::F32)),
        ("blk.0.attn_k.weight", w(16, 32, GgmlDType::F16)),
        ("blk.0.attn_v.weight", w(16, 32, GgmlDType::Q4_1)),
        ("blk.0.attn_output.weight", w(32, 32, GgmlDType::Q8_0)),
        ("blk.0.ffn_gate.weight", w(64, 32, GgmlDType::Q4_0)),
        ("blk.0.ffn_up.weight", w(64, 32, GgmlDType::Q4_0)),
        ("blk.0.ffn_down.weight", w(32, 64, GgmlDType::Q4_0)),
        ("blk.0.attn_norm.weight", norm()),
        ("blk.0.ffn_norm.weight", norm()),
        ("output_norm.weight", norm()),
    ];
    let md: Vec<(&str, &V)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut std::fs::File::create(path).unwrap(), &md, &ts).unwrap();
}

/// A LoRA adapter of the model at `model` with random (non-zero) A and B, written to `dir`.
pub fn write_lora_adapter(model: &std::path::Path, dir: &std::path::Path, seed: u64, targets: &[&str]) {
    let mut loaded = candle_peft::loading::load_model(model.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let cfg = candle_peft::adapters::AdapterConfig::new(candle_peft::adapters::LoraConfig {
        r: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: candle_peft::adapters::Targets::List(targets.iter().map(|s| s.to_string()).collect()),
        use_rslora: false,
        use_dora: false,
    });
    candle_peft::adapters::inject(&mut loaded.model, &cfg, seed).unwrap();
    for (i, (_, var)) in loaded.model.trainable_params().iter().enumerate() {
        let noise = Tensor::randn(0f32, 0.3, var.shape(), &Device::Cpu).unwrap();
        var.set(&(noise * (1.0 + (seed as usize + i) as f64 % 3.0)).unwrap()).unwrap();
    }
    std::fs::create_dir_all(dir).unwrap();
    candle_peft::adapters::save_adapter(&loaded.model, &cfg, dir, None).unwrap();
}

/// A running server, killed when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn start_server(args: &[&str]) -> Server {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_candle-peft")).arg("serve").args(args).args(["--port", "0"]).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::inherit()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("serve printed {line:?}")).to_string();
    Server { child, url }
}

/// `candle-peft generate`'s greedy answer (its stdout without the last newline).
pub fn generate_greedy(model: &std::path::Path, adapter: Option<&std::path::Path>, prompt: &str, max_new: usize) -> String {
    generate_greedy_with(model, adapter, prompt, max_new, &[])
}

/// [`generate_greedy`] with more flags.
pub fn generate_greedy_with(model: &std::path::Path, adapter: Option<&std::path::Path>, prompt: &str, max_new: usize, flags: &[&str]) -> String {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_candle-peft"));
    cmd.args(["generate", "--model", model.to_str().unwrap(), "--prompt", prompt, "--max-new-tokens", &max_new.to_string()]).args(flags);
    if let Some(a) = adapter {
        cmd.args(["--adapter", a.to_str().unwrap()]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().strip_suffix('\n').unwrap().to_string()
}

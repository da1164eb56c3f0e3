//! What the engine does with adapter files that are not exactly what it expects: options it does
//! not know are ignored (PEFT adds some every release), options it knows but does not implement
//! are errors naming them, and tensors that are missing or do not fit the model are errors naming
//! the tensor, the module and the shapes. The adapters are PEFT's own (tests/fixtures/peft),
//! copied to a temporary directory and edited.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_peft::adapters::load_adapter;
use candle_peft::hub::ModelSource;
use candle_peft::weights::Weights;
use candle_peft::model::{Llama, LlamaConfig};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft");
    assert!(p.is_dir(), "PEFT fixtures not found at {} (they ship in the repository)", p.display());
    p
}

/// The fixture model's architecture (hidden 64, vocab 300) with random weights: these tests are
/// about reading the adapter files, not about the logits.
fn model_with(edit: impl FnOnce(&mut LlamaConfig)) -> Llama {
    let mut config = LlamaConfig::from_file(&fixtures().join("tiny-llama/config.json")).unwrap();
    edit(&mut config);
    Llama::random(config, 3, DType::F32, &Device::Cpu).unwrap()
}

/// A copy of fixture adapter `name` in a fresh temporary directory, to edit.
fn copy_adapter(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixtures().join(name).join(file), dir.join(file)).unwrap();
    }
    (tmp, dir)
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("adapter_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Load the adapter in `dir` onto `model`; the error message when it fails.
fn load(model: &mut Llama, dir: &Path) -> Result<(), String> {
    let source = ModelSource::parse(dir.to_str().unwrap()).unwrap();
    load_adapter(model, &source).map(|_| ()).map_err(|e| e.to_string())
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "the error should mention `{p}`: {err}");
    }
}

#[test]
fn unknown_options_are_ignored() {
    for name in ["lora_r4_all", "ia3_kv_down"] {
        let (_tmp, dir) = copy_adapter(name);
        edit_config(&dir, |c| {
            c.insert("some_future_option".into(), json!(123));
            c.insert("another_future_option".into(), json!({"enabled": true}));
        });
        load(&mut model_with(|_| {}), &dir).unwrap_or_else(|e| panic!("{name} with unknown options: {e}"));
    }
}

#[test]
fn unimplemented_options_are_errors_naming_them() {
    let (_tmp, dir) = copy_adapter("lora_r4_all");
    edit_config(&dir, |c| {
        c.insert("use_qalora".into(), json!(true));
    });
    let err = load(&mut model_with(|_| {}), &dir).expect_err("use_qalora = true must be refused");
    assert_mentions(&err, &["use_qalora", "not implemented"]);

    let (_tmp, dir) = copy_adapter("lora_r4_all");
    edit_config(&dir, |c| {
        c.insert("layers_to_transform".into(), json!([0]));
    });
    let err = load(&mut model_with(|_| {}), &dir).expect_err("layers_to_transform = [0] must be refused");
    assert_mentions(&err, &["layers_to_transform", "not implemented"]);
}

#[test]
fn unimplemented_method_is_an_error_naming_it() {
    let (_tmp, dir) = copy_adapter("lora_r4_all");
    edit_config(&dir, |c| {
        c.insert("peft_type".into(), json!("LOHA"));
    });
    let err = load(&mut model_with(|_| {}), &dir).expect_err("a LoHa adapter must be refused");
    assert_mentions(&err, &["LOHA", "not implemented", "adapter_config.json"]);
}

#[test]
fn shape_mismatch_names_module_and_both_shapes() {
    // Hidden size 32 instead of 64: q_proj's lora_A is [4, 64] in the file, [4, 32] in the model.
    let mut model = model_with(|c| {
        c.hidden_size = 32;
        c.head_dim = 8;
    });
    let err = load(&mut model, &fixtures().join("lora_r4_all")).expect_err("a [4, 64] lora_A must not load into [4, 32]");
    assert_mentions(&err, &["model.layers.0.self_attn.q_proj", "lora_A.weight", "[4, 64]", "[4, 32]"]);
}

#[test]
fn missing_tensor_is_named() {
    let (_tmp, dir) = copy_adapter("lora_r4_all");
    let file = dir.join("adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let gone = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight";
    assert!(tensors.remove(gone).is_some(), "the fixture should hold {gone}");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let err = load(&mut model_with(|_| {}), &dir).expect_err("an adapter without one of its tensors must be refused");
    assert_mentions(&err, &[gone, "not found"]);
}

#[test]
fn unedited_copy_loads() {
    // The edits above are what make the other tests fail, not the copying.
    let (_tmp, dir) = copy_adapter("dora_r4_all");
    load(&mut model_with(|_| {}), &dir).unwrap();
    let w = Weights::from_safetensors(&[dir.join("adapter_model.safetensors")]).unwrap();
    assert!(w.names().iter().any(|n| n.ends_with("lora_magnitude_vector")));
}

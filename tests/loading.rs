//! Checkpoints the tests write themselves, loaded from a plain directory and from the hub-cache
//! layout; and every kind of bad input gives a clear error that names the file or tensor.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_peft::hub;
use candle_peft::loading::load_model;
use candle_peft::model::llama::random_weights;
use candle_peft::model::LlamaConfig;

fn write_checkpoint(dir: &Path, config: &LlamaConfig, weights: &HashMap<String, Tensor>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config.to_hf_json()).unwrap()).unwrap();
    candle_core::safetensors::save(weights, dir.join("model.safetensors")).unwrap();
}

fn tiny() -> (LlamaConfig, HashMap<String, Tensor>) {
    let c = LlamaConfig::tiny(40);
    let w = random_weights(&c, 0.1, 3).unwrap();
    (c, w)
}

fn err_of(spec: &str) -> String {
    match load_model(spec, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{spec} loaded but should not have"),
        Err(e) => e.to_string(),
    }
}

fn logits(spec: &str) -> Tensor {
    let m = load_model(spec, DType::F32, &Device::Cpu).unwrap().model;
    m.forward(&Tensor::new(&[[1u32, 5, 7, 9]], &Device::Cpu).unwrap(), None, None, false).unwrap()
}

#[test]
fn plain_directory_and_shards_and_hub_cache_give_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, w) = tiny();
    let plain = tmp.path().join("plain");
    write_checkpoint(&plain, &c, &w);
    let reference = logits(plain.to_str().unwrap());

    // Two shards with an index, as transformers writes large models.
    let sharded = tmp.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    std::fs::write(sharded.join("config.json"), serde_json::to_string(&c.to_hf_json()).unwrap()).unwrap();
    let (mut a, mut b, mut map) = (HashMap::new(), HashMap::new(), serde_json::Map::new());
    for (i, (k, v)) in w.iter().enumerate() {
        let shard = if i % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        if i % 2 == 0 { a.insert(k.clone(), v.clone()) } else { b.insert(k.clone(), v.clone()) };
        map.insert(k.clone(), serde_json::json!(shard));
    }
    candle_core::safetensors::save(&a, sharded.join("model-00001-of-00002.safetensors")).unwrap();
    candle_core::safetensors::save(&b, sharded.join("model-00002-of-00002.safetensors")).unwrap();
    std::fs::write(sharded.join("model.safetensors.index.json"), serde_json::json!({"weight_map": map}).to_string()).unwrap();
    let diff = (logits(sharded.to_str().unwrap()) - &reference).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);

    // The hub cache layout: models--org--name/refs/main names the snapshot.
    let cache = tmp.path().join("hub");
    let repo = cache.join("models--test-org--tiny-llama");
    let snapshot = repo.join("snapshots").join("0123abcd");
    write_checkpoint(&snapshot, &c, &w);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    assert_eq!(hub::cached_file(&cache, "test-org/tiny-llama", "main", "config.json"), Some(snapshot.join("config.json")));
    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let diff = (logits("test-org/tiny-llama") - &reference).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    // An adapter given as a repo id comes from the same cache (PEFT's fixture, same shapes).
    let adapter_repo = cache.join("models--test-org--tiny-lora");
    let snap = adapter_repo.join("snapshots").join("feed");
    std::fs::create_dir_all(&snap).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft/lora_r4_all");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture.join(f), snap.join(f)).unwrap();
    }
    std::fs::create_dir_all(adapter_repo.join("refs")).unwrap();
    std::fs::write(adapter_repo.join("refs/main"), "feed").unwrap();
    let mut model = load_model("test-org/tiny-llama", DType::F32, &Device::Cpu).unwrap().model;
    let cfg = candle_peft::adapters::load_adapter(&mut model, &hub::ModelSource::parse("test-org/tiny-lora").unwrap()).unwrap();
    assert_eq!(cfg.peft_type(), "LORA");
    assert_eq!(model.trainable_params().len(), 28);
    // Offline, a repo that is not cached names the repo and the file.
    let e = err_of("test-org/absent");
    assert!(e.contains("test-org/absent") && e.contains("config.json") && e.contains("HF_HUB_OFFLINE"), "{e}");
}

#[test]
fn missing_config_key_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, w) = tiny();
    write_checkpoint(tmp.path(), &c, &w);
    let mut v = c.to_hf_json();
    v.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(tmp.path().join("config.json"), v.to_string()).unwrap();
    let e = err_of(tmp.path().to_str().unwrap());
    assert!(e.contains("config.json") && e.contains("hidden_size"), "{e}");
}

#[test]
fn wrong_shape_and_missing_tensor_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, mut w) = tiny();
    w.insert("model.layers.1.mlp.up_proj.weight".into(), Tensor::zeros((3, 64), DType::F32, &Device::Cpu).unwrap());
    write_checkpoint(tmp.path(), &c, &w);
    let e = err_of(tmp.path().to_str().unwrap());
    assert!(e.contains("model.layers.1.mlp.up_proj.weight") && e.contains("[3, 64]") && e.contains("[176, 64]"), "{e}");

    let (c, mut w) = tiny();
    w.remove("model.layers.0.self_attn.k_proj.weight");
    write_checkpoint(tmp.path(), &c, &w);
    let e = err_of(tmp.path().to_str().unwrap());
    assert!(e.contains("model.layers.0.self_attn.k_proj.weight") && e.contains("not found"), "{e}");
}

#[test]
fn truncated_safetensors_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (c, w) = tiny();
    write_checkpoint(tmp.path(), &c, &w);
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for cut in [4, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let e = err_of(tmp.path().to_str().unwrap());
        assert!(e.contains("model.safetensors"), "cut at {cut}: {e}");
    }
}

#[test]
fn malformed_dataset_row_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("train.json");
    std::fs::write(&path, r#"[{"instruction": "a", "input": "", "output": "b"}, {"instruction": 3, "output": "b"}]"#).unwrap();
    let e = candle_peft::data::dataset::load_examples(&path).unwrap_err().to_string();
    assert!(e.contains("train.json") && e.contains("row 1"), "{e}");
}

#[test]
fn interrupted_checkpoint_write_leaves_the_previous_one_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("checkpoint");
    candle_peft::fsutil::write_dir_atomic(&dir, |d| {
        std::fs::write(d.join("state.json"), "first").map_err(|source| candle_peft::Error::Io { path: d.into(), source })
    })
    .unwrap();
    let failed = candle_peft::fsutil::write_dir_atomic(&dir, |d| {
        std::fs::write(d.join("state.json"), "half-writ").unwrap();
        Err(candle_peft::Error::msg("disk full"))
    });
    assert!(failed.is_err());
    assert_eq!(std::fs::read_to_string(dir.join("state.json")).unwrap(), "first");
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "the temporary directory is removed");
}

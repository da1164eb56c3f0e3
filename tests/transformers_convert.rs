//! `convert` writes a Hugging Face directory that transformers itself loads and that gives the
//! engine's logits: the real SmolLM2-135M GGUF, converted, run through PyTorch.
//! Needs the asset (scripts/fetch_assets.sh) and a Python with torch + transformers
//! (`CANDLE_PEFT_PYTHON=$(scripts/peft_venv.sh) cargo test --release --test transformers_convert -- --ignored`).

use std::path::PathBuf;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use candle_peft::loading::{convert::gguf_to_hf_dir, load_model};
use candle_peft::weights::Weights;

#[test]
#[ignore = "needs PyTorch + transformers and the SmolLM2 asset: see the file's doc comment"]
fn transformers_loads_the_converted_smollm2_and_agrees() {
    let python = std::env::var_os("CANDLE_PEFT_PYTHON").expect("CANDLE_PEFT_PYTHON is not set (scripts/peft_venv.sh)");
    let assets = std::env::var_os("CANDLE_PEFT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/assets"));
    let gguf = assets.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(gguf.is_file(), "{} missing: run scripts/fetch_assets.sh", gguf.display());
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("smollm2-hf");
    gguf_to_hf_dir(&gguf, &hf).unwrap();

    let ids = vec![vec![504u32, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282], vec![0, 0, 0, 504, 3575, 282, 4521, 314, 11452, 30]];
    let mask = vec![vec![1u32; 10], vec![0, 0, 0, 1, 1, 1, 1, 1, 1, 1]];
    let ids_json = tmp.path().join("ids.json");
    std::fs::write(&ids_json, serde_json::json!({"input_ids": ids, "attention_mask": mask}).to_string()).unwrap();
    let out = tmp.path().join("logits.safetensors");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_logits.py");
    let status = Command::new(python).arg(script).arg(&hf).arg("-").arg(&ids_json).arg(&out).status().unwrap();
    assert!(status.success(), "transformers could not run the converted model");
    let theirs = Weights::from_safetensors(&[out]).unwrap().get_any("logits", DType::F32, &Device::Cpu).unwrap();

    for spec in [&hf, &gguf] {
        let model = load_model(spec.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap().model;
        let ours = model.forward(&Tensor::new(ids.clone(), &Device::Cpu).unwrap(), Some(&mask), None, false).unwrap();
        let diff = (ours - &theirs).unwrap().abs().unwrap().max_keepdim(2).unwrap().squeeze(2).unwrap().to_vec2::<f32>().unwrap();
        let worst = diff.iter().zip(&mask).flat_map(|(r, m)| r.iter().zip(m).filter(|(_, &k)| k == 1).map(|(d, _)| *d)).fold(0f32, f32::max);
        assert!(worst < 1e-3, "{}: max |engine - transformers| = {worst}", spec.display());
    }
}

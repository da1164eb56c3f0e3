//! A method written outside the crate, as a new method's module would be written inside it:
//! its config implements `AdapterMethod`, its layer `LinearAdapter`, and nothing else of the
//! engine is touched. It injects by target name, trains through the Trainer, merges and saves
//! in PEFT's layout; reading its file back is what its one row of `registry::METHODS` adds
//! (without the row, the loader names the methods it knows).

mod common;

use candle_core::{DType, Tensor, Var};
use candle_peft::adapters::method::{AdapterMethod, BuiltLinear};
use candle_peft::adapters::{inject, save_adapter, AdapterConfig, Targets};
use candle_peft::model::{FrozenLinear, LinearAdapter};
use candle_peft::training::configure_trainer;
use candle_peft::Result;
use common::{batch, loss_value, max_diff, tiny};
use rand::rngs::StdRng;
use serde_json::{json, Value};

/// A learned bias on each targeted output: `y = x Wᵀ + b` (BitFit on chosen layers).
#[derive(Debug, Clone, PartialEq)]
struct BiasConfig {
    target_modules: Targets,
}

struct BiasLinear {
    bias: Var,
}

impl AdapterMethod for BiasConfig {
    fn peft_type(&self) -> &'static str {
        "TEST_BIAS"
    }
    fn targets(&self) -> Option<&Targets> {
        Some(&self.target_modules)
    }
    fn peft_json(&self) -> Value {
        json!({ "target_modules": self.target_modules })
    }
    fn build_linear(&self, _path: &str, base: &FrozenLinear, _rng: &mut StdRng) -> Result<Option<BuiltLinear>> {
        let bias = Var::zeros(base.out_features(), DType::F32, base.device())?;
        Ok(Some((Box::new(BiasLinear { bias }), None)))
    }
}

impl LinearAdapter for BiasLinear {
    fn forward(&self, x: &Tensor, base: &FrozenLinear, _train: bool) -> Result<Tensor> {
        Ok(base.forward(x)?.broadcast_add(&self.bias.as_tensor().to_dtype(x.dtype())?)?)
    }
    fn merged_weight(&self, base: &Tensor) -> Result<Tensor> {
        Err(candle_peft::Error::Adapter(format!("a bias does not merge into a weight {:?}", base.dims())))
    }
    fn unmerged_weight(&self, merged: &Tensor) -> Result<Tensor> {
        Ok(merged.clone())
    }
    fn params(&self) -> Vec<(String, Var)> {
        vec![("bias".into(), self.bias.clone())]
    }
}

#[test]
fn a_method_outside_the_table_injects_trains_and_saves() {
    let cfg = AdapterConfig::new(BiasConfig { target_modules: Targets::List(vec!["v_proj".into(), "down_proj".into()]) });
    let mut model = tiny(DType::F32);
    let before = common::logits(&model);
    // Two layers, two targets each.
    assert_eq!(inject(&mut model, &cfg, 0).unwrap(), 4);
    assert!(max_diff(&before, &common::logits(&model)) < 1e-6, "a zero bias changes nothing");

    let mut trainer = common::trainer(&model, 1e-2, 5);
    configure_trainer(&mut trainer, &model, &cfg).unwrap();
    let first = loss_value(&model, &batch());
    for _ in 0..5 {
        trainer.step(&model, &[batch()]).unwrap();
    }
    assert!(loss_value(&model, &batch()) < first, "training the biases lowers the loss");

    let dir = tempfile::tempdir().unwrap();
    save_adapter(&model, &cfg, dir.path(), None).unwrap();
    let written: Value = serde_json::from_slice(&std::fs::read(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(written["peft_type"], "TEST_BIAS");
    let tensors = candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert!(tensors.contains_key("base_model.model.model.layers.0.self_attn.v_proj.bias"), "{:?}", tensors.keys());

    // Not in the table: the loader says so and names the types it knows.
    let e = AdapterConfig::from_peft_json(&written, std::path::Path::new("adapter_config.json")).unwrap_err().to_string();
    assert!(e.contains("TEST_BIAS") && e.contains("LORA") && e.contains("SNELL"), "{e}");
}

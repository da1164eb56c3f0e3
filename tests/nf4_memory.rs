//! An NF4 base is not kept dequantized between forward and backward (QLoRA's memory: at 7B the
//! dense copies of every layer would be 13 GB in bf16). This test binary counts live heap bytes
//! in its allocator, so it holds this one test only: others running beside it would count too.

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use candle_core::{DType, Device, Tensor, Var};
use candle_peft::adapters::lora::{LoraConfig, LoraLinear};
use candle_peft::adapters::Targets;
use candle_peft::model::linear::Linear;
use candle_peft::quant::Nf4Tensor;
use rand::SeedableRng;

/// A stack of NF4 layers, every other one with LoRA (the fused op on the CPU), trained: the
/// forward's graph grows by the activations, not by the layers' dequantized weights; and the
/// gradients equal those of the same stack on the dequantized weights.
#[test]
fn nf4_layers_stay_packed_between_forward_and_backward() {
    // d = 1024: the dense weights (32 MiB) stand far above the GEMM's per-thread scratch (about
    // 2 MiB), which a rayon thread the warm-up did not reach allocates on its first product.
    let (layers, d, tokens) = (8, 1024, 4);
    let cpu = &Device::Cpu;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let cfg = LoraConfig { r: 8, lora_alpha: 16.0, lora_dropout: 0.0, target_modules: Targets::Pattern("all-linear".into()), use_rslora: false, use_dora: false };
    let weights: Vec<Tensor> = (0..layers).map(|_| Tensor::randn(0f32, 0.05, (d, d), cpu).unwrap()).collect();
    let build = |dense: bool, rng: &mut rand::rngs::StdRng| -> Vec<Linear> {
        (0..layers)
            .map(|i| {
                let q = Nf4Tensor::quantize(&weights[i], 64, true).unwrap();
                let mut lin = if dense { Linear::new(q.dequantize(DType::F32).unwrap()) } else { Linear::new_nf4(q, DType::F32) };
                if i % 2 == 1 {
                    lin.set_adapter(Box::new(LoraLinear::new(lin.base(), &cfg, rng).unwrap()));
                }
                lin
            })
            .collect()
    };
    let stack = build(false, &mut rng);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (tokens, d), cpu).unwrap()).unwrap();
    let forward = |stack: &[Linear]| stack.iter().fold(x.as_tensor().clone(), |h, lin| lin.forward(&h, true).unwrap());
    drop(forward(&stack)); // first-use buffers (GEMM packing, thread pools) outside the count
    let before = counting_alloc::live();
    let y = forward(&stack);
    let grown = counting_alloc::live().saturating_sub(before);
    let dense_weights = layers * d * d * 4;
    assert!(
        grown < dense_weights / 4,
        "the forward's graph holds {grown} bytes: the {layers} layers' dequantized weights ({dense_weights} bytes) were kept"
    );
    // The same layers dense: same outputs and input gradient.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let dense = build(true, &mut rng);
    let y_dense = forward(&dense);
    let diff = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff(&y, &y_dense) < 1e-5, "y differs by {}", diff(&y, &y_dense));
    let (g, g_dense) = (y.sum_all().unwrap().backward().unwrap(), y_dense.sum_all().unwrap().backward().unwrap());
    let (dx, dx_dense) = (g.get(x.as_tensor()).unwrap(), g_dense.get(x.as_tensor()).unwrap());
    assert!(diff(dx, dx_dense) < 1e-4, "dx differs by {}", diff(dx, dx_dense));
}

//! The q, k and v projections of training split their output into attention heads inside their
//! op, so the graph holds the heads (which attention keeps) and not the [tokens, out] product,
//! which a separate split would hold as its input until backward ends. This test binary counts
//! heap bytes in its allocator, so it holds this one test.

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use candle_core::{Device, Tensor, Var};
use candle_peft::ops::{lora_linear, lora_linear_heads};
use candle_peft::quant::BaseWeight;
use candle_peft::ops::nn::{frozen_matmul_t, frozen_matmul_t_heads, AttentionHeads};

#[test]
fn projections_into_heads_do_not_keep_their_output_for_backward() {
    let (b, t, d_in, n, d, r) = (2, 256, 64, 8, 64, 4);
    let randn = |shape: &[usize], std: f32| Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap();
    let x = Var::from_tensor(&randn(&[b, t, d_in], 1.0)).unwrap();
    let (a, bm) = (Var::from_tensor(&randn(&[r, d_in], 0.1)).unwrap(), Var::from_tensor(&randn(&[n * d, r], 0.1)).unwrap());
    let w: BaseWeight = randn(&[n * d, d_in], 0.05).into();
    let angles = randn(&[b, 1, t, d / 2], 2.0);
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let heads = AttentionHeads::rotated(n, &cos, &sin);
    let output_bytes = b * t * n * d * 4;
    // Bytes live between forward and backward, over those before, with the heads held.
    let held = |lora: bool, inside: bool| {
        let forward = || match (lora, inside) {
            (false, true) => frozen_matmul_t_heads(x.as_tensor(), &w, heads, true).unwrap(),
            (false, false) => heads.split(&frozen_matmul_t(x.as_tensor(), &w).unwrap(), true).unwrap(),
            (true, true) => lora_linear_heads(x.as_tensor(), &w, (a.as_tensor(), bm.as_tensor()), 2.0, None, heads).unwrap(),
            (true, false) => heads.split(&lora_linear(x.as_tensor(), &w, a.as_tensor(), bm.as_tensor(), 2.0, None).unwrap(), true).unwrap(),
        };
        counting_alloc::held_for_backward(forward, &[x.as_tensor()])
    };
    let mib = |b: usize| b as f64 / 1048576.0;
    for lora in [false, true] {
        let (inside, separate) = counting_alloc::fused_and_separate(|inside| held(lora, inside));
        // LoRA also keeps its [T, r] intermediate.
        let extra = if lora { b * t * r * 4 } else { 0 };
        assert!(inside < output_bytes + extra + output_bytes / 8, "lora {lora}: {:.2} MiB held, the heads are {:.2} MiB", mib(inside), mib(output_bytes));
        // The comparison means something only if the separate split does hold the product.
        assert!(separate >= 2 * output_bytes, "lora {lora}, separate split: {:.2} MiB held", mib(separate));
    }
}

//! A frozen projection that adds into the residual (o_proj, down_proj) keeps nothing of its
//! output for backward: candle's add node would hold the [tokens, out] product until backward
//! ends; with SwiGLU in the same op (down_proj), nothing of its input either, and a down_proj
//! with LoRA does not keep the SwiGLU activation it reads. This test binary
//! counts heap bytes in its allocator, so it holds this one test.

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use candle_core::{Device, Tensor, Var};
use candle_peft::quant::BaseWeight;
use candle_peft::ops::nn::{frozen_matmul_t, frozen_matmul_t_add, swiglu, swiglu_frozen_matmul_t_add};

#[test]
fn the_projection_added_into_the_residual_is_not_kept_for_backward_nor_the_swiglu_before_it() {
    let (t, d_in, d_out) = (512, 64, 1024);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (t, d_in), &Device::Cpu).unwrap()).unwrap();
    let residual = Var::from_tensor(&Tensor::randn(0f32, 1.0, (t, d_out), &Device::Cpu).unwrap()).unwrap();
    let w: BaseWeight = Tensor::randn(0f32, 0.05, (d_out, d_in), &Device::Cpu).unwrap().into();
    let output_bytes = t * d_out * 4;
    let held = |fused: bool| {
        let forward = || match fused {
            true => frozen_matmul_t_add(x.as_tensor(), &w, residual.as_tensor()).unwrap(),
            false => (residual.as_tensor() + frozen_matmul_t(x.as_tensor(), &w).unwrap()).unwrap(),
        };
        counting_alloc::held_for_backward(forward, &[x.as_tensor(), residual.as_tensor()])
    };
    let (fused, added) = counting_alloc::fused_and_separate(held);
    let mib = |b: usize| b as f64 / 1048576.0;
    assert!(fused < output_bytes + output_bytes / 8, "fused: {:.2} MiB held, the output is {:.2} MiB", mib(fused), mib(output_bytes));
    // The comparison means something only if the add does hold the product besides its output.
    assert!(added >= 2 * output_bytes, "add: {:.2} MiB held", mib(added));

    // SwiGLU into the projection: g and u are the inputs (held by the graph either way), the
    // activation [t, d_in] is not kept, nor the product.
    let (g, u) = (x.as_tensor().copy().unwrap(), (x.as_tensor() * 0.5).unwrap());
    let (g, u) = (Var::from_tensor(&g).unwrap(), Var::from_tensor(&u).unwrap());
    let activation_bytes = t * d_in * 4;
    let held = |fused: bool| {
        let forward = || match fused {
            true => swiglu_frozen_matmul_t_add(g.as_tensor(), u.as_tensor(), &w, residual.as_tensor(), true).unwrap(),
            false => frozen_matmul_t_add(&swiglu(g.as_tensor(), u.as_tensor(), true).unwrap(), &w, residual.as_tensor()).unwrap(),
        };
        counting_alloc::held_for_backward(forward, &[g.as_tensor(), u.as_tensor(), residual.as_tensor()])
    };
    let (fused, separate) = counting_alloc::fused_and_separate(held);
    assert!(fused < output_bytes + activation_bytes / 8, "swiglu fused: {:.2} MiB held, the output is {:.2} MiB", mib(fused), mib(output_bytes));
    assert!(separate >= output_bytes + activation_bytes, "swiglu separate: {:.2} MiB held", mib(separate));

    // LoRA on the activation: g and u held, the activation recomputed in backward.
    let (a, bm) = (Var::from_tensor(&Tensor::randn(0f32, 0.1, (4, d_in), &Device::Cpu).unwrap()).unwrap(), Var::from_tensor(&Tensor::randn(0f32, 0.1, (d_out, 4), &Device::Cpu).unwrap()).unwrap());
    let held = |fused: bool| {
        let forward = || match fused {
            true => candle_peft::ops::swiglu_lora_linear(g.as_tensor(), u.as_tensor(), &w, (a.as_tensor(), bm.as_tensor()), 2.0, None).unwrap(),
            false => candle_peft::ops::lora_linear(&swiglu(g.as_tensor(), u.as_tensor(), true).unwrap(), &w, a.as_tensor(), bm.as_tensor(), 2.0, None).unwrap(),
        };
        counting_alloc::held_for_backward(forward, &[g.as_tensor(), a.as_tensor(), bm.as_tensor()])
    };
    let (fused, separate) = counting_alloc::fused_and_separate(held);
    // Both keep the output and the [t, 4] intermediate; the op keeps A and B in one argument
    // besides (17 KiB here): the activation (128 KiB) is what tells them apart.
    assert!(fused < output_bytes + activation_bytes / 2, "swiglu lora: {:.2} MiB held, the output is {:.2} MiB", mib(fused), mib(output_bytes));
    assert!(separate >= output_bytes + activation_bytes, "swiglu lora separate: {:.2} MiB held", mib(separate));
}

//! With dropout, the fused LoRA and DoRA linears keep nothing more from forward to backward
//! than without it: the mask and drop(x) are drawn again from the mask's seed in backward
//! (PEFT keeps both, a [T, in] tensor each). This test binary counts heap bytes in its
//! allocator, so it holds this one test.

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use candle_core::{Device, Tensor, Var};
use candle_peft::ops::dropout::DropoutMask;
use candle_peft::ops::{dora_linear, lora_linear};
use candle_peft::quant::BaseWeight;

#[test]
fn dropout_adds_nothing_to_what_the_fused_linears_keep_for_backward() {
    let (t, d_in, d_out, r) = (512, 1024, 64, 8);
    let randn = |shape: &[usize], std: f32| Tensor::randn(0f32, std, shape, &Device::Cpu).unwrap();
    let x = Var::from_tensor(&randn(&[t, d_in], 1.0)).unwrap();
    let w: BaseWeight = randn(&[d_out, d_in], 0.05).into();
    let a = Var::from_tensor(&randn(&[r, d_in], 0.05)).unwrap();
    let b = Var::from_tensor(&randn(&[d_out, r], 0.05)).unwrap();
    let k = Var::from_tensor(&(randn(&[d_out], 0.1) + 1.0).unwrap()).unwrap();
    let input_bytes = t * d_in * 4;
    for dora in [false, true] {
        // Live bytes between forward and backward, and the loss's gradients once backward ran.
        let kept = |mask: Option<DropoutMask>| {
            let before = counting_alloc::live();
            let y = match dora {
                true => dora_linear(x.as_tensor(), &w, a.as_tensor(), b.as_tensor(), k.as_tensor(), 2.0, mask),
                false => lora_linear(x.as_tensor(), &w, a.as_tensor(), b.as_tensor(), 2.0, mask),
            }
            .unwrap();
            let loss = y.sqr().unwrap().sum_all().unwrap();
            let held = counting_alloc::live() - before;
            let grads = loss.backward().unwrap();
            let dx = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (held, dx)
        };
        let (plain, dx_plain) = kept(None);
        let (dropped, dx_dropped) = kept(Some(DropoutMask { seed: 11, keep: 0.5 }));
        let mib = |b: usize| b as f64 / 1048576.0;
        assert!(
            dropped < plain + input_bytes / 8,
            "dora {dora}: kept {:.2} MiB with dropout, {:.2} MiB without; one [T, in] tensor is {:.2} MiB",
            mib(dropped),
            mib(plain),
            mib(input_bytes)
        );
        // The mask did act, in backward too: about half of dx's columns' contributions differ.
        let differ = dx_plain.iter().zip(&dx_dropped).filter(|(p, d)| (*p - *d).abs() > 1e-6).count();
        assert!(differ > dx_plain.len() / 4, "dora {dora}: dropout changed {differ} of {} dx entries", dx_plain.len());
    }
}

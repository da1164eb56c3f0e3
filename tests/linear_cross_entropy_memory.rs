//! The blockwise loss holds less than one copy of the [n, vocab] logits at any time over forward
//! and backward, where the logits-then-loss graph holds at least two (the logits and their
//! gradient). This test binary counts heap bytes in its allocator, so it holds this one test.
//! The logits are large (64 MiB) beside the per-call scratch of the CPU GEMM, which grows with
//! the host's caches (about 9 MiB on a 105 MiB L3) and not with the rows.

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use candle_core::{Device, Tensor, Var};
use candle_peft::ops::nn::matmul_t;
use candle_peft::model::linear_cross_entropy::linear_cross_entropy_in_blocks;
use candle_peft::ops::nn::cross_entropy;

/// Peak heap bytes over what was live before, across `f`.
fn peak_over(f: impl FnOnce()) -> usize {
    let before = counting_alloc::live();
    counting_alloc::reset_peak();
    f();
    counting_alloc::peak() - before
}

#[test]
fn the_blockwise_loss_never_holds_the_whole_logits() {
    let (n, vocab, width) = (2048, 8192, 32);
    let hidden = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, width), &Device::Cpu).unwrap()).unwrap();
    let head = Tensor::randn(0f32, 0.3, (vocab, width), &Device::Cpu).unwrap();
    let labels = Tensor::from_vec((0..n).map(|i| (i * 31 % vocab) as i64).collect::<Vec<_>>(), n, &Device::Cpu).unwrap();
    let logits_bytes = n * vocab * 4;
    let blockwise = peak_over(|| {
        let loss = linear_cross_entropy_in_blocks(hidden.as_tensor(), &head, &labels, vocab * 32).unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(hidden.as_tensor()).is_some());
    });
    let through_logits = peak_over(|| {
        let loss = cross_entropy(&matmul_t(hidden.as_tensor(), &head).unwrap(), &labels).unwrap();
        let grads = loss.backward().unwrap();
        assert!(grads.get(hidden.as_tensor()).is_some());
    });
    let mib = |b: usize| b as f64 / 1048576.0;
    assert!(
        blockwise < logits_bytes / 2,
        "blockwise: peak {:.1} MiB, one copy of the logits is {:.1} MiB",
        mib(blockwise),
        mib(logits_bytes)
    );
    // The comparison is meaningful only if the old composition does hold the logits.
    assert!(through_logits >= 2 * logits_bytes, "through the logits: peak {:.1} MiB", mib(through_logits));
}

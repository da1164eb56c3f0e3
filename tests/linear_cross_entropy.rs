//! The blockwise loss from hidden states (`model::linear_cross_entropy`) against the logits-then-
//! loss composition it replaces in training: same loss, same gradient of the hidden states, for
//! one block, many blocks and blocks of one row, with ignored rows, on the fused CPU path (f64,
//! f32) and on the generic one (bf16); and bad labels are errors that name the row.

mod common;

use common::max_diff;

use candle_core::{DType, Device, Tensor, Var};
use candle_peft::ops::nn::matmul_t;
use candle_peft::model::linear_cross_entropy::{linear_cross_entropy, linear_cross_entropy_in_blocks};
use candle_peft::ops::nn::cross_entropy;

/// (loss, d loss / d hidden) through the logits, as training computed it before.
fn through_logits(hidden: &Var, head: &Tensor, labels: &Tensor, scale: f64) -> (f64, Tensor) {
    let acc = if hidden.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let logits = matmul_t(hidden.as_tensor(), head).unwrap().to_dtype(acc).unwrap();
    let loss = cross_entropy(&logits, labels).unwrap();
    let grad = (&loss * scale).unwrap().backward().unwrap().get(hidden.as_tensor()).unwrap().clone();
    (loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(), grad)
}

fn blockwise(hidden: &Var, head: &Tensor, labels: &Tensor, block_logits: usize, scale: f64) -> (f64, Tensor) {
    let loss = linear_cross_entropy_in_blocks(hidden.as_tensor(), head, labels, block_logits).unwrap();
    let grad = (&loss * scale).unwrap().backward().unwrap().get(hidden.as_tensor()).unwrap().clone();
    (loss.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap(), grad)
}

fn case(dtype: DType, n: usize, vocab: usize, width: usize) -> (Var, Tensor, Tensor) {
    let hidden = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, width), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()).unwrap();
    let head = Tensor::randn(0f32, 0.5, (vocab, width), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
    let labels: Vec<i64> = (0..n).map(|i| if i % 4 == 1 { -100 } else { ((i * 7919) % vocab) as i64 }).collect();
    (hidden, head, Tensor::new(labels.as_slice(), &Device::Cpu).unwrap())
}

#[test]
fn equals_the_loss_through_the_logits_for_any_block_size() {
    let (n, vocab, width) = (13, 37, 9);
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-6)] {
        let (hidden, head, labels) = case(dtype, n, vocab, width);
        let (loss0, grad0) = through_logits(&hidden, &head, &labels, 0.7);
        // Whole, 4 rows a block (the last one shorter), one row a block, and a block smaller
        // than one row (still one row).
        for block in [n * vocab, 4 * vocab, vocab, 5] {
            let (loss, grad) = blockwise(&hidden, &head, &labels, block, 0.7);
            assert!((loss - loss0).abs() < tol * loss0.abs().max(1.0), "{dtype:?} block {block}: {loss} vs {loss0}");
            let d = max_diff(&grad, &grad0);
            assert!(d < tol, "{dtype:?} block {block}: gradient differs by {d}");
            assert_eq!(grad.dtype(), dtype);
        }
        // Ignored rows get no gradient.
        let (_, grad) = blockwise(&hidden, &head, &labels, 4 * vocab, 1.0);
        assert_eq!(grad.narrow(0, 1, 1).unwrap().abs().unwrap().to_dtype(DType::F64).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap(), 0.0);
    }
}

#[test]
fn bf16_takes_the_generic_path_and_agrees() {
    let (hidden, head, labels) = case(DType::BF16, 11, 29, 8);
    let (loss0, grad0) = through_logits(&hidden, &head, &labels, 1.0);
    let (loss, grad) = blockwise(&hidden, &head, &labels, 3 * 29, 1.0);
    assert!((loss - loss0).abs() < 1e-5 * loss0.abs(), "{loss} vs {loss0}");
    // Both round dlogits and the product to bf16; the sums differ in order only.
    let scale = max_diff(&grad0, &grad0.zeros_like().unwrap());
    assert!(max_diff(&grad, &grad0) <= 0.02 * scale, "{} vs scale {scale}", max_diff(&grad, &grad0));
    assert_eq!(grad.dtype(), DType::BF16);
}

#[test]
fn without_a_graph_it_gives_the_loss_only() {
    let (hidden, head, labels) = case(DType::F64, 7, 19, 5);
    let (loss0, _) = through_logits(&hidden, &head, &labels, 1.0);
    let loss = linear_cross_entropy(&hidden.as_tensor().detach(), &head, &labels).unwrap();
    assert!((loss.to_scalar::<f64>().unwrap() - loss0).abs() < 1e-12);
}

#[test]
fn bad_labels_are_errors_that_name_the_row() {
    let (hidden, head, _) = case(DType::F32, 3, 10, 4);
    let e = linear_cross_entropy(hidden.as_tensor(), &head, &Tensor::new(&[1i64, 10, 2], &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("label 10 at row 1") && e.contains("vocabulary of 10"), "{e}");
    let e = linear_cross_entropy(hidden.as_tensor(), &head, &Tensor::new(&[1i64, -3, 2], &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("label -3 at row 1"), "{e}");
    let e = linear_cross_entropy(hidden.as_tensor(), &head, &Tensor::new(&[-100i64, -100, -100], &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("nothing to learn from"), "{e}");
    let e = linear_cross_entropy(hidden.as_tensor(), &head, &Tensor::new(&[1i64, 2], &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(e.contains("3 rows") && e.contains("2 labels"), "{e}");
}

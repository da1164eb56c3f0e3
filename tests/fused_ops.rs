//! The fused CPU ops against the plain candle compositions they replace: same values, same
//! gradients (f64, random inputs, odd sizes, ignored labels).

use candle_core::{DType, Device, Tensor, Var};
use candle_peft::model::ops::{cross_entropy, cross_entropy_sum_reference, softmax_last_dim, softmax_last_dim_reference};

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn fused_softmax_equals_reference_with_gradients() {
    let x = Var::from_tensor(&(Tensor::randn(0f64, 3.0, (2, 3, 5, 7), &Device::Cpu).unwrap())).unwrap();
    let w = Tensor::randn(0f64, 1.0, (2, 3, 5, 7), &Device::Cpu).unwrap();
    let fused = softmax_last_dim(x.as_tensor(), true).unwrap();
    let reference = softmax_last_dim_reference(x.as_tensor()).unwrap();
    assert!(max_diff(&fused, &reference) < 1e-12);
    let g1 = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
    let g2 = (reference * &w).unwrap().sum_all().unwrap().backward().unwrap().get(x.as_tensor()).unwrap().clone();
    assert!(max_diff(&g1, &g2) < 1e-12, "{}", max_diff(&g1, &g2));
}

#[test]
fn fused_cross_entropy_equals_reference_with_gradients() {
    let logits = Var::from_tensor(&Tensor::randn(0f64, 2.0, (6, 11), &Device::Cpu).unwrap()).unwrap();
    let labels = Tensor::new(&[3i64, -100, 0, 10, -100, 7], &Device::Cpu).unwrap();
    let fused = cross_entropy(logits.as_tensor(), &labels).unwrap();
    let reference = (cross_entropy_sum_reference(logits.as_tensor(), &labels).unwrap() / 4.0).unwrap();
    assert!(max_diff(&fused, &reference) < 1e-12);
    let g1 = fused.backward().unwrap().get(logits.as_tensor()).unwrap().clone();
    let g2 = reference.backward().unwrap().get(logits.as_tensor()).unwrap().clone();
    assert!(max_diff(&g1, &g2) < 1e-12, "{}", max_diff(&g1, &g2));
    // Ignored rows get no gradient.
    let row1 = g1.narrow(0, 1, 1).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    assert_eq!(row1, 0.0);
    assert_eq!(fused.dtype(), DType::F64);
}

#[test]
fn a_label_outside_the_vocabulary_is_an_error() {
    let logits = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let labels = Tensor::new(&[1i64, 9], &Device::Cpu).unwrap();
    let e = cross_entropy(&logits, &labels).unwrap_err().to_string();
    assert!(e.contains("label 9"), "{e}");
}

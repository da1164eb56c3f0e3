//! The fused CPU ops against the plain candle compositions they replace: same values, same
//! gradients (f64, random inputs, odd sizes, ignored labels, padding, grouped-query heads), and
//! the fused gradients against central finite differences.

mod common;

use common::max_diff;

use candle_core::{DType, Device, Tensor, Var};
use candle_peft::ops::nn::{
    attention, attention_bias, attention_reference, cross_entropy, cross_entropy_sum_reference, frozen_matmul_t, frozen_matmul_t_add, rms_norm,
    rms_norm_reference, frozen_matmul_t_heads, swiglu_frozen_matmul_t_add, AttentionHeads, softmax_last_dim, softmax_last_dim_reference, swiglu, swiglu_reference,
};

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

fn randn(shape: &[usize], std: f64) -> Var {
    Var::from_tensor(&Tensor::randn(0f64, std, shape, &Device::Cpu).unwrap()).unwrap()
}

/// `Σ f(inputs) ⊙ w` for a fixed random w: a scalar whose gradient is a random projection of
/// the op's Jacobian.
fn project(y: &Tensor, w: &Tensor) -> Tensor {
    (y * w).unwrap().sum_all().unwrap()
}

/// The fused op (`fused`) and the composition (`reference`) of the same inputs: equal values
/// and equal gradients for every input, and the fused gradients equal to central differences
/// on a few entries of each input.
fn check(inputs: &[&Var], fused: impl Fn(&[Tensor]) -> Tensor, reference: impl Fn(&[Tensor]) -> Tensor, tol: f64) {
    let xs: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let (yf, yr) = (fused(&xs), reference(&xs));
    assert_eq!(yf.dims(), yr.dims());
    assert!(max_diff(&yf, &yr) < tol, "values differ by {}", max_diff(&yf, &yr));
    let w = Tensor::randn(0f64, 1.0, yf.shape(), &Device::Cpu).unwrap();
    let gf = project(&yf, &w).backward().unwrap();
    let gr = project(&yr, &w).backward().unwrap();
    for (i, v) in inputs.iter().enumerate() {
        let (a, b) = (gf.get(v.as_tensor()).expect("fused gradient"), gr.get(v.as_tensor()).expect("reference gradient"));
        assert!(max_diff(a, b) < tol, "input {i}: gradients differ by {}", max_diff(a, b));
        let a = a.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let n = a.len();
        for idx in [0, n / 3, n / 2, n - 1] {
            let eps = 1e-6;
            let eval = |delta: f64| {
                let xs: Vec<Tensor> = xs
                    .iter()
                    .enumerate()
                    .map(|(j, x)| {
                        if j != i {
                            return x.clone();
                        }
                        let mut d = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                        d[idx] += delta;
                        Tensor::from_vec(d, x.shape(), &Device::Cpu).unwrap()
                    })
                    .collect();
                project(&fused(&xs), &w).to_scalar::<f64>().unwrap()
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            assert!((numeric - a[idx]).abs() < 1e-6 * (1.0 + a[idx].abs()), "input {i}[{idx}]: analytic {}, numeric {numeric}", a[idx]);
        }
    }
}

#[test]
fn fused_rms_norm_equals_reference_with_gradients() {
    let (x, w) = (randn(&[2, 5, 7], 2.0), randn(&[7], 1.0));
    check(&[&x, &w], |t| rms_norm(&t[0], &t[1], 1e-5, true).unwrap(), |t| rms_norm_reference(&t[0], &t[1], 1e-5).unwrap(), 1e-12);
}

#[test]
fn fused_swiglu_equals_reference_with_gradients() {
    let (g, u) = (randn(&[3, 4, 6], 3.0), randn(&[3, 4, 6], 1.0));
    check(&[&g, &u], |t| swiglu(&t[0], &t[1], true).unwrap(), |t| swiglu_reference(&t[0], &t[1]).unwrap(), 1e-12);
}

/// cos/sin tables [b, 1, t, d/2] of arbitrary angles.
fn rope_tables(b: usize, t: usize, half: usize) -> (Tensor, Tensor) {
    let angles = Tensor::randn(0f64, 2.0, (b, 1, t, half), &Device::Cpu).unwrap();
    (angles.cos().unwrap(), angles.sin().unwrap())
}

#[test]
fn fused_heads_split_equals_reference_with_gradients() {
    let (b, t, n, d) = (2, 5, 3, 6);
    let x = randn(&[b, t, n * d], 1.0);
    let (cos, sin) = rope_tables(b, t, d / 2);
    for heads in [AttentionHeads::rotated(n, &cos, &sin), AttentionHeads::plain(n)] {
        check(&[&x], |t| heads.split(&t[0], true).unwrap(), |t| heads.split_reference(&t[0]).unwrap(), 1e-12);
    }
    let err = AttentionHeads::plain(4).split(x.as_tensor(), true).unwrap_err().to_string();
    assert!(err.contains("width 18 is not 4 heads"), "{err}");
    let (short_cos, short_sin) = rope_tables(b, t - 1, d / 2);
    let err = AttentionHeads::rotated(n, &short_cos, &short_sin).split(x.as_tensor(), true).unwrap_err().to_string();
    assert!(err.contains("cos [2, 1, 4, 3]"), "{err}");
}

/// The projections that split their output into heads inside their op (q, k, v in training)
/// against the split of the plain composition's output.
#[test]
fn projections_into_heads_equal_the_split_of_their_output_with_gradients() {
    use candle_peft::ops::dropout::DropoutMask;
    use candle_peft::ops::{dora_linear, dora_linear_heads, lora_linear_heads};
    use candle_peft::ops::nn::matmul_t;
    let (b, t, n, d, d_in, r, s) = (2, 5, 3, 6, 7, 2, 1.5);
    let (x, a, bm) = (randn(&[b, t, d_in], 1.0), randn(&[r, d_in], 0.5), randn(&[n * d, r], 0.5));
    let k = Var::from_tensor(&(Tensor::randn(0f64, 0.2, n * d, &Device::Cpu).unwrap() + 1.0).unwrap()).unwrap();
    let w = Tensor::randn(0f64, 0.5, (n * d, d_in), &Device::Cpu).unwrap();
    let mask = DropoutMask { seed: 7, keep: 0.8 };
    let (cos, sin) = rope_tables(b, t, d / 2);
    for heads in [AttentionHeads::rotated(n, &cos, &sin), AttentionHeads::plain(n)] {
        check(
            &[&x],
            |v| frozen_matmul_t_heads(&v[0], &w.clone().into(), heads, true).unwrap(),
            |v| heads.split_reference(&matmul_t(&v[0], &w).unwrap()).unwrap(),
            1e-12,
        );
        let lora_reference = |v: &[Tensor]| {
            let dropped = (&v[0] * mask.tensor(&v[0]).unwrap()).unwrap();
            let branch = matmul_t(&matmul_t(&dropped, &v[1]).unwrap(), &v[2]).unwrap();
            heads.split_reference(&(matmul_t(&v[0], &w).unwrap() + (branch * s).unwrap()).unwrap()).unwrap()
        };
        check(
            &[&x, &a, &bm],
            |v| lora_linear_heads(&v[0], &w.clone().into(), (&v[1], &v[2]), s, Some(mask), heads).unwrap(),
            lora_reference,
            1e-12,
        );
        check(
            &[&x, &a, &bm, &k],
            |v| dora_linear_heads(&v[0], &w.clone().into(), (&v[1], &v[2], &v[3]), s, Some(mask), heads).unwrap(),
            |v| heads.split_reference(&dora_linear(&v[0], &w.clone().into(), &v[1], &v[2], &v[3], s, Some(mask)).unwrap()).unwrap(),
            1e-12,
        );
    }
}

#[test]
fn fused_attention_equals_reference_with_gradients() {
    // Grouped-query (6 query heads on 2 key/value heads), one row left-padded by 3, one row
    // with a pad in the middle: padding queries attend to themselves only.
    let (b, h, g, t, d) = (2, 6, 2, 7, 4);
    let mask = vec![vec![0, 0, 0, 1, 1, 1, 1], vec![1, 1, 0, 1, 1, 1, 1]];
    let bias = attention_bias(&mask, t, DType::F64, &Device::Cpu).unwrap();
    let (q, k, v) = (randn(&[b, h, t, d], 1.5), randn(&[b, g, t, d], 1.5), randn(&[b, g, t, d], 1.0));
    check(
        &[&q, &k, &v],
        |x| attention(&x[0], &x[1], &x[2], &bias, true).unwrap(),
        |x| attention_reference(&x[0], &x[1], &x[2], &bias).unwrap(),
        1e-12,
    );
    // Without groups too.
    let (k, v) = (randn(&[b, h, t, d], 1.0), randn(&[b, h, t, d], 1.0));
    check(
        &[&q, &k, &v],
        |x| attention(&x[0], &x[1], &x[2], &bias, true).unwrap(),
        |x| attention_reference(&x[0], &x[1], &x[2], &bias).unwrap(),
        1e-12,
    );
}

#[test]
fn fused_attention_in_f32_matches_the_f64_reference() {
    let (b, h, g, t, d) = (1, 4, 2, 9, 8);
    let mask = vec![vec![0, 0, 1, 1, 1, 1, 1, 1, 1]];
    let bias = attention_bias(&mask, t, DType::F32, &Device::Cpu).unwrap();
    let (q, k, v) = (randn(&[b, h, t, d], 1.0), randn(&[b, g, t, d], 1.0), randn(&[b, g, t, d], 1.0));
    let f32s = |v: &Var| v.as_tensor().to_dtype(DType::F32).unwrap();
    let y32 = attention(&f32s(&q), &f32s(&k), &f32s(&v), &bias, true).unwrap().to_dtype(DType::F64).unwrap();
    let y64 = attention_reference(q.as_tensor(), k.as_tensor(), v.as_tensor(), &bias.to_dtype(DType::F64).unwrap()).unwrap();
    assert!(max_diff(&y32, &y64) < 1e-5, "{}", max_diff(&y32, &y64));
}

#[test]
fn frozen_matmul_equals_matmul_and_gives_no_weight_gradient() {
    let x = randn(&[2, 3, 5], 1.0);
    let w = Tensor::randn(0f64, 1.0, (4, 5), &Device::Cpu).unwrap();
    check(
        &[&x],
        |t| frozen_matmul_t(&t[0], &w.clone().into()).unwrap(),
        |t| candle_peft::ops::nn::matmul_t(&t[0], &w).unwrap(),
        1e-12,
    );
    let grads = frozen_matmul_t(x.as_tensor(), &w.clone().into()).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&w).is_none(), "no gradient is computed for the frozen weight");
}

#[test]
fn frozen_matmul_into_the_residual_equals_the_add_with_gradients() {
    let (x, residual) = (randn(&[2, 3, 5], 1.0), randn(&[2, 3, 4], 1.0));
    let w = Tensor::randn(0f64, 1.0, (4, 5), &Device::Cpu).unwrap();
    check(
        &[&x, &residual],
        |t| frozen_matmul_t_add(&t[0], &w.clone().into(), &t[1]).unwrap(),
        |t| (&t[1] + candle_peft::ops::nn::matmul_t(&t[0], &w).unwrap()).unwrap(),
        1e-12,
    );
    let bad = Tensor::zeros((2, 3, 5), DType::F64, &Device::Cpu).unwrap();
    let err = frozen_matmul_t_add(x.as_tensor(), &w.clone().into(), &bad).unwrap_err().to_string();
    assert!(err.contains("residual"), "{err}");
}

#[test]
fn swiglu_into_the_frozen_projection_and_residual_equals_the_composition_with_gradients() {
    let (g, u, residual) = (randn(&[2, 3, 6], 2.0), randn(&[2, 3, 6], 1.0), randn(&[2, 3, 4], 1.0));
    let w = Tensor::randn(0f64, 1.0, (4, 6), &Device::Cpu).unwrap();
    check(
        &[&g, &u, &residual],
        |t| swiglu_frozen_matmul_t_add(&t[0], &t[1], &w.clone().into(), &t[2], true).unwrap(),
        |t| (&t[2] + candle_peft::ops::nn::matmul_t(&swiglu_reference(&t[0], &t[1]).unwrap(), &w).unwrap()).unwrap(),
        1e-12,
    );
    let bad = Tensor::zeros((2, 3, 5), DType::F64, &Device::Cpu).unwrap();
    let err = swiglu_frozen_matmul_t_add(g.as_tensor(), u.as_tensor(), &w.clone().into(), &bad, true).unwrap_err().to_string();
    assert!(err.contains("residual"), "{err}");
}

#[test]
fn lora_of_the_swiglu_activation_equals_the_composition_with_gradients() {
    use candle_peft::ops::dropout::DropoutMask;
    use candle_peft::ops::swiglu_lora_linear;
    use candle_peft::ops::nn::matmul_t;
    let (g, u) = (randn(&[2, 3, 6], 2.0), randn(&[2, 3, 6], 1.0));
    let (a, b) = (randn(&[2, 6], 0.5), randn(&[4, 2], 0.5));
    let w = Tensor::randn(0f64, 1.0, (4, 6), &Device::Cpu).unwrap();
    let mask = DropoutMask { seed: 11, keep: 0.8 };
    let reference = |t: &[Tensor]| {
        let x = swiglu_reference(&t[0], &t[1]).unwrap();
        let dropped = (&x * mask.tensor(&x).unwrap()).unwrap();
        let branch = matmul_t(&matmul_t(&dropped, &t[2]).unwrap(), &t[3]).unwrap();
        (matmul_t(&x, &w).unwrap() + (branch * 1.5).unwrap()).unwrap()
    };
    check(
        &[&g, &u, &a, &b],
        |t| swiglu_lora_linear(&t[0], &t[1], &w.clone().into(), (&t[2], &t[3]), 1.5, Some(mask)).unwrap(),
        reference,
        1e-12,
    );
    let err = swiglu_lora_linear(g.as_tensor(), a.as_tensor(), &w.clone().into(), (a.as_tensor(), b.as_tensor()), 1.5, None).unwrap_err().to_string();
    assert!(err.contains("gate [2, 3, 6] and up [2, 6] differ"), "{err}");
}

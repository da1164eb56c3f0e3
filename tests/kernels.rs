//! The fused ops' CPU references (src/ops/) against the unfused candle computations they
//! replace: same values and same gradients, on odd sizes (no multiple of any tile), with and
//! without dropout masks. `candle-peft selftest` checks the CUDA kernels against these references.

mod common;

use common::max_diff;

use candle_core::{DType, Device, Tensor, Var};
use candle_peft::ops::dropout::DropoutMask;
use candle_peft::ops::lowrank_add::Factor;
use candle_peft::ops::{control_branch, dora_linear, lora_linear, lowrank_add, row_norms};

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f64, 1.0, shape, &Device::Cpu).unwrap()
}

/// A dropout mask with keep probability 0.8, already divided by 0.8.
fn mask(shape: &[usize]) -> Tensor {
    let u = Tensor::rand(0f64, 1.0, shape, &Device::Cpu).unwrap();
    (u.lt(0.8).unwrap().to_dtype(DType::F64).unwrap() / 0.8).unwrap()
}

fn xwt(x: &Tensor, w: &Tensor) -> Tensor {
    x.matmul(&w.t().unwrap()).unwrap()
}

#[test]
fn lowrank_add_matches_the_dense_product_for_both_factor_layouts() {
    let (rows, cols, r) = (67, 45, 5);
    let z = randn(&[rows, r]);
    for (factor, m) in [(Factor::Rows, randn(&[cols, r])), (Factor::Transposed, randn(&[r, cols]))] {
        let dense_m = if factor == Factor::Rows { m.clone() } else { m.t().unwrap() };
        for with_mask in [false, true] {
            let base = randn(&[rows, cols]);
            let mk = with_mask.then(|| mask(&[rows, cols]));
            let mut expected = (xwt(&z, &dense_m) * 1.7).unwrap();
            if let Some(mk) = &mk {
                expected = (expected * mk).unwrap();
            }
            let expected = (&base + expected).unwrap();
            let out = base.copy().unwrap();
            lowrank_add(&out, &z, &m, factor, mk.as_ref(), 1.7).unwrap();
            assert!(max_diff(&out, &expected) < 1e-12, "{factor:?} mask {with_mask}: {}", max_diff(&out, &expected));
        }
    }
}

#[test]
fn lowrank_add_rejects_factors_that_do_not_fit() {
    let out = Tensor::zeros((4, 6), DType::F32, &Device::Cpu).unwrap();
    let z = Tensor::zeros((4, 2), DType::F32, &Device::Cpu).unwrap();
    let m = Tensor::zeros((2, 6), DType::F32, &Device::Cpu).unwrap();
    let e = lowrank_add(&out, &z, &m, Factor::Rows, None, 1.0).unwrap_err().to_string();
    assert!(e.contains("do not fit"), "{e}");
}

#[test]
fn row_norms_equal_the_norms_of_the_materialised_weight() {
    let (rows, cols, r) = (37, 53, 7);
    let (w, b, a) = (randn(&[rows, cols]), randn(&[rows, r]), randn(&[r, cols]));
    let got = row_norms(&w, &b, &a, 0.6).unwrap();
    assert_eq!(got.dtype(), DType::F32);
    let v = (&w + (b.matmul(&a).unwrap() * 0.6).unwrap()).unwrap();
    let expected = v.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
    let diff = max_diff(&got.to_dtype(DType::F64).unwrap(), &expected);
    let scale = expected.max(0).unwrap().to_scalar::<f64>().unwrap();
    assert!(diff / scale < 1e-6, "{diff}");
}

/// The fused LoRA linear against `x Wᵀ + s · (drop(x) Aᵀ) Bᵀ` in plain candle ops, or with `dora`
/// the fused DoRA linear against PEFT's `x Wᵀ + (k − 1) ⊙ (drop(x) Wᵀ) + k ⊙ s · (drop(x) Aᵀ) Bᵀ`:
/// the output and the gradients of x, A, B (and k).
fn check_adapter_linear(dora: bool, with_mask: bool) {
    let (b, t, d_in, d_out, r, s) = (2, 19, 33, 27, 6, 1.9);
    let x = Var::from_tensor(&randn(&[b, t, d_in])).unwrap();
    let w = randn(&[d_out, d_in]);
    let a = Var::from_tensor(&randn(&[r, d_in])).unwrap();
    let bb = Var::from_tensor(&randn(&[d_out, r])).unwrap();
    let k = Var::from_tensor(&((randn(&[d_out]) * 0.3).unwrap() + 1.0).unwrap()).unwrap();
    // The fused ops draw the mask from its seed, in forward and again in backward.
    let dm = with_mask.then_some(DropoutMask { seed: 0x5eed, keep: 0.8 });
    let mk = dm.map(|m| m.tensor(x.as_tensor()).unwrap());
    let weights = randn(&[b, t, d_out]);

    let fused = match dora {
        true => dora_linear(x.as_tensor(), &w.clone().into(), a.as_tensor(), bb.as_tensor(), k.as_tensor(), s, dm),
        false => lora_linear(x.as_tensor(), &w.clone().into(), a.as_tensor(), bb.as_tensor(), s, dm),
    }
    .unwrap();
    let xd = match &mk {
        Some(m) => (x.as_tensor() * m).unwrap(),
        None => x.as_tensor().clone(),
    };
    let x2 = x.as_tensor().reshape((b * t, d_in)).unwrap();
    let xd2 = xd.reshape((b * t, d_in)).unwrap();
    let branch = (xwt(&xwt(&xd2, a.as_tensor()), bb.as_tensor()) * s).unwrap();
    let unfused = if dora {
        let k2 = k.as_tensor().unsqueeze(0).unwrap();
        let correction = xwt(&xd2, &w).broadcast_mul(&(&k2 - 1.0).unwrap()).unwrap();
        ((xwt(&x2, &w) + correction).unwrap() + branch.broadcast_mul(&k2).unwrap()).unwrap()
    } else {
        (xwt(&x2, &w) + branch).unwrap()
    };
    let unfused = unfused.reshape((b, t, d_out)).unwrap();
    assert!(max_diff(&fused, &unfused) < 1e-10, "forward: {}", max_diff(&fused, &unfused));

    let g_fused = (fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    let g_unfused = (unfused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    let inputs = [("x", &x), ("A", &a), ("B", &bb), ("k", &k)];
    for (name, v) in &inputs[..if dora { 4 } else { 3 }] {
        let (gf, gu) = (g_fused.get(v.as_tensor()).unwrap(), g_unfused.get(v.as_tensor()).unwrap());
        assert!(max_diff(gf, gu) < 1e-10, "d{name} (dora {dora}, mask {with_mask}): {}", max_diff(gf, gu));
    }
}

#[test]
fn fused_lora_linear_equals_the_unfused_graph_with_gradients() {
    check_adapter_linear(false, false);
}

#[test]
fn fused_lora_linear_with_dropout_equals_the_unfused_graph_with_gradients() {
    check_adapter_linear(false, true);
}

#[test]
fn fused_dora_linear_equals_the_unfused_graph_with_gradients() {
    check_adapter_linear(true, false);
}

#[test]
fn fused_dora_linear_with_dropout_equals_the_unfused_graph_with_gradients() {
    check_adapter_linear(true, true);
}

#[test]
fn fused_control_branch_equals_the_unfused_graph_with_gradients() {
    let (b, t, d, r, alpha) = (3, 11, 29, 5, 0.7);
    let base = Var::from_tensor(&randn(&[b, t, d])).unwrap();
    let z = Var::from_tensor(&randn(&[b, t, r])).unwrap();
    let bb = Var::from_tensor(&randn(&[d, r])).unwrap();
    let weights = randn(&[b, t, d]);
    let fused = control_branch(base.as_tensor(), z.as_tensor(), bb.as_tensor(), alpha).unwrap();
    let z2 = z.as_tensor().reshape((b * t, r)).unwrap();
    let branch = (xwt(&z2, bb.as_tensor()) * alpha).unwrap().reshape((b, t, d)).unwrap();
    let unfused = (base.as_tensor() + branch).unwrap();
    assert!(max_diff(&fused, &unfused) < 1e-12);
    let g_fused = (fused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    let g_unfused = (unfused * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in [("base", &base), ("z", &z), ("B", &bb)] {
        let (gf, gu) = (g_fused.get(v.as_tensor()).unwrap(), g_unfused.get(v.as_tensor()).unwrap());
        assert!(max_diff(gf, gu) < 1e-11, "d{name}: {}", max_diff(gf, gu));
    }
}

#[test]
fn fused_ops_keep_the_input_dtype() {
    let x = Tensor::randn(0f32, 1.0, (5, 8), &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
    let w = Tensor::randn(0f32, 1.0, (4, 8), &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
    let a = Tensor::randn(0f32, 1.0, (2, 8), &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
    let b = Tensor::randn(0f32, 1.0, (4, 2), &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
    let y = lora_linear(&x, &w.clone().into(), &a, &b, 2.0, None).unwrap();
    assert_eq!((y.dtype(), y.dims()), (DType::BF16, &[5usize, 4][..]));
    let reference = (xwt(&x.to_dtype(DType::F32).unwrap(), &w.to_dtype(DType::F32).unwrap())
        + (xwt(&xwt(&x.to_dtype(DType::F32).unwrap(), &a.to_dtype(DType::F32).unwrap()), &b.to_dtype(DType::F32).unwrap()) * 2.0)
            .unwrap())
    .unwrap();
    let diff = (y.to_dtype(DType::F32).unwrap() - &reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff / scale < 1e-2, "bf16 relative error {}", diff / scale);
}

/// SNELL's fused branch (ΔW recomputed in backward from In, Out and the kept τ) against the
/// adapter's unfused branch (autograd through cdist, the quantile and the detached factor):
/// values and the gradients of x, In and Out, for KLoRA, a middle sparsity and two high ones
/// (those take the sparse apply, `ops::snell_sparse`).
#[test]
fn snell_branch_matches_the_unfused_branch_and_its_gradients() {
    use candle_peft::adapters::SnellLinear;
    use candle_peft::ops::snell::{kernel_delta, snell_branch, threshold, Sparsify};
    let (t, d_in, d_out, heads, k) = (13, 37, 29, 2, 5);
    for s in [0.0, 0.5, 0.95, 0.99] {
        let input = (randn(&[heads, d_in, k]) * 0.3).unwrap();
        let output = (randn(&[heads, d_out, k]) * 0.3).unwrap();
        let x = randn(&[t, d_in]);
        let weights = randn(&[t, d_out]);
        let layer = SnellLinear::from_parts(&input, &output, s).unwrap();
        let (lx, li, lo) = (Var::from_tensor(&x).unwrap(), layer.input.clone(), layer.output.clone());
        let tau = threshold(li.as_tensor(), lo.as_tensor(), s).unwrap();
        assert_eq!(tau, layer.threshold().unwrap());
        assert!(max_diff(&kernel_delta(li.as_tensor(), lo.as_tensor()).unwrap(), &layer.kernel_delta().unwrap()) < 1e-14);
        let fused = snell_branch(lx.as_tensor(), li.as_tensor(), lo.as_tensor(), Sparsify::from_sparsity(s)).unwrap();
        let given = snell_branch(lx.as_tensor(), li.as_tensor(), lo.as_tensor(), tau.map_or(Sparsify::Dense, Sparsify::Threshold)).unwrap();
        assert_eq!(max_diff(&fused, &given), 0.0);
        let plain = layer.branch(lx.as_tensor()).unwrap();
        assert!(max_diff(&fused, &plain) < 1e-12, "s = {s}: y differs by {}", max_diff(&fused, &plain));
        let grads = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let (gf, gp) = (grads(&fused), grads(&plain));
        for (name, v) in [("dx", lx.as_tensor()), ("dIn", li.as_tensor()), ("dOut", lo.as_tensor())] {
            let (a, b) = (gf.get(v).unwrap(), gp.get(v).unwrap());
            let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
            assert!(scale > 0.0, "s = {s}: {name} is zero");
            assert!(max_diff(a, b) <= 1e-11 * scale, "s = {s}: {name} differs by {} (scale {scale})", max_diff(a, b));
        }
    }
}

/// The fused branch with f32 activations and f32 factors (the CPU training dtype) within f32
/// rounding of the f64 computation on the same values.
#[test]
fn snell_branch_in_f32_is_within_rounding_of_f64() {
    use candle_peft::ops::snell::{snell_branch, threshold, Sparsify};
    let input = (randn(&[2, 41, 8]) * 0.2).unwrap();
    let output = (randn(&[2, 23, 8]) * 0.2).unwrap();
    let x = randn(&[9, 41]);
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap().to_dtype(DType::F64).unwrap();
    let (input, output, x) = (f32_of(&input), f32_of(&output), f32_of(&x));
    let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let tau32 = threshold(&f32s(&input), &f32s(&output), 0.0).unwrap();
    assert!(tau32.is_none());
    let y32 = snell_branch(&f32s(&x), &f32s(&input), &f32s(&output), Sparsify::Dense).unwrap();
    let y64 = snell_branch(&x, &input, &output, Sparsify::Dense).unwrap();
    let scale = y64.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    assert!(max_diff(&y32.to_dtype(DType::F64).unwrap(), &y64) < 1e-5 * scale);
}

/// The GPU threshold's selection logic, fed with histograms counted on the CPU: torch.quantile's
/// value exactly (the sort-free CPU quantile), with ties, zeros, a single value and edge q.
#[test]
fn radix_quantile_equals_the_exact_quantile() {
    use candle_peft::ops::snell_merge::quantile_f32;
    use candle_peft::ops::snell::{radix_quantile, RadixPass};
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(7);
    let random: Vec<f32> = (0..5000).map(|_| rng.random::<f32>() * 1e-3).collect();
    let ties: Vec<f32> = (0..3001).map(|i| [0.0f32, 1e-7, 2.5e-4, 2.5e-4, 3.0][i % 5]).collect();
    let coarse: Vec<f32> = (0..777).map(|_| (rng.random_range(0..4) as f32) * 0.125).collect();
    for values in [random, ties, coarse, vec![0.3f32]] {
        for q in [0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0] {
            let histogram = |p: RadixPass| {
                let mut h = vec![0u32; p.bins];
                for v in &values {
                    let u = v.to_bits();
                    if u & p.prefix_mask == p.prefix {
                        h[((u >> p.shift) as usize) & (p.bins - 1)] += 1;
                    }
                }
                Ok(h)
            };
            let min_above = |a: u32| Ok(values.iter().map(|v| v.to_bits()).filter(|&u| u > a).min().unwrap_or(u32::MAX));
            let got = radix_quantile(values.len(), q, histogram, min_above).unwrap();
            let want = quantile_f32(&values, q).unwrap();
            assert_eq!(got.to_bits(), want.to_bits(), "n = {}, q = {q}: {got} against {want}", values.len());
        }
    }
}

/// The memory rule for SNELL: nothing of the update's size [d_in, d_out] stays in the graph
/// between forward and backward (the fused op keeps only τ besides its inputs), where the plain ops
/// keep several (counted among the graph's nodes on the way to the variables).
#[test]
fn snell_branch_keeps_no_update_sized_tensor_for_backward() {
    use candle_peft::adapters::SnellLinear;
    use candle_peft::ops::snell::{snell_branch, Sparsify};
    let (t, d_in, d_out) = (8, 64, 48);
    let layer = SnellLinear::from_parts(&(randn(&[2, d_in, 16]) * 0.1).unwrap(), &(randn(&[2, d_out, 16]) * 0.1).unwrap(), 0.5).unwrap();
    let x = Var::from_tensor(&randn(&[t, d_in])).unwrap();
    let update_sized = |y: &Tensor| y.sorted_nodes().iter().filter(|g| g.elem_count() >= d_in * d_out).count();
    let (input, output) = (layer.input.as_tensor(), layer.output.as_tensor());
    let fused = snell_branch(x.as_tensor(), input, output, Sparsify::Quantile(0.5)).unwrap();
    assert_eq!(update_sized(&fused), 0);
    assert!(update_sized(&layer.branch(x.as_tensor()).unwrap()) >= 5);
}

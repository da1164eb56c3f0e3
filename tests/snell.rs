//! SNELL (docs/METHODS.md §3) on CPU: the kernel update and its sparsification against loops, gradients
//! against finite differences, torch.quantile's values, merge, save/load, training, bad input.

mod common;

use common::{batch, logits, loss_value, max_diff, save_and_reload, trainer};
use candle_core::{DType, Device, Tensor};
use candle_peft::ops::snell_merge::{quantile_f32, quantile_f64, sparsify};
use candle_peft::adapters::{inject, load_adapter, save_adapter, AdapterConfig, SnellConfig, SnellLinear, Targets};
use candle_peft::cli::{Cli, Command};
use candle_peft::hub::ModelSource;
use candle_peft::model::{FrozenLinear, Linear, LinearAdapter, Llama};
use clap::Parser;
use rand::{rngs::StdRng, Rng, SeedableRng};

const QV: [&str; 2] = ["q_proj", "v_proj"];
const ALL: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

fn targets(t: &[&str]) -> Targets {
    Targets::List(t.iter().map(|s| s.to_string()).collect())
}

fn snell(r: usize, sparsity: f64, t: &[&str]) -> AdapterConfig {
    AdapterConfig::new(SnellConfig { r, heads: 2, sparsity, target_modules: targets(t) })
}

fn rand_vec(n: usize, scale: f64, rng: &mut StdRng) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn tensor(data: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(data.to_vec(), shape, &Device::Cpu).unwrap()
}

fn vec_of(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// torch.quantile by a full sort, for the cross-check on random data (f32 arithmetic as torch).
fn sorted_quantile_f32(v: &[f32], q: f64) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let rank = q as f32 * (s.len() - 1) as f32;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    let w = rank - lo as f32;
    if w < 0.5 {
        s[lo] + w * (s[hi] - s[lo])
    } else {
        s[hi] - (s[hi] - s[lo]) * (1.0 - w)
    }
}

/// ΔW[i, j] = Σ_h c_h ‖In[h,i,:] − Out[h,j,:]‖ with c = 0.1·(+1, −1), by loops.
fn delta_loops(inp: &[f64], out: &[f64], h: usize, din: usize, dout: usize, k: usize) -> Vec<f64> {
    let mut d = vec![0.0; din * dout];
    for hh in 0..h {
        let c = if hh % 2 == 0 { 0.1 } else { -0.1 };
        for i in 0..din {
            for j in 0..dout {
                let mut s = 0.0;
                for t in 0..k {
                    let diff = inp[(hh * din + i) * k + t] - out[(hh * dout + j) * k + t];
                    s += diff * diff;
                }
                d[i * dout + j] += c * s.sqrt();
            }
        }
    }
    d
}

/// ΔW_s by loops, τ from a sort.
fn sparse_loops(d: &[f64], s: f64) -> Vec<f64> {
    if s == 0.0 {
        return d.to_vec();
    }
    let mut a: Vec<f64> = d.iter().map(|v| v.abs()).collect();
    a.sort_by(|x, y| x.partial_cmp(y).unwrap());
    let rank = s * (a.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    let tau = a[lo] + (rank - lo as f64) * (a[hi] - a[lo]);
    d.iter().map(|&v| if v.abs() > tau { v * v.abs() } else { 0.0 }).collect()
}

struct Case {
    h: usize,
    din: usize,
    dout: usize,
    k: usize,
    inp: Vec<f64>,
    out: Vec<f64>,
    w: Vec<f64>,
    x: Vec<f64>,
    rows: usize,
}

fn case(seed: u64, h: usize, din: usize, dout: usize, k: usize, rows: usize) -> Case {
    let mut rng = StdRng::seed_from_u64(seed);
    Case {
        h,
        din,
        dout,
        k,
        inp: rand_vec(h * din * k, 1.0, &mut rng),
        out: rand_vec(h * dout * k, 1.0, &mut rng),
        w: rand_vec(dout * din, 0.5, &mut rng),
        x: rand_vec(rows * din, 1.0, &mut rng),
        rows,
    }
}

impl Case {
    fn layer(&self, s: f64, dtype: DType) -> SnellLinear {
        let i = tensor(&self.inp, &[self.h, self.din, self.k]).to_dtype(dtype).unwrap();
        let o = tensor(&self.out, &[self.h, self.dout, self.k]).to_dtype(dtype).unwrap();
        SnellLinear::from_parts(&i, &o, s).unwrap()
    }

    fn base(&self, dtype: DType) -> FrozenLinear {
        FrozenLinear::new(tensor(&self.w, &[self.dout, self.din]).to_dtype(dtype).unwrap())
    }

    fn x(&self, dtype: DType) -> Tensor {
        tensor(&self.x, &[self.rows, self.din]).to_dtype(dtype).unwrap()
    }

    /// y = x Wᵀ + x ΔW_s by loops.
    fn expected(&self, s: f64) -> Vec<f64> {
        let ds = sparse_loops(&delta_loops(&self.inp, &self.out, self.h, self.din, self.dout, self.k), s);
        let mut y = vec![0.0; self.rows * self.dout];
        for r in 0..self.rows {
            for j in 0..self.dout {
                let mut acc = 0.0;
                for i in 0..self.din {
                    acc += self.x[r * self.din + i] * (self.w[j * self.din + i] + ds[i * self.dout + j]);
                }
                y[r * self.dout + j] = acc;
            }
        }
        y
    }
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn quantile_matches_torch() {
    // torch.quantile(torch.tensor([1., 2., 3., 4.]), 0.5) = 2.5
    assert_eq!(quantile_f32(&[4.0, 1.0, 3.0, 2.0], 0.5).unwrap(), 2.5);
    assert_eq!(quantile_f64(&[4.0, 1.0, 3.0, 2.0], 0.5).unwrap(), 2.5);
    // Ties: torch.quantile(tensor([2., 5., 2., 1., 2.]), 0.3) = 2.0; ([1,1,4,4,4], 0.4) = 2.8.
    assert_eq!(quantile_f32(&[2.0, 5.0, 2.0, 1.0, 2.0], 0.3).unwrap(), 2.0);
    assert!((quantile_f32(&[4.0, 1.0, 4.0, 1.0, 4.0], 0.4).unwrap() - 2.8).abs() < 1e-6);
    assert_eq!(quantile_f32(&[3.0; 7], 0.77).unwrap(), 3.0);
    // s = 0 is the minimum, s = 1 the maximum.
    assert_eq!(quantile_f32(&[0.5, -2.0, 7.0], 0.0).unwrap(), -2.0);
    assert_eq!(quantile_f32(&[0.5, -2.0, 7.0], 1.0).unwrap(), 7.0);
    // torch.quantile(torch.arange(10.), 0.999) = 8.9910; ([10., 20.], 0.999) = 19.9900.
    let ten: Vec<f32> = (0..10).rev().map(|v| v as f32).collect();
    assert!((quantile_f32(&ten, 0.999).unwrap() - 8.991).abs() < 1e-5);
    assert!((quantile_f32(&[20.0, 10.0], 0.999).unwrap() - 19.99).abs() < 1e-5);
    assert!((quantile_f64(&[20.0, 10.0], 0.999).unwrap() - 19.99).abs() < 1e-12);
    // A single element.
    for q in [0.0, 0.3, 0.999] {
        assert_eq!(quantile_f32(&[7.5], q).unwrap(), 7.5);
    }
    // Bad input.
    assert!(quantile_f32(&[], 0.5).is_err());
    assert!(quantile_f32(&[1.0], 1.5).is_err());
    assert!(quantile_f32(&[1.0, f32::NAN], 0.5).unwrap().is_nan());
    // Random data with many ties, against a full sort, for many sizes and positions.
    let mut rng = StdRng::seed_from_u64(3);
    for n in [1usize, 2, 3, 10, 101, 1000, 4097] {
        let v: Vec<f32> = (0..n).map(|_| (rng.random_range(0..50) as f32) * 0.25).collect();
        for q in [0.0, 0.1, 0.25, 0.5, 0.73, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(quantile_f32(&v, q).unwrap(), sorted_quantile_f32(&v, q), "n {n} q {q}");
        }
    }
}

#[test]
fn kernel_delta_and_forward_equal_loops() {
    for (h, k) in [(2, 3), (2, 1), (4, 2)] {
        let c = case(11 + h as u64, h, 7, 5, k, 3);
        let expected_delta = delta_loops(&c.inp, &c.out, h, c.din, c.dout, c.k);
        for dtype in [DType::F64, DType::F32] {
            let tol = if dtype == DType::F64 { 1e-10 } else { 2e-5 };
            let layer = c.layer(0.0, dtype);
            assert_eq!(layer.kernel_delta().unwrap().dims(), [c.din, c.dout]);
            assert!(max_abs_diff(&vec_of(&layer.kernel_delta().unwrap()), &expected_delta) < tol);
            for s in [0.0, 0.3, 0.6, 0.95] {
                let layer = c.layer(s, dtype);
                let y = layer.forward(&c.x(dtype), &c.base(dtype), true).unwrap();
                assert_eq!(y.dims(), [c.rows, c.dout]);
                let d = max_abs_diff(&vec_of(&y), &c.expected(s));
                assert!(d < tol * 10.0, "h {h} {dtype:?} s {s}: {d}");
            }
        }
    }
    // The sparsified update keeps exactly the entries above the quantile, each times its magnitude.
    let c = case(5, 2, 10, 10, 2, 1);
    let layer = c.layer(0.6, DType::F64);
    let d = vec_of(&layer.kernel_delta().unwrap());
    let ds = vec_of(&layer.sparse_delta().unwrap());
    assert_eq!(ds.iter().filter(|v| **v != 0.0).count(), 40);
    for (a, b) in d.iter().zip(&ds) {
        assert!(*b == 0.0 || (b - a * a.abs()).abs() < 1e-15);
    }
}

/// Σ (y ⊙ g) for fixed g.
fn objective(layer: &SnellLinear, c: &Case, g: &Tensor, dtype: DType) -> Tensor {
    let y = layer.forward(&c.x(dtype), &c.base(dtype), true).unwrap();
    (y * g).unwrap().sum_all().unwrap()
}

/// Autograd in `dtype` against central differences in f64 (eps 1e-6).
fn check_gradients(s: f64, dtype: DType, tol: f64) {
    let eps = 1e-6;
    let c = case(21, 2, 6, 5, 3, 4);
    let mut rng = StdRng::seed_from_u64(9);
    let g = tensor(&rand_vec(c.rows * c.dout, 1.0, &mut rng), &[c.rows, c.dout]);
    let reference = c.layer(s, DType::F64);
    if let Some(tau) = reference.threshold().unwrap() {
        // Away from the threshold: no |ΔW| within a margin far above what a perturbation (or
        // f32 rounding) moves, so the mask is the same for every evaluation.
        let margin =
            vec_of(&reference.kernel_delta().unwrap()).iter().map(|v| (v.abs() - tau).abs()).fold(f64::MAX, f64::min);
        assert!(margin > 1e-4, "an entry lies {margin} from τ");
    }
    let layer = c.layer(s, dtype);
    let grads = objective(&layer, &c, &g.to_dtype(dtype).unwrap(), dtype).backward().unwrap();
    for (var, rvar) in [(&layer.input, &reference.input), (&layer.output, &reference.output)] {
        let analytic = vec_of(grads.get(var).unwrap());
        let base = vec_of(rvar.as_tensor());
        let shape = rvar.dims().to_vec();
        for idx in 0..base.len() {
            let f = |delta: f64| {
                let mut v = base.clone();
                v[idx] += delta;
                rvar.set(&tensor(&v, &shape)).unwrap();
                let o = objective(&reference, &c, &g, DType::F64).to_scalar::<f64>().unwrap();
                rvar.set(&tensor(&base, &shape)).unwrap();
                o
            };
            // For s > 0 the forward keeps sign(ΔW)·ΔW² on the survivors, whose derivative is
            // 2|ΔW|·dΔW; the seed's backward (|ΔW| and the mask detached) gives |ΔW|·dΔW: half of it.
            let numeric = (f(eps) - f(-eps)) / (2.0 * eps) / if s > 0.0 { 2.0 } else { 1.0 };
            let err = (numeric - analytic[idx]).abs() / (1e-4 + numeric.abs().max(analytic[idx].abs()));
            assert!(err < tol, "s {s} {dtype:?} idx {idx}: numeric {numeric}, analytic {}", analytic[idx]);
        }
    }
}

#[test]
fn gradients_equal_finite_differences() {
    for s in [0.0, 0.5] {
        check_gradients(s, DType::F64, 1e-6);
        check_gradients(s, DType::F32, 1e-3);
    }
}

#[test]
fn gradient_of_a_zero_distance_is_zero() {
    // One head, In row = Out row: ΔW = 0 and the distance's gradient is 0 (torch.cdist), not NaN.
    let i = tensor(&[1.0, 2.0], &[1, 1, 2]);
    let layer = SnellLinear::from_parts(&i, &i.clone(), 0.0).unwrap();
    let base = FrozenLinear::new(tensor(&[0.5], &[1, 1]));
    let y = layer.forward(&tensor(&[3.0], &[1, 1]), &base, true).unwrap();
    assert!((vec_of(&y)[0] - 1.5).abs() < 1e-12);
    let grads = y.sum_all().unwrap().backward().unwrap();
    for var in [&layer.input, &layer.output] {
        assert_eq!(vec_of(grads.get(var).unwrap()), vec![0.0, 0.0]);
    }
    // sparsify with s = 0 is the identity (KLoRA), with s > 0 it squares the survivors.
    let d = tensor(&[0.5, -2.0, 0.1, 1.0], &[2, 2]);
    assert_eq!(vec_of(&sparsify(&d, 0.0).unwrap()), vec![0.5, -2.0, 0.1, 1.0]);
    assert_eq!(vec_of(&sparsify(&d, 0.5).unwrap()), vec![0.0, -4.0, 0.0, 1.0]);
    // The comparison is strict: entries equal to τ are dropped.
    let d = tensor(&[1.0, -1.0, 1.0, 2.0], &[2, 2]);
    assert_eq!(vec_of(&sparsify(&d, 0.5).unwrap()), vec![0.0, 0.0, 0.0, 4.0]);
    assert!(sparsify(&d, 1.0).is_err());
}

#[test]
fn merge_equals_the_unmerged_forward() {
    let c = case(31, 2, 12, 9, 4, 5);
    for s in [0.0, 0.4] {
        let layer = c.layer(s, DType::F32);
        let inp = layer.input.as_tensor().clone();
        let out = layer.output.as_tensor().clone();
        let mut lin = Linear::new(tensor(&c.w, &[c.dout, c.din]).to_dtype(DType::F32).unwrap());
        lin.set_adapter(Box::new(SnellLinear::from_parts(&inp, &out, s).unwrap()));
        let x = c.x(DType::F32);
        let unmerged = vec_of(&lin.forward(&x, false).unwrap());
        assert!(max_abs_diff(&unmerged, &c.expected(s)) < 1e-4);
        lin.merge().unwrap();
        assert!(max_abs_diff(&vec_of(&lin.forward(&x, false).unwrap()), &unmerged) < 1e-5);
        lin.unmerge().unwrap();
        assert!(max_abs_diff(&vec_of(&lin.base().weight().unwrap()), &c.w) < 1e-6);
    }
}

fn tiny() -> Llama {
    common::tiny(DType::F32)
}

#[test]
fn injection_is_seeded_and_not_zero_at_start() {
    let cfg = snell(4, 0.5, &QV);
    let (mut a, mut b) = (tiny(), tiny());
    let before = logits(&a);
    assert_eq!(inject(&mut a, &cfg, 3).unwrap(), 4); // tiny has 2 layers
    inject(&mut b, &cfg, 3).unwrap();
    assert_eq!(max_diff(&logits(&a), &logits(&b)), 0.0);
    assert!(max_diff(&logits(&a), &before) > 0.0, "SNELL's update is not zero at init");
    let params = a.trainable_params();
    let (key, var) = &params[0];
    assert!(key.ends_with("q_proj.snell_in"), "{key}");
    let (h, d, k) = var.as_tensor().dims3().unwrap();
    assert_eq!((h, k), (2, 2));
    // kaiming-uniform with the 3-D fan-in d·r/H.
    let bound = 1.0 / ((d * k) as f64).sqrt();
    let v = vec_of(var.as_tensor());
    assert!(v.iter().all(|x| x.abs() <= bound) && v.iter().any(|x| x.abs() > 0.8 * bound));
    assert!(params[1].0.ends_with("q_proj.snell_out"));
}

#[test]
fn save_then_load_reproduces_outputs() {
    for cfg in [snell(4, 0.0, &QV), snell(4, 0.5, &ALL)] {
        let mut model = tiny();
        inject(&mut model, &cfg, 1).unwrap();
        let mut t = trainer(&model, 1e-2, 3);
        for _ in 0..3 {
            t.step(&model, &[batch()]).unwrap();
        }
        let expected = logits(&model);
        let (loaded, mut fresh) = save_and_reload(&model, &cfg);
        assert_eq!(loaded, cfg);
        assert!(max_diff(&expected, &logits(&fresh)) < 1e-5, "{cfg:?}");
        for (_, lin) in fresh.named_linears_mut() {
            lin.merge().unwrap();
        }
        assert!(max_diff(&expected, &logits(&fresh)) < 1e-4, "{cfg:?} merged");
    }
}

#[test]
fn overfits_a_tiny_batch() {
    for (cfg, lr) in [(snell(8, 0.0, &ALL), 1e-2), (snell(8, 0.5, &ALL), 2e-2)] {
        let mut model = tiny();
        inject(&mut model, &cfg, 1).unwrap();
        let mut t = trainer(&model, lr, 30);
        let first = loss_value(&model, &batch());
        for _ in 0..30 {
            t.step(&model, &[batch()]).unwrap();
        }
        let last = loss_value(&model, &batch());
        assert!(last < 0.7 * first, "{cfg:?}: loss {first} -> {last}");
    }
}

fn err_of<T>(r: candle_peft::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let e = err_of(inject(&mut tiny(), &AdapterConfig::new(SnellConfig { r: 5, heads: 2, sparsity: 0.2, target_modules: targets(&QV) }), 0));
    assert!(e.contains("q_proj") && e.contains("divide"), "{e}");
    for s in [1.0, -0.1, f64::NAN, 1.5] {
        let e = err_of(inject(&mut tiny(), &snell(4, s, &QV), 0));
        assert!(e.contains("q_proj") && e.contains("sparsity"), "{e}");
    }
    let e = err_of(inject(&mut tiny(), &AdapterConfig::new(SnellConfig { r: 0, heads: 2, sparsity: 0.0, target_modules: targets(&QV) }), 0));
    assert!(e.contains("q_proj"), "{e}");
    // A saved adapter whose shapes do not fit the model: name the module and both shapes.
    let cfg = snell(4, 0.3, &QV);
    let mut model = tiny();
    inject(&mut model, &cfg, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&model, &cfg, dir.path(), None).unwrap();
    let p = dir.path().join("adapter_config.json");
    let json = std::fs::read_to_string(&p).unwrap().replace("\"r\": 4", "\"r\": 8");
    std::fs::write(&p, json).unwrap();
    let e = err_of(load_adapter(&mut tiny(), &ModelSource::parse(dir.path().to_str().unwrap()).unwrap()));
    assert!(e.contains("model.layers.0.self_attn.q_proj") && e.contains("snell_in"), "{e}");
}

#[test]
fn config_json_and_cli() {
    let cfg = snell(8, 0.25, &ALL);
    let v = cfg.to_peft_json(Some("base"));
    assert_eq!(v["peft_type"], "SNELL");
    assert_eq!(v["heads"], 2);
    assert_eq!(AdapterConfig::from_peft_json(&v, std::path::Path::new("x.json")).unwrap(), cfg);
    // heads defaults to 2, sparsity to 0 (KLoRA).
    let v = serde_json::json!({"peft_type": "SNELL", "r": 4, "target_modules": ["q_proj"]});
    let cfg = AdapterConfig::from_peft_json(&v, std::path::Path::new("x.json")).unwrap();
    let c = cfg.downcast_ref::<SnellConfig>().unwrap();
    assert_eq!((c.heads, c.sparsity), (2, 0.0));

    let parse = |extra: &[&str]| {
        let mut args = vec!["candle-peft", "finetune", "--model", "m", "--data", "d.json", "--method", "snell"];
        args.extend_from_slice(extra);
        match Cli::try_parse_from(args).unwrap().command {
            Command::Finetune(f) => f.adapter.to_config(),
            _ => unreachable!(),
        }
    };
    let c = parse(&["--r", "16", "--snell-heads", "4", "--sparsity", "0.9", "--target-modules", "q_proj,v_proj"]).unwrap();
    assert_eq!(c, AdapterConfig::new(SnellConfig { r: 16, heads: 4, sparsity: 0.9, target_modules: targets(&QV) }));
    assert!(parse(&["--r", "8", "--snell-heads", "3"]).is_err());
    assert!(parse(&["--sparsity", "1.0"]).is_err());
}

//! The EfficientFT methods (docs/METHODS.md §4.2) on a tiny LLaMA: PiSSA, OLoRA (and their conversion
//! to a plain LoRA for the original base), full fine-tuning, SIFT, AdaLoRA, GaLore.

mod common;

use common::{batch, central_difference, logits, loss_value, max_diff, save_and_reload};
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_peft::adapters::{self, adalora, inject, load_adapter, save_adapter, save_converted, AdaLoraConfig, AdapterConfig, FullConfig, InitKind, InitLoraLinear, LoraConfig, LoraInitConfig, SiftConfig, SiftLinear, Targets};
use candle_peft::training::configure_trainer;
use candle_peft::hub::ModelSource;
use candle_peft::model::Llama;
use candle_peft::adapters::full::galore::GaloreConfig;
use candle_peft::training::{causal_lm_loss, Trainer};
use rand::{rngs::StdRng, Rng, SeedableRng};

const QV: [&str; 2] = ["q_proj", "v_proj"];
const ALL: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

fn targets(t: &[&str]) -> Targets {
    Targets::List(t.iter().map(|s| s.to_string()).collect())
}

fn lora_cfg(r: usize, t: &[&str]) -> LoraConfig {
    LoraConfig { r, lora_alpha: 2.0 * r as f64, lora_dropout: 0.0, target_modules: targets(t), use_rslora: false, use_dora: false }
}

fn pissa(r: usize, t: &[&str]) -> AdapterConfig {
    AdapterConfig::new(LoraInitConfig { lora: lora_cfg(r, t), kind: InitKind::Pissa })
}

fn olora(r: usize, t: &[&str]) -> AdapterConfig {
    AdapterConfig::new(LoraInitConfig { lora: lora_cfg(r, t), kind: InitKind::Olora })
}

fn ada(t: &[&str], total: usize) -> AdapterConfig {
    let mut c = AdaLoraConfig::new(targets(t), 6, 2, total);
    c.tinit = 2;
    c.tfinal = 3;
    AdapterConfig::new(c)
}

fn sift(t: &[&str]) -> AdapterConfig {
    AdapterConfig::new(SiftConfig { target_modules: targets(t), sparse_rate: 0.2 })
}

fn full(t: &[&str], galore: Option<GaloreConfig>) -> AdapterConfig {
    AdapterConfig::new(FullConfig { target_modules: targets(t), galore })
}

fn tiny() -> Llama {
    common::tiny(DType::F32)
}

fn randomize(vars: &[(String, Var)], seed: u64, scale: f32) {
    let mut rng = StdRng::seed_from_u64(seed);
    for (_, v) in vars {
        let data: Vec<f32> = (0..v.elem_count()).map(|_| rng.random_range(-scale..scale)).collect();
        v.set(&Tensor::from_vec(data, v.shape(), &Device::Cpu).unwrap()).unwrap();
    }
}

fn trainer(model: &Llama, cfg: &AdapterConfig, lr: f64, total: usize) -> Trainer {
    let mut t = common::trainer(model, lr, total);
    configure_trainer(&mut t, model, cfg).unwrap();
    t
}

fn base_weights(model: &Llama) -> HashMap<String, Tensor> {
    model.named_linears().into_iter().map(|(p, l)| (p, l.base().weight().unwrap().into_owned())).collect()
}

fn init_adapter<'a>(model: &'a Llama, path: &str) -> &'a InitLoraLinear {
    let (_, lin) = model.named_linears().into_iter().find(|(p, _)| p == path).unwrap();
    lin.adapter().unwrap().as_any().unwrap().downcast_ref::<InitLoraLinear>().unwrap()
}

#[test]
fn pissa_and_olora_leave_the_model_unchanged() {
    for (cfg, kind) in [(pissa(4, &ALL), InitKind::Pissa), (olora(4, &ALL), InitKind::Olora)] {
        let mut model = tiny();
        let before = logits(&model);
        let orig = base_weights(&model);
        inject(&mut model, &cfg, 1).unwrap();
        for (path, lin) in model.named_linears() {
            let a = init_adapter(&model, &path);
            let ba = (a.lora.b.as_tensor().matmul(a.lora.a.as_tensor()).unwrap() * a.lora.scale).unwrap();
            let rebuilt = (&*lin.base().weight().unwrap() + &ba).unwrap();
            assert!(max_diff(&rebuilt, &orig[&path]) < 1e-5, "{kind:?} {path}");
            let r = a.lora.a.dims()[0];
            if kind == InitKind::Olora {
                // B = Q[:, :r] has orthonormal columns.
                let b = a.lora.b.as_tensor();
                let btb = b.t().unwrap().matmul(b).unwrap();
                assert!(max_diff(&btb, &Tensor::eye(r, DType::F32, &Device::Cpu).unwrap()) < 1e-5);
            } else {
                // s·BA is the best rank-r approximation: the residual has no component along
                // the top-r left singular vectors, i.e. Bᵀ W_res = 0.
                let proj = a.lora.b.as_tensor().t().unwrap().matmul(&lin.base().weight().unwrap()).unwrap();
                let size = orig[&path].abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                assert!(max_diff(&proj, &proj.zeros_like().unwrap()) < 1e-4 * f64::from(size.max(1.0)), "{path}");
                // A Aᵀ = diag(S_r / s), decreasing.
                let aat = a.lora.a.as_tensor().matmul(&a.lora.a.as_tensor().t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
                for i in 0..r {
                    for (j, v) in aat[i].iter().enumerate() {
                        if i != j {
                            assert!(v.abs() < 1e-4);
                        }
                    }
                    if i > 0 {
                        assert!(aat[i][i] <= aat[i - 1][i - 1] + 1e-5);
                    }
                }
            }
        }
        assert!(max_diff(&before, &logits(&model)) < 1e-4, "{kind:?} changes the output at init");
    }
}

#[test]
fn converted_adapter_on_original_base_equals_trained_adapter_on_residual() {
    for cfg in [pissa(4, &QV), olora(3, &ALL)] {
        let mut model = tiny();
        inject(&mut model, &cfg, 1).unwrap();
        let mut t = trainer(&model, &cfg, 1e-2, 5);
        for _ in 0..5 {
            t.step(&model, &[batch()]).unwrap();
        }
        let trained = logits(&model);
        let dir = tempfile::tempdir().unwrap();
        let conv = dir.path().join("converted");
        save_converted(&model, &cfg, &conv, None).unwrap();
        let mut original = tiny();
        let loaded = load_adapter(&mut original, &ModelSource::parse(conv.to_str().unwrap()).unwrap()).unwrap();
        let l = loaded.downcast_ref::<LoraConfig>().unwrap_or_else(|| panic!("converted to {loaded:?}"));
        let c = &cfg.downcast_ref::<LoraInitConfig>().unwrap().lora;
        assert_eq!(l.r, 2 * c.r);
        assert!((l.scale() - c.scale()).abs() < 1e-12);
        assert!(max_diff(&trained, &logits(&original)) < 1e-4, "{cfg:?}");
        // And the unconverted adapter reloads onto the original base (PiSSA/OLoRA re-run at load).
        let raw = dir.path().join("raw");
        save_adapter(&model, &cfg, &raw, None).unwrap();
        let mut again = tiny();
        assert_eq!(load_adapter(&mut again, &ModelSource::parse(raw.to_str().unwrap()).unwrap()).unwrap(), cfg);
        assert!(max_diff(&trained, &logits(&again)) < 1e-4);
    }
}

#[test]
fn configs_round_trip_through_peft_json() {
    let path = std::path::Path::new("adapter_config.json");
    for cfg in [pissa(4, &QV), olora(4, &QV), ada(&QV, 10), sift(&QV), full(&QV, Some(GaloreConfig::default()))] {
        let v = cfg.to_peft_json(None);
        assert_eq!(AdapterConfig::from_peft_json(&v, path).unwrap(), cfg, "{v}");
    }
    let v = pissa(4, &QV).to_peft_json(None);
    assert_eq!(v["peft_type"], "LORA");
    assert_eq!(v["init_lora_weights"], "pissa");
    assert_eq!(ada(&QV, 10).to_peft_json(None)["peft_type"], "ADALORA");
    // PEFT's randomised PiSSA reads as PiSSA.
    let mut v = pissa(4, &QV).to_peft_json(None);
    v["init_lora_weights"] = "pissa_niter_4".into();
    assert_eq!(AdapterConfig::from_peft_json(&v, path).unwrap(), pissa(4, &QV));
}

#[test]
fn forwards_equal_their_formulas() {
    let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
    // AdaLoRA: x (A⊙E)ᵀ Bᵀ · α/(r + 1e-5) on top of the base.
    let mut model = tiny();
    let cfg = ada(&["q_proj"], 10);
    inject(&mut model, &cfg, 3).unwrap();
    randomize(&model.trainable_params(), 4, 0.3);
    for (_, lin) in model.named_linears().into_iter().filter(|(p, _)| p.ends_with("q_proj")) {
        let l = lin.adapter().unwrap().as_any().unwrap().downcast_ref::<adapters::AdaLoraLinear>().unwrap();
        let ae = l.a.as_tensor().broadcast_mul(l.e.as_tensor()).unwrap();
        let w = lin.base().weight().unwrap().into_owned();
        let expect = (x.matmul(&w.t().unwrap()).unwrap()
            + (x.matmul(&ae.t().unwrap()).unwrap().matmul(&l.b.as_tensor().t().unwrap()).unwrap() * (8.0 / (6.0 + 1e-5)))
                .unwrap())
        .unwrap();
        assert!(max_diff(&lin.forward(&x, false).unwrap(), &expect) < 1e-5);
    }
    // Full FT: x Wᵀ with W the trainable copy; SIFT: x (W + scatter(idx, v))ᵀ.
    let mut model = tiny();
    inject(&mut model, &full(&["k_proj"], None), 3).unwrap();
    randomize(&model.trainable_params(), 5, 0.3);
    let mut model2 = tiny();
    inject(&mut model2, &sift(&["k_proj"]), 3).unwrap();
    for ((path, lin), (_, lin2)) in model.named_linears().into_iter().zip(model2.named_linears()).filter(|((p, _), _)| p.ends_with("k_proj")) {
        let w = &model.trainable_params().into_iter().find(|(k, _)| k.contains(&path)).unwrap().1;
        assert!(max_diff(&lin.forward(&x, false).unwrap(), &x.matmul(&w.as_tensor().t().unwrap()).unwrap()) < 1e-5);
        let s = lin2.adapter().unwrap().as_any().unwrap().downcast_ref::<SiftLinear>().unwrap();
        let idx: Vec<u32> = (0..s.k as u32).map(|i| i * 3).collect();
        s.set_indices(&Tensor::new(idx.as_slice(), &Device::Cpu).unwrap()).unwrap();
        randomize(&[("v".into(), s.values.clone())], 6, 0.3);
        let mut dense = lin2.base().weight().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let vals = s.values.as_tensor().to_vec1::<f32>().unwrap();
        for (i, &j) in idx.iter().enumerate() {
            dense[j as usize] += vals[i];
        }
        let w2 = Tensor::from_vec(dense, lin2.base().weight().unwrap().shape(), &Device::Cpu).unwrap();
        assert!(max_diff(&lin2.forward(&x, false).unwrap(), &x.matmul(&w2.t().unwrap()).unwrap()) < 1e-5);
    }
}

#[test]
fn gradients_equal_finite_differences() {
    for cfg in [pissa(2, &QV), ada(&QV, 10), full(&["v_proj"], None), sift(&["v_proj"])] {
        let mut model = tiny();
        inject(&mut model, &cfg, 1).unwrap();
        if cfg.peft_type() == "SIFT" {
            // Choose the indices with one step, as training does.
            trainer(&model, &cfg, 1e-3, 3).step(&model, &[batch()]).unwrap();
        }
        let b = batch();
        let params = model.trainable_params();
        if cfg.peft_type() != "FULL" {
            randomize(&params, 2, 0.2);
        }
        let grads = causal_lm_loss(&model, &b, true).unwrap().backward().unwrap();
        for (name, var) in params {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{cfg:?}: no gradient for {name}"));
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (idx, &analytic) = g.iter().enumerate().max_by(|a, b| a.1.abs().total_cmp(&b.1.abs())).unwrap();
            let numeric = central_difference(&model, &var, idx, 1e-2, &b);
            let tol = 3e-2 * analytic.abs().max(1e-2) as f64;
            assert!((numeric - analytic as f64).abs() < tol, "{name}[{idx}]: analytic {analytic}, numeric {numeric}");
        }
    }
}

#[test]
fn sift_updates_exactly_k_entries_per_matrix() {
    let cfg = sift(&QV);
    let mut model = tiny();
    let orig = base_weights(&model);
    inject(&mut model, &cfg, 1).unwrap();
    let mut t = trainer(&model, &cfg, 1e-2, 4);
    for _ in 0..4 {
        t.step(&model, &[batch()]).unwrap();
    }
    let mut checked = 0;
    for (path, lin) in model.named_linears() {
        let Some(a) = lin.adapter() else { continue };
        let s = a.as_any().unwrap().downcast_ref::<SiftLinear>().unwrap();
        let numel = orig[&path].elem_count();
        assert_eq!(s.k, (0.2 * numel as f64) as usize + 1);
        let merged = a.merged_weight(&lin.base().weight().unwrap()).unwrap();
        let changed = (merged - &orig[&path]).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(changed.iter().filter(|v| **v != 0.0).count(), s.k, "{path}");
        checked += 1;
    }
    assert_eq!(checked, 4);
}

#[test]
fn adalora_budget_follows_the_schedule_step_by_step() {
    let total = 12;
    let cfg = ada(&QV, total);
    let mut model = tiny();
    inject(&mut model, &cfg, 1).unwrap();
    let c = cfg.downcast_ref::<AdaLoraConfig>().unwrap();
    let hook = adapters::AdaLoraHook::new(&model, c).unwrap();
    let (init, target) = (hook.init_bgt, hook.target_bgt);
    assert_eq!((init, target), (6 * 4, 2 * 4));
    let mut t = trainer(&model, &cfg, 1e-2, total);
    let end = total - c.tfinal;
    let mut budgets = Vec::new();
    for step in 0..total {
        t.step(&model, &[batch()]).unwrap();
        let kept: usize = adalora::kept_ranks(&model).unwrap().iter().sum();
        let (budget, mask) = hook.budget_schedule(step);
        if step <= c.tinit {
            assert_eq!(kept, init, "step {step}: no masking before tinit");
        } else if step < end {
            assert!(mask);
            assert_eq!(kept, budget, "step {step}");
        } else {
            assert_eq!(kept, target, "step {step}: final budget");
        }
        budgets.push(kept);
    }
    // Cubic decrease: monotone from init to target.
    assert!(budgets.windows(2).all(|w| w[1] <= w[0]), "{budgets:?}");
    assert_eq!(*budgets.last().unwrap(), target);
    // The hand-computed schedule: init − (init − target)·(1 − (s − tinit)/(T − tfinal − tinit))³.
    assert_eq!(hook.budget_schedule(3).0, ((24.0 - 8.0) * (1.0f64 - 1.0 / 7.0).powi(3) + 8.0) as usize);
}

#[test]
fn adalora_regulariser_is_peft_s() {
    use candle_peft::training::StepHook;
    let cfg = ada(&["q_proj"], 10);
    let mut model = tiny();
    inject(&mut model, &cfg, 1).unwrap();
    let c = cfg.downcast_ref::<AdaLoraConfig>().unwrap();
    let hook = adapters::AdaLoraHook::new(&model, c).unwrap();
    let reg = hook.regularizer().unwrap().unwrap().to_scalar::<f32>().unwrap() as f64;
    let mut sum = 0.0;
    let mut n = 0.0;
    for (name, v) in model.trainable_params() {
        let m = v.as_tensor();
        let cov = if name.ends_with("lora_A") {
            m.matmul(&m.t().unwrap()).unwrap()
        } else if name.ends_with("lora_B") {
            m.t().unwrap().matmul(m).unwrap()
        } else {
            continue;
        };
        let c2: Vec<Vec<f32>> = cov.to_vec2().unwrap();
        let mut f = 0.0f64;
        for (i, row) in c2.iter().enumerate() {
            for (j, &x) in row.iter().enumerate() {
                let d = x as f64 - if i == j { 1.0 } else { 0.0 };
                f += d * d;
            }
        }
        sum += f.sqrt();
        n += 1.0;
    }
    assert!((reg - 0.5 * sum / n).abs() < 1e-4 * reg.abs().max(1.0), "{reg} vs {}", 0.5 * sum / n);
}

#[test]
fn galore_projection_refreshes_at_the_gap_and_updates_in_the_subspace() {
    let g = GaloreConfig { rank: 2, update_proj_gap: 3, scale: 4.0 };
    let cfg = full(&["v_proj"], Some(g));
    let mut model = tiny();
    inject(&mut model, &cfg, 1).unwrap();
    let mut t = trainer(&model, &cfg, 1e-3, 7);
    let n_gal = t.optimizer.params.iter().filter(|p| p.galore.is_some()).count();
    assert_eq!(n_gal, 2);
    let mut first_p: Option<Tensor> = None;
    for step in 0..7 {
        let before: Vec<Tensor> = t.optimizer.params.iter().map(|p| p.var.as_tensor().copy().unwrap()).collect();
        t.step(&model, &[batch()]).unwrap();
        for (p, w0) in t.optimizer.params.iter().zip(&before) {
            let proj = p.galore.as_ref().unwrap();
            assert_eq!(proj.refreshes, step / 3 + 1, "step {step}");
            // v_proj is [32, 64] (m < n): P = U[:, :r] and the update is P N, in P's column span.
            assert!(!proj.right);
            let pm = proj.ortho.as_ref().unwrap();
            let dw = (p.var.as_tensor() - w0).unwrap();
            let outside = (&dw - pm.matmul(&pm.t().unwrap().matmul(&dw).unwrap()).unwrap()).unwrap();
            let size = dw.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(size > 0.0);
            assert!(max_diff(&outside, &outside.zeros_like().unwrap()) < 1e-4 * f64::from(size), "step {step}");
        }
        let p0 = t.optimizer.params[0].galore.as_ref().unwrap().ortho.clone().unwrap();
        match (step, &first_p) {
            (0, _) => first_p = Some(p0),
            (1 | 2, Some(f)) => assert_eq!(max_diff(f, &p0), 0.0, "P is kept between refreshes"),
            _ => {}
        }
    }
}

#[test]
fn save_then_load_reproduces_logits() {
    for cfg in [pissa(4, &QV), olora(4, &QV), ada(&QV, 6), sift(&QV), full(&QV, None)] {
        let mut model = tiny();
        inject(&mut model, &cfg, 1).unwrap();
        let mut t = trainer(&model, &cfg, 1e-2, 3);
        for _ in 0..3 {
            t.step(&model, &[batch()]).unwrap();
        }
        let expected = logits(&model);
        let (loaded, mut fresh) = save_and_reload(&model, &cfg);
        assert_eq!(loaded.peft_type(), cfg.peft_type());
        assert!(max_diff(&expected, &logits(&fresh)) < 1e-4, "{cfg:?}");
        // Merging computes the same function.
        for (_, lin) in fresh.named_linears_mut() {
            lin.merge().unwrap();
        }
        assert!(max_diff(&expected, &logits(&fresh)) < 1e-3, "{cfg:?} merged");
    }
}

#[test]
fn every_method_overfits_a_tiny_batch() {
    let g = GaloreConfig { rank: 4, update_proj_gap: 10, scale: 4.0 };
    for (cfg, lr) in [
        (pissa(4, &ALL), 1e-2),
        (olora(4, &ALL), 1e-2),
        (ada(&ALL, 30), 2e-2),
        (sift(&ALL), 1e-2),
        (full(&ALL, None), 3e-3),
        (full(&ALL, Some(g)), 3e-3),
    ] {
        let mut model = tiny();
        inject(&mut model, &cfg, 1).unwrap();
        let mut t = trainer(&model, &cfg, lr, 30);
        let first = loss_value(&model, &batch());
        for _ in 0..30 {
            t.step(&model, &[batch()]).unwrap();
        }
        let last = loss_value(&model, &batch());
        assert!(last < 0.7 * first, "{cfg:?}: loss {first} -> {last}");
    }
}

#[test]
fn eva_init_has_orthonormal_rows_and_respects_cap_and_budget() {
    let r = 3;
    let mut cfg = adapters::EvaConfig::new(lora_cfg(r, &ALL));
    let mut model = tiny();
    let before = logits(&model);
    inject(&mut model, &AdapterConfig::new(cfg.clone()), 1).unwrap();
    let batches = vec![batch(), batch()];
    let ranks = adapters::initialize_eva(&mut model, &mut cfg, &batches, 2).unwrap();
    let n_layers = 14;
    assert_eq!(ranks.len(), n_layers);
    assert_eq!(ranks.values().sum::<usize>(), r * n_layers, "{ranks:?}");
    assert!(ranks.values().all(|&k| k <= 2 * r), "{ranks:?}");
    assert!(ranks.values().any(|&k| k != r), "ranks were redistributed: {ranks:?}");
    for (path, lin) in model.named_linears() {
        let Some(a) = lin.adapter() else {
            assert_eq!(ranks[&path], 0);
            continue;
        };
        // A plain LoraLinear: its A and B through params.
        let params = a.params();
        let at = params[0].1.as_tensor();
        assert_eq!(at.dims()[0], ranks[&path]);
        let k = at.dims()[0];
        let aat = at.matmul(&at.t().unwrap()).unwrap();
        assert!(max_diff(&aat, &Tensor::eye(k, DType::F32, &Device::Cpu).unwrap()) < 1e-4, "{path}");
        assert_eq!(params[1].1.as_tensor().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    }
    assert!(max_diff(&before, &logits(&model)) < 1e-5, "B = 0 leaves the model unchanged");
    // Save / load with the rank pattern, after training.
    let eva = AdapterConfig::new(cfg.clone());
    let mut t = trainer(&model, &eva, 1e-2, 20);
    let first = loss_value(&model, &batch());
    for _ in 0..20 {
        t.step(&model, &[batch()]).unwrap();
    }
    let last = loss_value(&model, &batch());
    assert!(last < 0.7 * first, "EVA: loss {first} -> {last}");
    let expected = logits(&model);
    let dir = tempfile::tempdir().unwrap();
    save_adapter(&model, &eva, dir.path(), None).unwrap();
    let mut fresh = tiny();
    let loaded = load_adapter(&mut fresh, &ModelSource::parse(dir.path().to_str().unwrap()).unwrap()).unwrap();
    assert_eq!(loaded, eva);
    assert!(max_diff(&expected, &logits(&fresh)) < 1e-4);
}

//! The fused AdamW update (`ops::adamw`, in place, three passes) against the update in
//! candle ops (`--unfused`): on the CPU they round at the same places, so parameters and moments
//! agree bit for bit over several steps, with and without weight decay and with a learning-rate
//! multiplier. One test in this binary: it switches the process-wide `set_unfused`.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_peft::ops::set_unfused;
use candle_peft::training::{AdamW, AdamWConfig};

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn run(unfused: bool, config: AdamWConfig) -> Vec<Vec<u32>> {
    set_unfused(unfused);
    let dev = Device::Cpu;
    let shapes: [&[usize]; 3] = [&[7, 13], &[33], &[4, 5, 3]];
    // The same values on both runs: drawn from a seeded generator of their own.
    let mut seed = 0x5eedu64;
    let mut draw = |n: usize, scale: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                // Some exact zeros: for a gradient, v stays 0 there and the update is 0 / ε.
                if seed >> 60 == 0 { 0.0 } else { ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale }
            })
            .collect()
    };
    let params = shapes
        .iter()
        .enumerate()
        .map(|(i, shape)| {
            let init = Tensor::from_vec(draw(shape.iter().product(), 2.0), *shape, &dev).unwrap();
            (format!("p{i}"), Var::from_tensor(&init).unwrap(), if i == 1 { 2.5 } else { 1.0 })
        })
        .collect();
    let mut opt = AdamW::new(params, config).unwrap();
    let initial = bits(opt.params[0].var.as_tensor());
    for step in 0..5 {
        let grads: HashMap<String, Tensor> = opt
            .params
            .iter()
            .map(|p| (p.name.clone(), Tensor::from_vec(draw(p.var.elem_count(), 1e-2), p.var.shape(), &dev).unwrap()))
            .collect();
        opt.step(&grads, 1e-3 * (step + 1) as f64).unwrap();
    }
    // The update moved the parameters (the comparison is not of two untouched copies).
    assert_ne!(initial, bits(opt.params[0].var.as_tensor()));
    let state = opt.state_tensors().unwrap();
    let mut out = Vec::new();
    for p in &opt.params {
        out.push(bits(p.var.as_tensor()));
        out.push(bits(&state[&format!("m.{}", p.name)]));
        out.push(bits(&state[&format!("v.{}", p.name)]));
    }
    set_unfused(false);
    out
}

#[test]
fn fused_adamw_equals_the_candle_ops_update_bit_for_bit() {
    for weight_decay in [0.0, 0.1] {
        let config = AdamWConfig { weight_decay, ..Default::default() };
        let (fused, ops) = (run(false, config), run(true, config));
        assert_eq!(fused.len(), ops.len());
        for (i, (f, o)) in fused.iter().zip(&ops).enumerate() {
            assert_eq!(f, o, "tensor {i} (parameter, m, v in turn) differs, weight decay {weight_decay}");
        }
    }
}

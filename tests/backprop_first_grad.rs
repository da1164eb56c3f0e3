//! The patched backward of candle-core (third_party/candle-core/PATCHED.md) stores the first
//! gradient of a tensor as it is instead of adding it into zeros. These are the cases where that
//! shortcut could go wrong: a tensor that gets gradients from several places, rules that subtract,
//! broadcasts, a gradient that arrives as a strided view, and a custom op that returns a gradient
//! of the wrong shape.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, Var};

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

fn assert_close(got: &Tensor, want: &[f64]) {
    let got = values(got);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-12 * w.abs().max(1.0), "element {i}: got {g}, want {w}");
    }
}

#[test]
fn fan_in_sums_every_consumer() -> Result<()> {
    let x = Var::new(&[1.0f64, -2.0, 0.5], &Device::Cpu)?;
    // y = x² + 3x - x + (x + x): dy/dx = 2x + 4
    let y = ((x.sqr()? + (x.as_tensor() * 3.0)?)? - x.as_tensor())?;
    let y = (y + (x.as_tensor() + x.as_tensor())?)?;
    let grads = y.sum_all()?.backward()?;
    assert_close(grads.get(&x).unwrap(), &[6.0, 0.0, 5.0]);
    Ok(())
}

#[test]
fn rules_that_subtract_give_the_negated_first_gradient() -> Result<()> {
    let a = Var::new(&[2.0f64, 4.0], &Device::Cpu)?;
    let b = Var::new(&[1.0f64, 8.0], &Device::Cpu)?;
    let c = Var::new(&[0.3f64, -1.2], &Device::Cpu)?;
    // sum(-(a - b)) + sum(a / b) + sum(cos c)
    let y = ((a.as_tensor() - b.as_tensor())?.neg()?.sum_all()? + (a.as_tensor() / b.as_tensor())?.sum_all()?)?;
    let y = (y + c.cos()?.sum_all()?)?;
    let grads = y.backward()?;
    // d/da = -1 + 1/b; d/db = 1 - a/b²; d/dc = -sin c
    assert_close(grads.get(&a).unwrap(), &[-1.0 + 1.0, -1.0 + 0.125]);
    assert_close(grads.get(&b).unwrap(), &[1.0 - 2.0, 1.0 - 4.0 / 64.0]);
    assert_close(grads.get(&c).unwrap(), &[-(0.3f64).sin(), (1.2f64).sin()]);
    Ok(())
}

#[test]
fn broadcast_and_transposed_gradients_are_stored_contiguous() -> Result<()> {
    let x = Var::new(&[1.0f64, 2.0, 3.0], &Device::Cpu)?;
    let w = Tensor::new(&[[1.0f64, 10.0, 100.0], [2.0, 20.0, 200.0]], &Device::Cpu)?;
    let y = x.broadcast_as((2, 3))?.mul(&w)?.sum_all()?;
    assert_close(y.backward()?.get(&x).unwrap(), &[3.0, 30.0, 300.0]);

    // m [2, 3] reaches the matmul as mᵀ: its gradient comes back through a transpose.
    let m = Var::new(&[[1.0f64, 2.0, 3.0], [4.0, 5.0, 6.0]], &Device::Cpu)?;
    let v = Tensor::new(&[[1.0f64], [-1.0]], &Device::Cpu)?;
    let y = m.t()?.matmul(&v)?.sum_all()?; // sum_j (m[0, j] - m[1, j])
    let grads = y.backward()?;
    let g = grads.get(&m).unwrap();
    assert!(g.is_contiguous(), "the stored gradient is a strided view");
    assert_eq!(g.dims(), &[2, 3]);
    assert_close(g, &[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]);
    Ok(())
}

/// The identity forward with a backward that returns a gradient of the wrong shape.
struct WrongShapeGrad;

impl CustomOp1 for WrongShapeGrad {
    fn name(&self) -> &'static str {
        "wrong-shape-grad"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((storage.clone(), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, _grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(Tensor::zeros(1, arg.dtype(), arg.device())?))
    }
}

#[test]
fn a_first_gradient_of_the_wrong_shape_is_an_error() -> Result<()> {
    let x = Var::new(&[1.0f32, 2.0, 3.0], &Device::Cpu)?;
    let y = x.as_tensor().apply_op1(WrongShapeGrad)?.sum_all()?;
    let err = y.backward().expect_err("a [1] gradient for a [3] tensor was accepted");
    assert!(err.to_string().contains("shape mismatch"), "{err}");
    Ok(())
}

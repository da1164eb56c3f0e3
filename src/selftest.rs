//! The harness of `candle-peft selftest`: a kernel on a device against its reference on the CPU.
//! Each op keeps its own cases beside its code (a `selftest` function in its module); the CLI
//! runs them all (`cli::selftest`).
//!
//! A case draws its inputs once, rounded to the dtype under test, and gives them to both sides:
//! the device computes in that dtype, the reference in f64 on the same values. The error recorded
//! is normwise: `max |got − ref| / max |ref|` over each output (the abs column is
//! `max |got − ref|`). Bounds: 1e-5 in f32, 1e-2 in f16 and bf16. Shapes are random with odd
//! sizes (no multiple of any tile).

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::Result;

/// One checked output of one kernel.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub kernel: String,
    pub dtype: String,
    pub shape: String,
    pub output: String,
    pub max_abs: f64,
    pub rel: f64,
    pub bound: f64,
    pub pass: bool,
}

fn bound(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-5
    } else {
        1e-2
    }
}

/// The checks of one dtype on one device, and the random draws they share.
pub struct Case<'a> {
    pub device: &'a Device,
    pub dtype: DType,
    pub rng: StdRng,
    pub checks: Vec<Check>,
}

impl<'a> Case<'a> {
    pub fn new(device: &'a Device, dtype: DType, seed: u64) -> Self {
        Self { device, dtype, rng: StdRng::seed_from_u64(seed), checks: Vec::new() }
    }

    /// Random values rounded to the dtype under test, as an f64 CPU tensor.
    pub fn draw(&mut self, shape: &[usize], std: f64) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| (self.rng.random::<f32>() * 2.0 - 1.0) * std as f32).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(self.dtype)?.to_dtype(DType::F64)?)
    }

    pub fn mask(&mut self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| if self.rng.random::<f64>() < 0.9 { 1.0 / 0.9 } else { 0.0 }).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(self.dtype)?.to_dtype(DType::F64)?)
    }

    pub fn on_device(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.to_dtype(self.dtype)?.to_device(self.device)?)
    }

    pub fn record(&mut self, kernel: &str, shape: &str, output: &str, got: &Tensor, reference: &Tensor) -> Result<()> {
        let got = got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        let max_abs = (&got - reference)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        let scale = reference.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?.max(f64::MIN_POSITIVE);
        let (rel, bound) = (max_abs / scale, bound(self.dtype));
        self.push([kernel, shape, output], max_abs, rel, bound, rel.is_finite() && rel <= bound);
        Ok(())
    }

    /// Two device tensors that must hold the same values (bound 0; a signed zero counts as zero).
    /// One forward and backward pass against its reference: `names` are the output's, then each
    /// input gradient's (as many as the pass has).
    pub fn record_pass(&mut self, kernel: &str, shape: &str, names: &[&str], (y, g): (&Tensor, &[Tensor]), (y_ref, g_ref): (&Tensor, &[Tensor])) -> Result<()> {
        let Some((output, gradients)) = names.split_first() else { return Err(crate::Error::msg("selftest: a pass names no output")) };
        self.record(kernel, shape, output, y, y_ref)?;
        for (name, (got, reference)) in gradients.iter().zip(g.iter().zip(g_ref)) {
            self.record(kernel, shape, name, got, reference)?;
        }
        Ok(())
    }

    pub fn record_equal(&mut self, kernel: &str, shape: &str, output: &str, got: &Tensor, want: &Tensor) -> Result<()> {
        let f64s = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F64);
        let want = f64s(want)?;
        let max_abs = (f64s(got)? - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
        let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?.max(f64::MIN_POSITIVE);
        self.push([kernel, shape, output], max_abs, max_abs / scale, 0.0, max_abs == 0.0);
        Ok(())
    }

    /// A value that must equal its reference bit for bit (bound 0).
    pub fn record_exact(&mut self, kernel: &str, shape: &str, output: &str, got: f64, want: f64) {
        let max_abs = (got - want).abs();
        self.push([kernel, shape, output], max_abs, max_abs / want.abs().max(f64::MIN_POSITIVE), 0.0, got.to_bits() == want.to_bits());
    }

    fn push(&mut self, [kernel, shape, output]: [&str; 3], max_abs: f64, rel: f64, bound: f64, pass: bool) {
        let dtype = format!("{:?}", self.dtype).to_lowercase();
        self.checks.push(Check { kernel: kernel.into(), dtype, shape: shape.into(), output: output.into(), max_abs, rel, bound, pass });
    }

    /// An odd size in [lo, hi].
    pub fn odd(&mut self, lo: usize, hi: usize) -> usize {
        self.rng.random_range(lo..=hi) | 1
    }
}

/// Forward and the gradients of every input, for `f` on tensors on `device` in `dtype`, with the
/// output weighted by `weights` before summing (so that each output element gets its own gradient).
pub fn forward_backward(
    device: &Device,
    dtype: DType,
    inputs: &[&Tensor],
    weights: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    forward_backward_typed(device, &vec![dtype; inputs.len()], inputs, weights, f)
}

/// As [`forward_backward`], each input in its own dtype.
pub fn forward_backward_typed(
    device: &Device,
    dtypes: &[DType],
    inputs: &[&Tensor],
    weights: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars: Vec<Var> =
        inputs.iter().zip(dtypes).map(|(t, &d)| Var::from_tensor(&t.to_dtype(d)?.to_device(device)?)).collect::<candle_core::Result<_>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&tensors)?;
    // Summed in f32 (f64 for the reference), as training accumulates.
    let acc = if y.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
    let loss = (y.to_dtype(acc)? * weights.to_dtype(acc)?.to_device(device)?)?.sum_all()?;
    let grads = loss.backward()?;
    let g = tensors
        .iter()
        .map(|t| grads.get(t).cloned().ok_or_else(|| crate::Error::msg("selftest: an input got no gradient")))
        .collect::<Result<_>>()?;
    Ok((y, g))
}

/// The pass/fail table.
pub fn table(checks: &[Check]) -> String {
    let mut s = format!("{:<28} {:<5} {:<26} {:<6} {:>11} {:>11} {:>7}  result\n", "kernel", "dtype", "shape", "output", "max abs", "rel", "bound");
    for c in checks {
        s += &format!(
            "{:<28} {:<5} {:<26} {:<6} {:>11.3e} {:>11.3e} {:>7.0e}  {}\n",
            c.kernel,
            c.dtype,
            c.shape,
            c.output,
            c.max_abs,
            c.rel,
            c.bound,
            if c.pass { "pass" } else { "FAIL" }
        );
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    s += &format!("{} checks, {} failed\n", checks.len(), failed);
    s
}


/// The harness on the CPU (both sides the CPU reference, in f32 against f64): every check of
/// `cases` runs and passes, so that a failure on the GPU is the kernel's. For the ops' tests.
#[cfg(test)]
pub(crate) fn passes_on_the_cpu(cases: impl Fn(&mut Case) -> Result<()>, count: usize) {
    let mut case = Case::new(&Device::Cpu, DType::F32, 3);
    cases(&mut case).unwrap();
    assert_eq!(case.checks.len(), count, "{}", table(&case.checks));
    let failed: Vec<_> = case.checks.iter().filter(|c| !c.pass).collect();
    assert!(failed.is_empty(), "{}", table(&case.checks));
}

//! The fused LoRA linear (Hu et al., ICLR 2022), forward and backward as one op:
//!
//! ```text
//! forward    xa = drop(x) Aᵀ                       [T, r]   kept for backward
//!            y  = x Wᵀ + s · xa Bᵀ                 [T, out] (the add accumulates into y)
//! backward   g  = dy B                             [T, r]
//!            dx = dy W + s · mask ⊙ (g A)          [T, in]  (accumulated into dx)
//!            dA = s · gᵀ drop(x)                   [r, in]
//!            dB = s · dyᵀ xa                       [out, r]
//! ```
//!
//! What it keeps for backward: the op's inputs x, A, B (candle holds them), `xa`, and with
//! dropout the mask and `drop(x)`. The unfused candle graph keeps, besides, the [T, out] branch
//! output twice (before and after scaling) and the sum's inputs. On CUDA the GEMMs run in cuBLAS
//! (f32 accumulation, `s` passed as an f32 scalar) and the branch is added into y and dx in place
//! (`lowrank_add`), so no [T, out] or [T, in] temporary exists besides y and dx.
//!
//! Layout: x [T, in], W [out, in], A [r, in], B [out, r], mask [T, in]; row-major, contiguous,
//! one dtype (A and B are cast to x's dtype by the caller, as autocast would).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor};

use super::lowrank_add::{lowrank_add, Factor};
use super::{cpu_storage, cpu_values, tensor_values};
use crate::Result;

/// The CPU reference of the forward: returns (y [T, out], xa [T, r]), accumulated in f64.
#[allow(clippy::too_many_arguments)]
pub fn lora_forward_reference(
    x: &[f64],
    xd: &[f64],
    w: &[f64],
    a: &[f64],
    b: &[f64],
    (t, d_in, d_out, r): (usize, usize, usize, usize),
    scale: f64,
) -> (Vec<f64>, Vec<f64>) {
    let dot = |u: &[f64], v: &[f64]| u.iter().zip(v).map(|(p, q)| p * q).sum::<f64>();
    let mut xa = vec![0.0; t * r];
    let mut y = vec![0.0; t * d_out];
    for i in 0..t {
        let (xi, xdi) = (&x[i * d_in..(i + 1) * d_in], &xd[i * d_in..(i + 1) * d_in]);
        for k in 0..r {
            xa[i * r + k] = dot(xdi, &a[k * d_in..(k + 1) * d_in]);
        }
        for o in 0..d_out {
            let branch = dot(&xa[i * r..(i + 1) * r], &b[o * r..(o + 1) * r]);
            y[i * d_out + o] = dot(xi, &w[o * d_in..(o + 1) * d_in]) + scale * branch;
        }
    }
    (y, xa)
}

/// `x Wᵀ + s · (drop(x) Aᵀ) Bᵀ` for x [..., in], as one op with its own backward. `a` and `b`
/// must already be in x's dtype; `mask` is the dropout mask (divided by 1 − p) of x's shape.
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let d_in = *dims.last().ok_or_else(|| crate::Error::msg("lora_linear: x is a scalar"))?;
    let (d_out, w_in) = w.dims2()?;
    let (r, a_in) = a.dims2()?;
    if w_in != d_in || a_in != d_in || b.dims() != [d_out, r] {
        return Err(crate::Error::msg(format!(
            "lora_linear: x {:?}, W {:?}, A {:?}, B {:?} do not fit together",
            x.dims(),
            w.dims(),
            a.dims(),
            b.dims()
        )));
    }
    let x2 = x.contiguous()?.reshape(((), d_in))?;
    let (mask, dropped) = match mask {
        Some(m) => {
            let m = m.contiguous()?.reshape(((), d_in))?;
            let xd = (x2.detach() * &m)?;
            (Some(m), Some(xd))
        }
        None => (None, None),
    };
    let op = LoraLinearOp { w: w.contiguous()?.detach(), scale, mask, dropped, xa: Mutex::new(None) };
    let y = x2.apply_op3(&a.contiguous()?, &b.contiguous()?, op)?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("checked above") = d_out;
    Ok(y.reshape(out_dims)?)
}

struct LoraLinearOp {
    w: Tensor,
    scale: f64,
    mask: Option<Tensor>,
    /// drop(x), when dropout is active (else x itself is the adapter's input).
    dropped: Option<Tensor>,
    /// `drop(x) Aᵀ`, written by the forward for the backward.
    xa: Mutex<Option<Tensor>>,
}

impl LoraLinearOp {
    fn save_xa(&self, xa: Tensor) {
        *self.xa.lock().expect("xa lock") = Some(xa);
    }
}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (t, d_in) = lx.shape().dims2()?;
        let (d_out, r) = lb.shape().dims2()?;
        let xv = cpu_values(x, lx, self.name())?;
        let xd = match &self.dropped {
            Some(d) => tensor_values(d)?,
            None => xv.clone(),
        };
        let (y, xa) = lora_forward_reference(
            &xv,
            &xd,
            &tensor_values(&self.w)?,
            &cpu_values(a, la, self.name())?,
            &cpu_values(b, lb, self.name())?,
            (t, d_in, d_out, r),
            self.scale,
        );
        let dtype = x.dtype();
        let xa = Tensor::from_vec(xa, (t, r), &Device::Cpu)?.to_dtype(dtype)?;
        self.save_xa(xa);
        Ok((cpu_storage(y, dtype)?, Shape::from((t, d_out))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        a: &candle_core::CudaStorage,
        la: &Layout,
        b: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (y, xa) = super::cuda::lora_forward(&self.w, self.dropped.as_ref(), self.scale, (x, lx), (a, la), (b, lb))?;
        self.save_xa(xa);
        Ok(y)
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let xa = self.xa.lock().expect("xa lock").clone();
        let Some(xa) = xa else { candle_core::bail!("fused-lora-linear: backward before forward") };
        let g = dy.matmul(b)?;
        let dx = dy.matmul(&self.w)?;
        lowrank_add(&dx, &g, a, Factor::Transposed, self.mask.as_ref(), self.scale)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let input = self.dropped.as_ref().unwrap_or(x);
        let da = (g.t()?.matmul(input)? * self.scale)?;
        let db = (dy.t()?.matmul(&xa)? * self.scale)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

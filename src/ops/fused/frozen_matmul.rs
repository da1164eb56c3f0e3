//! The frozen linears: `x Wᵀ` without `∂W`, alone, into the residual, and after SwiGLU.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};

use super::*;
use crate::ops::{cpu_tensor, tensor_cpu_storage};
use crate::quant::BaseWeight;
use candle_core::{DType, Device};
use crate::selftest::{forward_backward, Case};

/// `x Wᵀ` with W a constant: x [..., in], W [out, in] held by the op as the layer holds it (an
/// NF4 base stays packed, dequantized in forward and again in backward). candle's matmul would
/// also compute and keep ∂L/∂W (an extra GEMM and an [in, out] tensor held until backward
/// ends); this op's backward gives only `dx = dy W`.
pub struct FrozenMatmulT {
    pub weight: BaseWeight,
}

/// `residual + x Wᵀ` with W constant: a frozen projection that only adds into the residual
/// stream (the attention's o_proj, the MLP's down_proj). As one node the graph holds x and the
/// residual, which it holds anyway, and not the projection's output, which no backward reads
/// (candle's add node would keep it: [tokens, hidden] a layer). Backward: `dx = dy W`, and dy
/// itself for the residual.
pub struct FrozenMatmulTAdd {
    pub projection: FrozenMatmulT,
}

impl CustomOp2 for FrozenMatmulTAdd {
    fn name(&self) -> &'static str {
        "frozen-matmul-t-add"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let product = self.projection.product(&cpu_tensor(s1, l1, self.name())?)?;
        let residual = cpu_tensor(s2, l2, self.name())?;
        if residual.shape() != product.shape() {
            candle_core::bail!("{}: residual {:?} for an output {:?}", self.name(), residual.dims(), product.dims());
        }
        let y = (residual + product)?;
        Ok((tensor_cpu_storage(&y)?, y.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::frozen_matmul_t_add(&*self.projection.dense()?, (s1, l1), (s2, l2))
    }

    fn bwd(&self, x: &Tensor, _residual: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = self.projection.bwd(x, y, dy)?;
        Ok((dx, Some(dy.detach())))
    }
}

/// `residual + (silu(g) ⊙ u) Wᵀ` with W constant: the MLP's SwiGLU and its frozen down_proj
/// adding into the residual, as one node. The graph holds g, u and the residual, which it holds
/// anyway (SwiGLU's backward reads g and u), and not the activation `silu(g) ⊙ u` [tokens,
/// intermediate] (86 MiB a LLaMA-7B layer at 4,096 tokens in bf16), a transient of the forward
/// that only the frozen projection read. Backward: `da = dy W`, then SwiGLU's backward of `da`,
/// and dy itself for the residual.
pub struct SwiGluProjectAdd {
    pub projection: FrozenMatmulTAdd,
}

/// The backward reads g, u and dy, never y.
impl OutputFreeBackward for SwiGluProjectAdd {}

impl CustomOp3 for SwiGluProjectAdd {
    fn name(&self) -> &'static str {
        "swiglu-frozen-matmul-t-add"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        lg: &Layout,
        u: &CpuStorage,
        lu: &Layout,
        residual: &CpuStorage,
        lr: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (activation, shape) = SwiGlu.cpu_fwd(g, lg, u, lu)?;
        self.projection.cpu_fwd(&activation, &Layout::contiguous(shape), residual, lr)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        lg: &Layout,
        u: &candle_core::CudaStorage,
        lu: &Layout,
        residual: &candle_core::CudaStorage,
        lr: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (activation, shape) = SwiGlu.cuda_fwd(g, lg, u, lu)?;
        self.projection.cuda_fwd(&activation, &Layout::contiguous(shape), residual, lr)
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _residual: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(da) = self.projection.projection.bwd(g, y, dy)? else {
            candle_core::bail!("{}: the projection gave no input gradient", self.name())
        };
        // SwiGLU's backward reads g, u and the gradient only (its output stands in unread).
        let (dg, du) = SwiGlu.bwd(g, u, y, &da.reshape(g.shape())?)?;
        Ok((dg, du, Some(dy.detach())))
    }
}

/// `residual + γ ⊙ (GELU(a) Wᵀ + b)` with W, b and γ constant: the ViT MLP's exact GELU, its
/// frozen fc2 and its LayerScale adding into the residual, as one node. The graph holds a
/// (GELU's backward reads it) and the residual, and not GELU(a) [tokens, mlp], which only the
/// frozen fc2 read (as separate ops the graph would keep it until backward, and the bias and
/// LayerScale would each be a pass of their own). Backward: `da = GELU′(a) ⊙ ((dy ⊙ γ) W)`, and
/// dy itself for the residual. γ is None without LayerScale.
pub struct GeluProjectAdd {
    pub projection: FrozenMatmulT,
    pub bias: Tensor,
    pub scale: Option<Tensor>,
}

impl OutputFreeBackward for GeluProjectAdd {}

impl CustomOp2 for GeluProjectAdd {
    fn name(&self) -> &'static str {
        "gelu-frozen-matmul-t-add"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (activation, shape) = super::Gelu.cpu_fwd(s1, l1)?;
        let branch = self.projection.product(&cpu_tensor(&activation, &Layout::contiguous(shape), self.name())?)?.broadcast_add(&self.bias)?;
        let branch = match &self.scale {
            Some(g) => branch.broadcast_mul(g)?,
            None => branch,
        };
        let residual = cpu_tensor(s2, l2, self.name())?;
        if residual.shape() != branch.shape() {
            candle_core::bail!("{}: residual {:?} for an output {:?}", self.name(), residual.dims(), branch.dims());
        }
        let y = (residual + branch)?;
        Ok((tensor_cpu_storage(&y)?, y.shape().clone()))
    }

    fn bwd(&self, a: &Tensor, _residual: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let scaled = match &self.scale {
            Some(g) => dy.broadcast_mul(g)?,
            None => dy.clone(),
        };
        let Some(dactivation) = self.projection.bwd(a, y, &scaled)? else {
            candle_core::bail!("{}: the projection gave no input gradient", self.name())
        };
        let da = super::Gelu.bwd(a, y, &dactivation)?;
        Ok((da, Some(dy.detach())))
    }
}

impl FrozenMatmulT {
    fn dense(&self) -> candle_core::Result<std::borrow::Cow<'_, Tensor>> {
        self.weight.dense().map_err(candle_core::Error::wrap)
    }

    /// `x Wᵀ` on the CPU, x [..., in].
    fn product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.dense()?;
        let (out, inp) = w.dims2()?;
        let dims = x.dims().to_vec();
        if dims.last() != Some(&inp) {
            candle_core::bail!("{}: x {:?} against W [{out}, {inp}]", self.name(), dims);
        }
        let rows = x.elem_count() / inp.max(1);
        let y = crate::ops::frozen_x_wt(&x.reshape((rows, inp))?, &w)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("x has a last dim") = out;
        y.reshape(out_dims)
    }
}

impl CustomOp1 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.product(&cpu_tensor(storage, layout, self.name())?)?;
        Ok((tensor_cpu_storage(&y)?, y.shape().clone()))
    }

    /// cuBLAS on the CUDA storage (f32 accumulation), W in x's dtype.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &candle_core::CudaStorage, layout: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::frozen_matmul_t(&*self.dense()?, storage, layout)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let w = self.dense()?;
        let out = w.dim(0)?;
        let rows = dy.elem_count() / out.max(1);
        let dx = crate::ops::frozen_dy_w(&dy.reshape((rows, out))?, &w)?.reshape(x.shape())?;
        Ok(Some(dx))
    }
}

impl OutputFreeBackward for FrozenMatmulT {}

// The op on a device against its CPU reference (`candle-peft selftest`).

/// The frozen projections into the residual (o_proj, down_proj) as training runs them: a copy,
/// then a GEMM with β = 1; and SwiGLU, the down projection and the residual as one op (the
/// activation a transient). Against the CPU ops in f64.
pub fn selftest(c: &mut Case) -> crate::Result<()> {
    use crate::ops::nn::{frozen_matmul_t_add, swiglu_frozen_matmul_t_add};
    let (rows, width, d_in) = (c.odd(33, 300), c.odd(65, 1100), c.odd(33, 500));
    let (a, proj) = (c.draw(&[rows, d_in], 1.0)?, c.draw(&[width, d_in], 0.1)?);
    let (residual, weights) = (c.draw(&[rows, width], 1.0)?, c.draw(&[rows, width], 1.0)?);
    let shape = format!("{rows}x{d_in} -> {width}");
    let run = |device: &Device, dtype: DType| -> crate::Result<(Tensor, Vec<Tensor>)> {
        let w = proj.to_dtype(dtype)?.to_device(device)?.into();
        forward_backward(device, dtype, &[&a, &residual], &weights, &|t| frozen_matmul_t_add(&t[0], &w, &t[1]))
    };
    let ((y, g), (y_ref, g_ref)) = (run(c.device, c.dtype)?, run(&Device::Cpu, DType::F64)?);
    c.record_pass("frozen_matmul_add", &shape, &["y", "dx", "dres"], (&y, &g), (&y_ref, &g_ref))?;
    let (gate, up) = (c.draw(&[rows, d_in], 2.0)?, c.draw(&[rows, d_in], 1.0)?);
    let run = |device: &Device, dtype: DType| -> crate::Result<(Tensor, Vec<Tensor>)> {
        let w = proj.to_dtype(dtype)?.to_device(device)?.into();
        forward_backward(device, dtype, &[&gate, &up, &residual], &weights, &|t| swiglu_frozen_matmul_t_add(&t[0], &t[1], &w, &t[2], true))
    };
    let ((y, g), (y_ref, g_ref)) = (run(c.device, c.dtype)?, run(&Device::Cpu, DType::F64)?);
    c.record_pass("swiglu_matmul_add", &shape, &["y", "dg", "du", "dres"], (&y, &g), (&y_ref, &g_ref))
}

#[cfg(test)]
mod selftest_tests {
    use super::*;

    /// The checks run and pass with the CPU on both sides, so a failure on a GPU is the kernel's.
    #[test]
    fn the_selftest_checks_pass_on_the_cpu_reference() {
        crate::selftest::passes_on_the_cpu(selftest, 3 + 4);
    }
}

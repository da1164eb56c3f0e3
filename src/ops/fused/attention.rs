//! The training attention core, flash-style on the CPU.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};

use crate::ops::{cpu_tensor, tensor_cpu_storage};

/// Each of the `n` groups of heads repeated: [b, h, t, d] to [b, h·n, t, d] (GQA).
pub fn repeat_heads(x: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, h, t, d) = x.dims4()?;
    x.unsqueeze(2)?.expand((b, h, n, t, d))?.reshape((b, h * n, t, d))
}

/// The attention core for training, flash-style: q [b, h, t, d], k and v [b, g, s, d] (h a
/// multiple of g: grouped-query attention, each key/value head serving h/g query heads), the
/// additive bias [b, 1, t, s] of `ops::attention_bias` (causal and padding) held by the op:
/// `o = softmax(q kᵀ · scale + bias) v`, returned with the heads merged, [b, t, h·d] (the
/// layout the output projection reads). Saves q, k, v, o (the graph's) and, in the op, the
/// per-row log-sum-exp `ℓ` [b, h, t, 1]; the [b, h, t, s] probabilities live only inside the
/// forward and are recomputed by the backward as `P = exp(q kᵀ · scale + bias − ℓ)`:
/// `dv = Pᵀ do`, `dP = do vᵀ`, `dS = P ⊙ (dP − rowsum(do ⊙ o))`, `dq = scale · dS k`,
/// `dk = scale · dSᵀ q` (dk and dv summed over each group).
pub struct Attention {
    pub bias: Tensor,
    pub scale: f64,
    /// The bias masks every key j > (s − t) + i of query row i: the flash kernels skip them.
    pub causal: bool,
    /// The CUDA kernels (`ops::attention_kernel()` when built); heads over
    /// `attention::MAX_HEAD_DIM` take gemm whatever this says.
    pub kernel: crate::ops::AttentionKernel,
    lse: OnceLock<Tensor>,
}

impl Attention {
    /// Any bias [b, 1, t, s].
    pub fn new(bias: Tensor, scale: f64) -> Self {
        Self { bias, scale, causal: false, kernel: crate::ops::attention_kernel(), lse: OnceLock::new() }
    }

    /// The same op on the given CUDA kernels.
    pub fn on(self, kernel: crate::ops::AttentionKernel) -> Self {
        Self { kernel, ..self }
    }

    /// The kernels that run heads of dimension `d`.
    #[cfg(feature = "cuda")]
    fn cuda_kernel(&self, d: usize) -> crate::ops::AttentionKernel {
        if d > crate::ops::cuda::attention::MAX_HEAD_DIM {
            crate::ops::AttentionKernel::Gemm
        } else {
            self.kernel
        }
    }

    /// A bias that masks at least what `ops::attention_bias` masks (the keys after each row's
    /// own position).
    pub fn causal(bias: Tensor, scale: f64) -> Self {
        Self { causal: true, ..Self::new(bias, scale) }
    }

    /// The shapes of q, k, v and the bias checked against each other; returns q's dims.
    fn check(&self, l1: &Layout, l2: &Layout, l3: &Layout) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (b, h, t, d) = l1.shape().dims4()?;
        let (bk, g, s, dk) = l2.shape().dims4()?;
        if bk != b || dk != d || g == 0 || !h.is_multiple_of(g) || l3.shape() != l2.shape() {
            candle_core::bail!("{}: q {:?}, k {:?}, v {:?} do not fit", self.name(), l1.shape(), l2.shape(), l3.shape());
        }
        if self.bias.dims() != [b, 1, t, s] {
            candle_core::bail!("{}: bias {:?} does not fit [{b}, 1, {t}, {s}]", self.name(), self.bias.dims());
        }
        Ok((b, h, t, d))
    }

    fn save_lse(&self, lse: Tensor) -> candle_core::Result<()> {
        if self.lse.set(lse).is_err() {
            candle_core::bail!("fused-attention: an op value is applied once");
        }
        Ok(())
    }

    fn scores(&self, q: &Tensor, k: &Tensor) -> candle_core::Result<Tensor> {
        (q * self.scale)?.matmul(&k.t()?)?.broadcast_add(&self.bias.to_dtype(q.dtype())?)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, t, d) = self.check(l1, l2, l3)?;
        let g = l2.dims()[1];
        let q = cpu_tensor(s1, l1, self.name())?;
        let k = repeat_heads(&cpu_tensor(s2, l2, self.name())?, h / g)?;
        let v = repeat_heads(&cpu_tensor(s3, l3, self.name())?, h / g)?;
        let scores = self.scores(&q, &k)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        drop(scores);
        let sum = e.sum_keepdim(D::Minus1)?;
        let o = e.broadcast_div(&sum)?.matmul(&v)?;
        drop(e);
        self.save_lse((max + sum.log()?)?)?;
        let o = o.transpose(1, 2)?.reshape((b, t, h * d))?;
        Ok((tensor_cpu_storage(&o)?, Shape::from((b, t, h * d))))
    }

    /// `kernels/attention.cu` (flash: the probabilities never leave the chip, head dim ≤ 128)
    /// or `kernels/attention_gemm.cu` (gemm: cuBLAS products around row kernels).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (_, _, _, d) = self.check(l1, l2, l3)?;
        let (o, lse) = match self.cuda_kernel(d) {
            crate::ops::AttentionKernel::Flash => crate::ops::cuda::attention::forward(&self.bias, self.scale, self.causal, (s1, l1), (s2, l2), (s3, l3))?,
            crate::ops::AttentionKernel::Gemm => crate::ops::cuda::attention_gemm::forward(&self.bias, self.scale, (s1, l1), (s2, l2), (s3, l3))?,
        };
        self.save_lse(lse)?;
        Ok(o)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        dout: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.lse.get() else { candle_core::bail!("{}: backward before forward", self.name()) };
        let (q, k, v, o) = (q.detach(), k.detach(), v.detach(), o.detach());
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let dout = dout.detach();
            let (dq, dk, dv) = match self.cuda_kernel(q.dim(D::Minus1)?) {
                crate::ops::AttentionKernel::Flash => crate::ops::cuda::attention::backward(&self.bias, self.scale, self.causal, &q, &k, &v, &o, &dout, lse)?,
                crate::ops::AttentionKernel::Gemm => crate::ops::cuda::attention_gemm::backward(&self.bias, self.scale, &q, &k, &v, &o, &dout, lse)?,
            };
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let (b, h, t, d) = q.dims4()?;
        let (_, g, s, _) = k.dims4()?;
        let n = h / g;
        let heads = |x: &Tensor| x.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous();
        let (o, dout) = (heads(&o)?, heads(dout)?);
        let (kx, vx) = (repeat_heads(&k, n)?, repeat_heads(&v, n)?);
        let p = self.scores(&q, &kx)?.broadcast_sub(lse)?.exp()?;
        let dv = p.t()?.matmul(&dout)?;
        let dp = dout.matmul(&vx.t()?)?;
        let rowdot = (&dout * &o)?.sum_keepdim(D::Minus1)?;
        let ds = (p * dp.broadcast_sub(&rowdot)?)?;
        let dq = (ds.matmul(&kx)? * self.scale)?;
        let dk = (ds.t()?.matmul(&q)? * self.scale)?;
        let group = |x: Tensor| -> candle_core::Result<Tensor> {
            if n == 1 {
                Ok(x)
            } else {
                x.reshape((b, g, n, s, d))?.sum(2)
            }
        };
        Ok((Some(dq), Some(group(dk)?), Some(group(dv)?)))
    }
}

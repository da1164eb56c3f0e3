//! The attention-heads split with RoPE, alone and inside a projection.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor, WithDType, D};
use num_traits::Float;

use super::*;
use candle_core::{DType, Device};
use rand::Rng;
use crate::ops::dropout::DropoutMask;
use crate::selftest::{forward_backward, Case};

/// The heads split and rotary embedding of one projection: x [b, t, n·d] (the linear's output)
/// to y [b, n, t, d] with `y₁ = x₁ cos − x₂ sin`, `y₂ = x₂ cos + x₁ sin` (Hugging Face's
/// rotate-half layout, halves of d); without a rotation (v) the split alone. Saves nothing
/// (the graph holds x: see [`ProjectedHeads`] for the op that does not). Backward, the inverse
/// rotation moved back to [b, t, n·d]: `dx₁ = dy₁ cos + dy₂ sin`, `dx₂ = dy₂ cos − dy₁ sin`. On
/// CUDA both directions are `kernels/rope.cu`.
pub struct RopeHeads {
    pub heads: usize,
    /// (cos, sin), contiguous [b, 1, t, d/2] in x's dtype; None for the split alone.
    pub rotation: Option<(Tensor, Tensor)>,
}

/// The sizes of one heads split: batch, tokens, heads, head dim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadsShape {
    pub batch: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

fn rope_heads_values<T: Float + WithDType>(x: &[T], rotation: Option<(&[T], &[T])>, s: HeadsShape) -> Vec<T> {
    let (d, half) = (s.head_dim, s.head_dim / 2);
    let mut out = vec![T::zero(); x.len()];
    for bi in 0..s.batch {
        for ti in 0..s.tokens {
            let row = bi * s.tokens + ti;
            for h in 0..s.heads {
                let src = &x[(row * s.heads + h) * d..][..d];
                let dst = &mut out[((bi * s.heads + h) * s.tokens + ti) * d..][..d];
                match rotation {
                    Some((cos, sin)) => {
                        let (cs, sn) = (&cos[row * half..][..half], &sin[row * half..][..half]);
                        for i in 0..half {
                            let (x1, x2) = (src[i], src[i + half]);
                            dst[i] = x1 * cs[i] - x2 * sn[i];
                            dst[i + half] = x2 * cs[i] + x1 * sn[i];
                        }
                    }
                    None => dst.copy_from_slice(src),
                }
            }
        }
    }
    out
}

impl RopeHeads {
    /// The split of `width` columns over `batch · tokens` rows, checked against the heads and
    /// the tables.
    pub fn shape(&self, batch: usize, tokens: usize, width: usize) -> candle_core::Result<HeadsShape> {
        let n = self.heads;
        if n == 0 || !width.is_multiple_of(n) || !(width / n).is_multiple_of(2) {
            candle_core::bail!("fused-rope-heads: width {width} is not {n} heads of an even size");
        }
        let shape = HeadsShape { batch, tokens, heads: n, head_dim: width / n };
        if let Some((cos, sin)) = &self.rotation {
            let table = [batch, 1, tokens, shape.head_dim / 2];
            if cos.dims() != table || sin.dims() != table {
                candle_core::bail!("fused-rope-heads: cos {:?} / sin {:?} do not fit {table:?}", cos.dims(), sin.dims());
            }
        }
        Ok(shape)
    }

    fn shape_of(&self, layout: &Layout) -> candle_core::Result<HeadsShape> {
        let (b, t, width) = layout.shape().dims3()?;
        self.shape(b, t, width)
    }

    fn tables(&self) -> Option<(&Tensor, &Tensor)> {
        self.rotation.as_ref().map(|(c, s)| (c, s))
    }

    fn cpu_split(&self, storage: &CpuStorage, layout: &Layout, shape: HeadsShape) -> candle_core::Result<CpuStorage> {
        Ok(match storage {
            CpuStorage::F32(v) => CpuStorage::F32(self.split_values(contiguous(v, layout, "fused-rope-heads")?, shape)?),
            CpuStorage::F64(v) => CpuStorage::F64(self.split_values(contiguous(v, layout, "fused-rope-heads")?, shape)?),
            other => candle_core::bail!("fused-rope-heads: unsupported dtype {:?}", other.dtype()),
        })
    }

    fn split_values<T: Float + WithDType>(&self, x: &[T], shape: HeadsShape) -> candle_core::Result<Vec<T>> {
        let values = |t: &Tensor| t.flatten_all()?.to_vec1::<T>();
        let tables = self.tables().map(|(c, s)| Ok::<_, candle_core::Error>((values(c)?, values(s)?))).transpose()?;
        Ok(rope_heads_values(x, tables.as_ref().map(|(c, s)| (c.as_slice(), s.as_slice())), shape))
    }

    /// dx [b, t, n·d] from dy [b, n, t, d]: the inverse rotation, not tracked by autograd.
    pub fn input_gradient(&self, dy: &Tensor, shape: HeadsShape) -> candle_core::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if dy.device().is_cuda() {
            return crate::ops::cuda::rope::backward(dy, self.tables(), shape);
        }
        let dy = dy.detach();
        let back = match self.tables() {
            Some((cos, sin)) => {
                let half = shape.head_dim / 2;
                let d1 = dy.narrow(D::Minus1, 0, half)?;
                let d2 = dy.narrow(D::Minus1, half, half)?;
                let a = (d1.broadcast_mul(cos)? + d2.broadcast_mul(sin)?)?;
                let b = (d2.broadcast_mul(cos)? - d1.broadcast_mul(sin)?)?;
                Tensor::cat(&[a, b], D::Minus1)?
            }
            None => dy,
        };
        back.transpose(1, 2)?.reshape((shape.batch, shape.tokens, shape.heads * shape.head_dim))
    }
}

impl CustomOp1 for RopeHeads {
    fn name(&self) -> &'static str {
        "fused-rope-heads"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = self.shape_of(layout)?;
        Ok((self.cpu_split(storage, layout, s)?, Shape::from((s.batch, s.heads, s.tokens, s.head_dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &candle_core::CudaStorage, layout: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::ops::cuda::rope::forward((storage, layout), self.tables(), self.shape_of(layout)?)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (b, t, width) = x.dims3()?;
        Ok(Some(self.input_gradient(dy, self.shape(b, t, width)?)?))
    }
}

/// A projection op whose backward does not read the op's output (only its inputs and what the
/// op saved), so [`ProjectedHeads`] may hand it the heads in that place.
pub trait OutputFreeBackward {}

/// A projection of x [b, t, in] (rows flattened or not) whose output goes straight into the
/// attention heads: the [b·t, n·d] product is a transient of the forward, moved into heads (and
/// rotated) by [`RopeHeads`] inside the op, so the graph holds the projection's inputs and the
/// heads (which attention holds anyway), not the product: for q, k and v a [tokens, hidden]
/// tensor each per layer. Backward: the heads' gradient moved back to [b·t, n·d], then the
/// projection's own backward.
pub struct ProjectedHeads<Op> {
    pub projection: Op,
    pub heads: RopeHeads,
    pub batch: usize,
}

impl<Op> ProjectedHeads<Op> {
    /// The split of the projection's output, of shape `product`.
    fn shape(&self, product: &Shape) -> candle_core::Result<HeadsShape> {
        let width = product.dims().last().copied().unwrap_or(1);
        let rows = product.elem_count() / width.max(1);
        if self.batch == 0 || !rows.is_multiple_of(self.batch) {
            candle_core::bail!("projected heads: {rows} rows are not a batch of {}", self.batch);
        }
        self.heads.shape(self.batch, rows / self.batch, width)
    }

    fn split_cpu(&self, (storage, product): (CpuStorage, Shape)) -> candle_core::Result<(CpuStorage, Shape)> {
        let s = self.shape(&product)?;
        let layout = Layout::contiguous((s.batch, s.tokens, s.heads * s.head_dim));
        Ok((self.heads.cpu_split(&storage, &layout, s)?, Shape::from((s.batch, s.heads, s.tokens, s.head_dim))))
    }

    #[cfg(feature = "cuda")]
    fn split_cuda(&self, (storage, product): (candle_core::CudaStorage, Shape)) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let s = self.shape(&product)?;
        crate::ops::cuda::rope::forward((&storage, &Layout::contiguous(product)), self.heads.tables(), s)
    }

    /// The gradient of the projection's output [b·t, n·d] from the heads'.
    fn product_gradient(&self, dy: &Tensor) -> candle_core::Result<Tensor> {
        let (b, n, t, d) = dy.dims4()?;
        let s = HeadsShape { batch: b, tokens: t, heads: n, head_dim: d };
        self.heads.input_gradient(dy, s)?.reshape((b * t, n * d))
    }
}

impl<Op: CustomOp1 + OutputFreeBackward> CustomOp1 for ProjectedHeads<Op> {
    fn name(&self) -> &'static str {
        self.projection.name()
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.split_cpu(self.projection.cpu_fwd(s, l)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.split_cuda(self.projection.cuda_fwd(s, l)?)
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.projection.bwd(x, y, &self.product_gradient(dy)?)
    }
}

impl<Op: CustomOp3 + OutputFreeBackward> CustomOp3 for ProjectedHeads<Op> {
    fn name(&self) -> &'static str {
        self.projection.name()
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
        self.split_cpu(self.projection.cpu_fwd(s1, l1, s2, l2, s3, l3)?)
    }

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
        self.split_cuda(self.projection.cuda_fwd(s1, l1, s2, l2, s3, l3)?)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.projection.bwd(a, b, c, y, &self.product_gradient(dy)?)
    }
}

// The op on a device against its CPU reference (`candle-peft selftest`).

/// The attention heads of a projection (`kernels/rope.cu`): the split with RoPE (q, k) and
/// without (v), as its own op and inside the frozen, LoRA and DoRA projections.
pub fn selftest(c: &mut Case) -> crate::Result<()> {
    use crate::quant::BaseWeight;
    use crate::ops::nn::{frozen_matmul_t_heads, AttentionHeads};
    let (b, t, n, d) = (2, c.odd(5, 70), 3, 2 * c.odd(3, 33));
    let shape = format!("b{b} t{t} h{n} d{d}");
    let x = c.draw(&[b, t, n * d], 1.0)?;
    let angles = c.draw(&[b, 1, t, d / 2], 3.0)?;
    let weights = c.draw(&[b, n, t, d], 1.0)?;
    let tables = |device: &Device, dtype: DType| -> crate::Result<(Tensor, Tensor)> {
        Ok((angles.cos()?.to_dtype(dtype)?.to_device(device)?, angles.sin()?.to_dtype(dtype)?.to_device(device)?))
    };
    for rotate in [true, false] {
        let kernel = if rotate { "rope_heads" } else { "heads_split" };
        let run = |device: &Device, dtype: DType| {
            let (cos, sin) = tables(device, dtype)?;
            let heads = if rotate { AttentionHeads::rotated(n, &cos, &sin) } else { AttentionHeads::plain(n) };
            forward_backward(device, dtype, &[&x], &weights, &|v| heads.split(&v[0], true))
        };
        let ((y, g), (y_ref, g_ref)) = (run(c.device, c.dtype)?, run(&Device::Cpu, DType::F64)?);
        c.record_pass(kernel, &shape, &["y", "dx"], (&y, &g), (&y_ref, &g_ref))?;
    }
    let (d_in, r, s) = (c.odd(33, 300), c.odd(1, 40), 1.7);
    let x = c.draw(&[b, t, d_in], 1.0)?;
    let (w, a, bm) = (c.draw(&[n * d, d_in], 0.1)?, c.draw(&[r, d_in], 0.1)?, c.draw(&[n * d, r], 0.1)?);
    let k = (c.draw(&[n * d], 0.3)? + 1.0)?;
    let mask = Some(DropoutMask { seed: c.rng.random(), keep: 0.9 });
    let shape = format!("{shape} in{d_in} r{r}");
    for projection in ["frozen", "lora", "dora"] {
        let kernel = format!("{projection}_heads");
        let inputs: Vec<&Tensor> = match projection {
            "frozen" => vec![&x],
            "lora" => vec![&x, &a, &bm],
            _ => vec![&x, &a, &bm, &k],
        };
        let run = |device: &Device, dtype: DType| {
            let (cos, sin) = tables(device, dtype)?;
            let heads = AttentionHeads::rotated(n, &cos, &sin);
            let w: BaseWeight = w.to_dtype(dtype)?.to_device(device)?.into();
            forward_backward(device, dtype, &inputs, &weights, &|v| match projection {
                "frozen" => frozen_matmul_t_heads(&v[0], &w, heads, true),
                "lora" => crate::ops::lora_linear_heads(&v[0], &w, (&v[1], &v[2]), s, mask, heads),
                _ => crate::ops::dora_linear_heads(&v[0], &w, (&v[1], &v[2], &v[3]), s, mask, heads),
            })
        };
        let ((y, g), (y_ref, g_ref)) = (run(c.device, c.dtype)?, run(&Device::Cpu, DType::F64)?);
        c.record_pass(&kernel, &shape, &["y", "dx", "dA", "dB", "dk"], (&y, &g), (&y_ref, &g_ref))?;
    }
    Ok(())
}

#[cfg(test)]
mod selftest_tests {
    use super::*;

    /// The checks run and pass with the CPU on both sides, so a failure on a GPU is the kernel's.
    #[test]
    fn the_selftest_checks_pass_on_the_cpu_reference() {
        // Rotated and plain split (y, dx); the frozen, LoRA and DoRA projections into heads.
        crate::selftest::passes_on_the_cpu(selftest, 2 + 2 + 2 + 4 + 5);
    }
}

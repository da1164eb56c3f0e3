//! Host side of `kernels/rope.cu`: a projection's output [b, t, n·d] moved into attention heads
//! [b, n, t, d], rotated by RoPE for q and k, and the gradient moved back, for
//! `ops::fused::RopeHeads` (the CPU reference).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{bail, DType, Result, Shape, Tensor};
use half::{bf16, f16};

use super::{cuda_storage, grid_stride, view, wrap, Arg, KernelType, ROPE_PTX};
use crate::cuda::with_kernel_type;
use crate::ops::fused::HeadsShape;

fn pairs(s: HeadsShape) -> usize {
    s.batch * s.tokens * s.heads * s.head_dim / 2
}

fn kernel_args(s: HeadsShape) -> Result<[i32; 4]> {
    let int = |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("rope heads: {v} exceeds the kernel's int")));
    Ok([int(s.batch)?, int(s.tokens)?, int(s.heads)?, int(s.head_dim / 2)?])
}

/// Runs `rope_heads_{direction}` from `src` (contiguous, `shape`'s element count) into a fresh buffer.
fn launch<T: KernelType>(
    direction: &str,
    dev: &CudaDevice,
    src: &CudaView<'_, T>,
    rotation: Option<(&Tensor, &Tensor)>,
    shape: HeadsShape,
) -> Result<CudaSlice<T>> {
    let n = pairs(shape) * 2;
    if src.len() != n || !shape.head_dim.is_multiple_of(2) {
        bail!("rope heads: {} elements are not {shape:?} (an even head dim)", src.len());
    }
    let table = shape.batch * shape.tokens * shape.head_dim / 2;
    let tables = match rotation {
        Some((cos, sin)) => {
            if cos.elem_count() != table || sin.shape() != cos.shape() || cos.dtype() != T::DTYPE || sin.dtype() != T::DTYPE {
                bail!("rope heads: cos {:?} {:?} / sin {:?} for {table} entries of {:?}", cos.dims(), cos.dtype(), sin.dims(), T::DTYPE);
            }
            Some((cos.contiguous()?, sin.contiguous()?))
        }
        None => None,
    };
    let guards = tables.as_ref().map(|(c, s)| (c.storage_and_layout(), s.storage_and_layout()));
    let (cos, sin) = match &guards {
        Some(((cs, cl), (ss, sl))) => (view::<T>(cuda_storage(cs, "rope cos")?, cl, "rope cos")?, view::<T>(cuda_storage(ss, "rope sin")?, sl, "rope sin")?),
        // Without a rotation the kernel reads no table: the source stands in for both pointers.
        None => (src.slice(0..n), src.slice(0..n)),
    };
    // SAFETY: the kernel writes both elements of every pair, all n.
    let out = unsafe { dev.alloc::<T>(n)? };
    let func = dev.get_or_load_custom_func(&format!("rope_heads_{direction}_{}", T::SUFFIX), "rope", ROPE_PTX)?;
    let [b, t, h, half] = kernel_args(shape)?;
    let rotate = i32::from(rotation.is_some());
    let mut builder = func.builder();
    builder.arg(src).arg(&cos).arg(&sin).arg(&out).arg(&b).arg(&t).arg(&h).arg(&half).arg(&rotate);
    // SAFETY: matches `rope_heads_*`; src and out hold n elements, the tables b·t·d/2.
    unsafe { builder.launch(grid_stride(pairs(shape))) }.w()?;
    Ok(out)
}

/// x [b, t, n·d] (any shape of that many elements, contiguous) to y [b, n, t, d], rotated when
/// `rotation` gives the (cos, sin) tables [b, 1, t, d/2].
pub fn forward((x, lx): Arg, rotation: Option<(&Tensor, &Tensor)>, shape: HeadsShape) -> Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let heads = Shape::from((shape.batch, shape.heads, shape.tokens, shape.head_dim));
    with_kernel_type!(x.dtype(), T, {
        let y = launch::<T>("forward", &dev, &view::<T>(x, lx, "rope heads input")?, rotation, shape)?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), heads))
    })
}

/// dy [b, n, t, d] to dx [b, t, n·d], the inverse rotation: a fresh tensor not tracked by autograd.
pub fn backward(dy: &Tensor, rotation: Option<(&Tensor, &Tensor)>, shape: HeadsShape) -> Result<Tensor> {
    let dy = dy.contiguous()?;
    let (storage, layout) = dy.storage_and_layout();
    let src = cuda_storage(&storage, "rope heads gradient")?;
    let dev = src.device().clone();
    let dims = (shape.batch, shape.tokens, shape.heads * shape.head_dim);
    with_kernel_type!(dy.dtype(), T, {
        let dx = launch::<T>("backward", &dev, &view::<T>(src, layout, "rope heads gradient")?, rotation, shape)?;
        Ok(wrap(dx, &dev, dims))
    })
}

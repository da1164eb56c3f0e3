//! Host side of `kernels/attention.cu`: the flash-style attention of training on the GPU, for
//! `ops::fused::Attention` (the model's attention and the nonlinear controller's mixing). What
//! is kept between forward and backward is q, k, v, o (the graph's) and lse [b, h, t] f32; no
//! [t, s] buffer exists at any point.
//!
//! ```text
//! forward    attention_forward    o, lse
//! backward   attention_dq         delta = rowsum(do ⊙ o), dq
//!            attention_dkdv       dk, dv (summed over each grouped-query group)
//! ```

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::backend::BackendStorage;
use candle_core::{bail, DType, Result, Shape, Tensor};
use half::{bf16, f16};

use super::{cuda_storage, view, wrap, Arg, KernelType, ATTENTION_PTX};
use crate::cuda::with_kernel_type;

/// The largest head dimension the kernels take (`MAX_D` in the .cu).
pub const MAX_HEAD_DIM: usize = 128;
const ROWS: usize = 8;

/// The sizes every kernel takes after its buffers: h, g, t, s, d (then scale and causal).
struct Dims {
    b: usize,
    h: usize,
    g: usize,
    t: usize,
    s: usize,
    d: usize,
}

impl Dims {
    fn new(q: &[usize], k: &[usize]) -> Result<Self> {
        let (&[b, h, t, d], &[bk, g, s, dk]) = (q, k) else { bail!("attention kernels: q {q:?}, k {k:?} must be 4-D") };
        if bk != b || dk != d || g == 0 || !h.is_multiple_of(g) || d > MAX_HEAD_DIM {
            bail!("attention kernels: q {q:?} and k {k:?} do not fit (head dim at most {MAX_HEAD_DIM})");
        }
        Ok(Self { b, h, g, t, s, d })
    }

    fn ints(&self) -> [i32; 5] {
        [self.h as i32, self.g as i32, self.t as i32, self.s as i32, self.d as i32]
    }

    fn rows_grid(&self, rows: usize, heads: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows.div_ceil(ROWS) as u32, (self.b * heads) as u32, 1), block_dim: (32 * ROWS as u32, 1, 1), shared_mem_bytes: 0 }
    }
}

/// The bias as the kernels read it: [b, t, s] in the activations' dtype, contiguous (the model's
/// bias already is: no copy per layer).
fn bias_in(bias: &Tensor, dtype: DType, d: &Dims) -> Result<Tensor> {
    if bias.dims() != [d.b, 1, d.t, d.s] {
        bail!("attention kernels: bias {:?} does not fit [{}, 1, {}, {}]", bias.dims(), d.b, d.t, d.s);
    }
    bias.to_dtype(dtype)?.contiguous()
}

/// `o [b, t, h·d]` and `lse [b, h, t]` (f32).
pub fn forward(bias: &Tensor, scale: f64, causal: bool, (q, lq): Arg, (k, lk): Arg, (v, lv): Arg) -> Result<((CudaStorage, Shape), Tensor)> {
    let dev = q.device().clone();
    let dims = Dims::new(lq.dims(), lk.dims())?;
    if lv.dims() != lk.dims() || k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        bail!("attention kernels: v {:?} against k {:?} (one dtype for q, k, v)", lv.dims(), lk.dims());
    }
    let bias = bias_in(bias, q.dtype(), &dims)?;
    let (bias_s, bias_l) = bias.storage_and_layout();
    let bias_s = cuda_storage(&bias_s, "attention bias")?;
    let Dims { b, h, t, d, .. } = dims;
    with_kernel_type!(q.dtype(), T, {
        let (qv, kv, vv) = (view::<T>(q, lq, "q")?, view::<T>(k, lk, "k")?, view::<T>(v, lv, "v")?);
        let biasv = view::<T>(bias_s, bias_l, "attention bias")?;
        // SAFETY: one warp writes each row of o and its lse.
        let o = unsafe { dev.alloc::<T>(b * t * h * d)? };
        let lse = unsafe { dev.alloc::<f32>(b * h * t)? };
        let func = dev.get_or_load_custom_func(&format!("attention_forward_{}", T::SUFFIX), "attention", ATTENTION_PTX)?;
        let [hi, gi, ti, si, di] = dims.ints();
        let (scale, causal) = (scale as f32, i32::from(causal));
        let mut builder = func.builder();
        builder.arg(&qv).arg(&kv).arg(&vv).arg(&biasv).arg(&o).arg(&lse);
        builder.arg(&hi).arg(&gi).arg(&ti).arg(&si).arg(&di).arg(&scale).arg(&causal);
        // SAFETY: matches `attention_forward_*`; the buffers hold the sizes of the layout above.
        unsafe { builder.launch(dims.rows_grid(t, h)) }.w()?;
        Ok(((CudaStorage::wrap_cuda_slice(o, dev.clone()), Shape::from((b, t, h * d))), wrap(lse, &dev, (b, h, t))))
    })
}

/// `(dq, dk, dv)` from the op's inputs, its output o [b, t, h·d], the output's gradient and lse.
#[allow(clippy::too_many_arguments)]
pub fn backward(bias: &Tensor, scale: f64, causal: bool, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, dout: &Tensor, lse: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let dims = Dims::new(q.dims(), k.dims())?;
    let bias = bias_in(bias, q.dtype(), &dims)?;
    let (q, k, v, o, dout, lse) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, o.contiguous()?, dout.contiguous()?, lse.contiguous()?);
    let guards = [&q, &k, &v, &o, &dout, &lse, &bias].map(|t| t.storage_and_layout());
    let storages = guards.iter().map(|(s, _)| cuda_storage(s, "attention backward")).collect::<Result<Vec<_>>>()?;
    let dev: CudaDevice = storages[0].device().clone();
    let lsev = view::<f32>(storages[5], guards[5].1, "lse")?;
    let Dims { b, h, g, t, s, d } = dims;
    with_kernel_type!(q.dtype(), T, {
        let input = |i: usize, what: &str| view::<T>(storages[i], guards[i].1, what);
        let (qv, kv, vv, ov, dov, biasv) = (input(0, "q")?, input(1, "k")?, input(2, "v")?, input(3, "o")?, input(4, "dout")?, input(6, "attention bias")?);
        // SAFETY: the dq pass writes every row of delta and dq, the dkdv pass every row of dk, dv.
        let delta = unsafe { dev.alloc::<f32>(b * h * t)? };
        let dq = unsafe { dev.alloc::<T>(b * h * t * d)? };
        let dk = unsafe { dev.alloc::<T>(b * g * s * d)? };
        let dv = unsafe { dev.alloc::<T>(b * g * s * d)? };
        let [hi, gi, ti, si, di] = dims.ints();
        let (scale, causal) = (scale as f32, i32::from(causal));
        let func = dev.get_or_load_custom_func(&format!("attention_dq_{}", T::SUFFIX), "attention", ATTENTION_PTX)?;
        let mut builder = func.builder();
        builder.arg(&qv).arg(&kv).arg(&vv).arg(&biasv).arg(&ov).arg(&dov).arg(&lsev).arg(&delta).arg(&dq);
        builder.arg(&hi).arg(&gi).arg(&ti).arg(&si).arg(&di).arg(&scale).arg(&causal);
        // SAFETY: matches `attention_dq_*`; the buffers hold the sizes of the layout in the .cu.
        unsafe { builder.launch(dims.rows_grid(t, h)) }.w()?;
        let func = dev.get_or_load_custom_func(&format!("attention_dkdv_{}", T::SUFFIX), "attention", ATTENTION_PTX)?;
        let mut builder = func.builder();
        builder.arg(&qv).arg(&kv).arg(&vv).arg(&biasv).arg(&dov).arg(&lsev).arg(&delta).arg(&dk).arg(&dv);
        builder.arg(&hi).arg(&gi).arg(&ti).arg(&si).arg(&di).arg(&scale).arg(&causal);
        // SAFETY: matches `attention_dkdv_*`; delta was written by the dq pass on the same stream.
        unsafe { builder.launch(dims.rows_grid(s, g)) }.w()?;
        Ok((wrap(dq, &dev, (b, h, t, d)), wrap(dk, &dev, (b, g, s, d)), wrap(dv, &dev, (b, g, s, d))))
    })
}

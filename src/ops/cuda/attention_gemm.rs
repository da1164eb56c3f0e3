//! Host side of `kernels/attention_gemm.cu`: the attention of training with its five products
//! in cuBLAS (tensor cores in bf16 / f16) and the softmax and its backward in the row kernels,
//! for `ops::fused::Attention` when `AttentionKernel::Gemm` is chosen. It saves what the
//! flash-style kernels save (q, k, v, o and lse [b, h, t] f32) and so keeps no [t, s] buffer
//! between forward and backward either; inside each pass the scores of a chunk of heads are a
//! transient of at most [`SCORE_BUDGET_BYTES`] (f32 scores plus T probabilities), reused chunk
//! after chunk.
//!
//! ```text
//! forward    per chunk: S = scale·q kᵀ, softmax → P, lse;  o_heads = P v      then merge_heads → o
//! backward   delta, do_heads;  per chunk: S, probs → P;  dv = Pᵀ do;  dP = do vᵀ;
//!            dscores → dS (over P);  dq = scale·dS k;  dk = scale·dSᵀ q
//! ```
//!
//! Grouped-query attention needs no expanded k or v: the h / g query heads of one key/value head
//! are consecutive rows of q, so each product is one strided batch over the b·g groups (and dk,
//! dv sum over the group inside their GEMM).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{bail, DType, Result, Shape, Tensor};
use half::{bf16, f16};

use super::{cuda_storage, gemm_batched, grid_stride, view, wrap, Arg, KernelType, Operand, ATTENTION_GEMM_PTX};
use crate::cuda::with_kernel_type;

/// The most the scores of one chunk of heads take (f32 S or dP plus the probabilities in T);
/// a chunk holds one group at least, so a group larger than this (t = s = 8,192 with one query
/// head a group: 384 MiB in bf16) takes what it needs.
pub const SCORE_BUDGET_BYTES: usize = 256 << 20;
/// The budget in force: [`SCORE_BUDGET_BYTES`] but in `with_score_budget`.
static SCORE_BUDGET: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(SCORE_BUDGET_BYTES);

/// `f` run with the chunks sized to `bytes` of scores (the selftest's 1 byte: one group a
/// chunk, so that every chunk offset is exercised on a small shape).
pub fn with_score_budget<R>(bytes: usize, f: impl FnOnce() -> R) -> R {
    use std::sync::atomic::Ordering::Relaxed;
    let before = SCORE_BUDGET.swap(bytes, Relaxed);
    let result = f();
    SCORE_BUDGET.store(before, Relaxed);
    result
}

const ROWS: usize = 8;

/// The sizes and the chunking of one attention: b batch rows, h query heads over g key/value
/// heads (n = h / g each), t queries, s keys, head dim d; `chunk` groups a pass.
#[derive(Clone, Copy, Debug)]
struct Plan {
    b: usize,
    h: usize,
    g: usize,
    n: usize,
    t: usize,
    s: usize,
    d: usize,
    chunk: usize,
}

impl Plan {
    fn new(q: &[usize], k: &[usize], element_bytes: usize) -> Result<Self> {
        let (&[b, h, t, d], &[bk, g, s, dk]) = (q, k) else { bail!("attention-gemm: q {q:?}, k {k:?} must be 4-D") };
        if bk != b || dk != d || g == 0 || !h.is_multiple_of(g) {
            bail!("attention-gemm: q {q:?} and k {k:?} do not fit");
        }
        let n = h / g;
        let group_bytes = (n * t * s * (4 + element_bytes)).max(1);
        let chunk = (SCORE_BUDGET.load(std::sync::atomic::Ordering::Relaxed) / group_bytes).clamp(1, (b * g).max(1));
        Ok(Self { b, h, g, n, t, s, d, chunk })
    }

    fn group_rows(&self) -> usize {
        self.n * self.t
    }

    /// (first group, groups) of each pass.
    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let groups = self.b * self.g;
        (0..groups).step_by(self.chunk).map(move |g0| (g0, self.chunk.min(groups - g0)))
    }

    fn score_elements(&self) -> usize {
        self.chunk * self.group_rows() * self.s
    }

    /// q, o_heads, do_heads or dq [b, h, t, d] as groups of n·t rows, from group g0.
    fn query_side(&self, g0: usize) -> Operand {
        let rows = self.group_rows() * self.d;
        Operand { offset: g0 * rows, ld: self.d, batch_stride: rows, transposed: false }
    }

    /// k, v, dk or dv [b, g, s, d], one head a group, from group g0 (`transposed`: read as kᵀ).
    fn key_side(&self, g0: usize, transposed: bool) -> Operand {
        Operand { offset: g0 * self.s * self.d, ld: self.d, batch_stride: self.s * self.d, transposed }
    }

    /// The chunk's scores or probabilities [groups, n·t, s] (`transposed`: read as Pᵀ).
    fn scores(&self, transposed: bool) -> Operand {
        Operand { offset: 0, ld: self.s, batch_stride: self.group_rows() * self.s, transposed }
    }

    fn ints(&self) -> Result<[i32; 7]> {
        let int = |v: usize| i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("attention-gemm: {v} exceeds the kernels' int")));
        Ok([int(self.b)?, int(self.h)?, int(self.g)?, int(self.group_rows())?, int(self.t)?, int(self.s)?, int(self.d)?])
    }

    fn row_grid(rows: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows.div_ceil(ROWS).max(1) as u32, 1, 1), block_dim: (32 * ROWS as u32, 1, 1), shared_mem_bytes: 0 }
    }
}

/// The row kernel `attention_gemm_{name}_*` in T (a macro: candle does not name its function
/// type).
macro_rules! row_kernel {
    ($dev:expr, $t:ty, $name:expr) => {
        $dev.get_or_load_custom_func(&format!("attention_gemm_{}_{}", $name, <$t as KernelType>::SUFFIX), "attention_gemm", ATTENTION_GEMM_PTX)?
    };
}

/// The bias as the kernels read it, [b, t, s] in T, contiguous.
fn bias_in(bias: &Tensor, dtype: DType, p: &Plan) -> Result<Tensor> {
    if bias.dims() != [p.b, 1, p.t, p.s] {
        bail!("attention-gemm: bias {:?} does not fit [{}, 1, {}, {}]", bias.dims(), p.b, p.t, p.s);
    }
    bias.to_dtype(dtype)?.contiguous()
}

/// The log-sum-exp rows: the forward's softmax writes them, the backward's probs reads them.
enum Lse<'a> {
    Write(&'a mut CudaSlice<f32>),
    Read(&'a CudaView<'a, f32>),
}

/// `attention_gemm_softmax_*` (lse written) or `attention_gemm_probs_*` (lse read): the
/// probabilities of the chunk's `groups` groups from `g0`, from its scores.
fn launch_probs<T: KernelType>(
    dev: &CudaDevice,
    p: &Plan,
    (g0, groups): (usize, usize),
    scores: &CudaSlice<f32>,
    bias: &CudaView<'_, T>,
    probs: &mut CudaSlice<T>,
    lse: Lse<'_>,
) -> Result<()> {
    let [_, _, g, group_rows, t, s, _] = p.ints()?;
    let rows = (groups * p.group_rows()) as i64;
    let row0 = (g0 * p.group_rows()) as i64;
    let kernel = if matches!(lse, Lse::Write(_)) { "softmax" } else { "probs" };
    let func = row_kernel!(dev, T, kernel);
    let mut builder = func.builder();
    builder.arg(scores).arg(bias);
    match lse {
        Lse::Write(lse) => builder.arg(probs).arg(lse),
        Lse::Read(lse) => builder.arg(lse).arg(probs),
    };
    builder.arg(&rows).arg(&row0).arg(&group_rows).arg(&g).arg(&t).arg(&s);
    // SAFETY: matches `attention_gemm_softmax_*` / `attention_gemm_probs_*`; scores and probs
    // hold the chunk's rows·s elements, lse all b·h·t rows, the bias b·t·s.
    unsafe { builder.launch(Plan::row_grid(rows as usize)) }.w()?;
    Ok(())
}

/// `o [b, t, h·d]` and `lse [b, h, t]` (f32).
pub fn forward(bias: &Tensor, scale: f64, (q, lq): Arg, (k, lk): Arg, (v, lv): Arg) -> Result<((CudaStorage, Shape), Tensor)> {
    let dev = q.device().clone();
    if lv.dims() != lk.dims() || k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        bail!("attention-gemm: v {:?} against k {:?} (one dtype for q, k, v)", lv.dims(), lk.dims());
    }
    with_kernel_type!(q.dtype(), T, {
        let p = Plan::new(lq.dims(), lk.dims(), std::mem::size_of::<T>())?;
        let bias = bias_in(bias, q.dtype(), &p)?;
        let (bias_s, bias_l) = bias.storage_and_layout();
        let biasv = view::<T>(cuda_storage(&bias_s, "attention bias")?, bias_l, "attention bias")?;
        let (qv, kv, vv) = (view::<T>(q, lq, "q")?, view::<T>(k, lk, "k")?, view::<T>(v, lv, "v")?);
        let (b, h, t, d) = (p.b, p.h, p.t, p.d);
        // SAFETY: each chunk's GEMM writes its scores before softmax reads them, softmax writes
        // every probability of the chunk and every lse row of it, the P·v GEMM every row of
        // o_heads; merge_heads writes all of o.
        let mut scores = unsafe { dev.alloc::<f32>(p.score_elements())? };
        let mut probs = unsafe { dev.alloc::<T>(p.score_elements())? };
        let mut lse = unsafe { dev.alloc::<f32>(b * h * t)? };
        let mut o_heads = unsafe { dev.alloc::<T>(b * h * t * d)? };
        for (g0, groups) in p.chunks() {
            gemm_batched::<T, f32>(&dev, (p.group_rows(), p.s, d), groups, scale as f32, (&qv, p.query_side(g0)), (&kv, p.key_side(g0, true)), 0.0, (&mut scores, p.scores(false)))?;
            launch_probs::<T>(&dev, &p, (g0, groups), &scores, &biasv, &mut probs, Lse::Write(&mut lse))?;
            gemm_batched::<T, T>(&dev, (p.group_rows(), d, p.s), groups, 1.0, (&probs, p.scores(false)), (&vv, p.key_side(g0, false)), 0.0, (&mut o_heads, p.query_side(g0)))?;
        }
        drop((scores, probs));
        // SAFETY: merge_heads writes every element.
        let o = unsafe { dev.alloc::<T>(b * t * h * d)? };
        let [bi, hi, _, _, ti, _, di] = p.ints()?;
        let func = row_kernel!(dev, T, "merge_heads");
        let mut builder = func.builder();
        builder.arg(&o_heads).arg(&o).arg(&bi).arg(&hi).arg(&ti).arg(&di);
        // SAFETY: matches `attention_gemm_merge_heads_*`; both buffers hold b·h·t·d elements.
        unsafe { builder.launch(grid_stride(b * h * t * d)) }.w()?;
        Ok(((CudaStorage::wrap_cuda_slice(o, dev.clone()), Shape::from((b, t, h * d))), wrap(lse, &dev, (b, h, t))))
    })
}

/// `(dq, dk, dv)` from the op's inputs, its output o [b, t, h·d], the output's gradient and lse.
#[allow(clippy::too_many_arguments)]
pub fn backward(bias: &Tensor, scale: f64, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, dout: &Tensor, lse: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let p = Plan::new(q.dims(), k.dims(), q.dtype().size_in_bytes())?;
    let bias = bias_in(bias, q.dtype(), &p)?;
    let (q, k, v, o, dout, lse) = (q.contiguous()?, k.contiguous()?, v.contiguous()?, o.contiguous()?, dout.contiguous()?, lse.contiguous()?);
    let guards = [&q, &k, &v, &o, &dout, &lse, &bias].map(|t| t.storage_and_layout());
    let storages = guards.iter().map(|(s, _)| cuda_storage(s, "attention backward")).collect::<Result<Vec<_>>>()?;
    let dev: CudaDevice = storages[0].device().clone();
    let (b, h, g, t, s, d) = (p.b, p.h, p.g, p.t, p.s, p.d);
    with_kernel_type!(q.dtype(), T, {
        let input = |i: usize, what: &str| view::<T>(storages[i], guards[i].1, what);
        let (qv, kv, vv, ov, dov, biasv) = (input(0, "q")?, input(1, "k")?, input(2, "v")?, input(3, "o")?, input(4, "dout")?, input(6, "attention bias")?);
        if ov.len() != b * t * h * d || dov.len() != ov.len() || qv.len() != b * h * t * d || lse.elem_count() != b * h * t {
            bail!("attention-gemm backward: o {:?}, dout {:?}, lse {:?} do not fit q {:?}", o.dims(), dout.dims(), lse.dims(), q.dims());
        }
        let lsev = view::<f32>(storages[5], guards[5].1, "lse")?;
        // SAFETY: the delta kernel writes every row of delta and every element of do_heads; per
        // chunk the GEMMs and kernels write what the next step reads (see the module doc); each
        // of dq, dk, dv is written by exactly one GEMM per group.
        let delta = unsafe { dev.alloc::<f32>(b * h * t)? };
        let dout_heads = unsafe { dev.alloc::<T>(b * h * t * d)? };
        let [bi, hi, _, _, ti, si, di] = p.ints()?;
        let func = row_kernel!(dev, T, "delta");
        let mut builder = func.builder();
        builder.arg(&ov).arg(&dov).arg(&delta).arg(&dout_heads).arg(&bi).arg(&hi).arg(&ti).arg(&di);
        // SAFETY: matches `attention_gemm_delta_*`; o, dout and do_heads hold b·t·h·d elements.
        unsafe { builder.launch(Plan::row_grid(b * h * t)) }.w()?;
        let mut scores = unsafe { dev.alloc::<f32>(p.score_elements())? };
        let mut probs = unsafe { dev.alloc::<T>(p.score_elements())? };
        let mut dq = unsafe { dev.alloc::<T>(b * h * t * d)? };
        let mut dk = unsafe { dev.alloc::<T>(b * g * s * d)? };
        let mut dv = unsafe { dev.alloc::<T>(b * g * s * d)? };
        let dscores = row_kernel!(dev, T, "dscores");
        let rows = p.group_rows();
        for (g0, groups) in p.chunks() {
            gemm_batched::<T, f32>(&dev, (rows, s, d), groups, scale as f32, (&qv, p.query_side(g0)), (&kv, p.key_side(g0, true)), 0.0, (&mut scores, p.scores(false)))?;
            launch_probs::<T>(&dev, &p, (g0, groups), &scores, &biasv, &mut probs, Lse::Read(&lsev))?;
            gemm_batched::<T, T>(&dev, (s, d, rows), groups, 1.0, (&probs, p.scores(true)), (&dout_heads, p.query_side(g0)), 0.0, (&mut dv, p.key_side(g0, false)))?;
            gemm_batched::<T, f32>(&dev, (rows, s, d), groups, 1.0, (&dout_heads, p.query_side(g0)), (&vv, p.key_side(g0, true)), 0.0, (&mut scores, p.scores(false)))?;
            let (n_rows, row0) = ((groups * rows) as i64, (g0 * rows) as i64);
            let mut builder = dscores.builder();
            builder.arg(&scores).arg(&delta).arg(&probs).arg(&n_rows).arg(&row0).arg(&si);
            // SAFETY: matches `attention_gemm_dscores_*`; scores and probs hold the chunk's rows·s
            // elements, delta all b·h·t rows.
            unsafe { builder.launch(Plan::row_grid(n_rows as usize)) }.w()?;
            gemm_batched::<T, T>(&dev, (rows, d, s), groups, scale as f32, (&probs, p.scores(false)), (&kv, p.key_side(g0, false)), 0.0, (&mut dq, p.query_side(g0)))?;
            gemm_batched::<T, T>(&dev, (s, d, rows), groups, scale as f32, (&probs, p.scores(true)), (&qv, p.query_side(g0)), 0.0, (&mut dk, p.key_side(g0, false)))?;
        }
        Ok((wrap(dq, &dev, (b, h, t, d)), wrap(dk, &dev, (b, g, s, d)), wrap(dv, &dev, (b, g, s, d))))
    })
}

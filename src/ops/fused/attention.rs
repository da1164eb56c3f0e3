//! The training attention core: on the CPU in f32 a block of query rows at a time
//! (`attention_blocks`), composed candle ops for other dtypes (and as the reference), and the
//! CUDA kernels.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};

use super::attention_blocks;
use crate::ops::{cpu_tensor, tensor_cpu_storage};
use candle_core::{DType, Device, Var};
use rand::Rng;
use crate::error::Error;
use crate::kernel_bench::{randn, BenchShapes, KernelTiming};
use crate::selftest::{forward_backward, Case};

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

    /// The dims of q [b, h, t, d] and k [b, g, s, d] for `attention_blocks`, when it takes them.
    fn block_dims(&self, q: &[usize], k: &[usize]) -> Option<attention_blocks::Dims> {
        let (&[b, h, t, d], &[_, g, s, _]) = (q, k) else { return None };
        let dims = attention_blocks::Dims { b, h, g, t, s, d };
        (self.bias.dtype() == DType::F32 && dims.fit(self.causal)).then_some(dims)
    }

    /// The forward by `attention_blocks` for f32 inputs (None: the composed ops run instead).
    fn cpu_fwd_blocks(&self, q: (&CpuStorage, &Layout), k: (&CpuStorage, &Layout), v: (&CpuStorage, &Layout)) -> candle_core::Result<Option<(CpuStorage, Shape)>> {
        fn values<'a>((s, l): (&'a CpuStorage, &Layout)) -> Option<&'a [f32]> {
            match (s, l.contiguous_offsets()) {
                (CpuStorage::F32(values), Some((start, end))) => Some(&values[start..end]),
                _ => None,
            }
        }
        let (Some(dims), Some(qs), Some(ks), Some(vs)) = (self.block_dims(q.1.dims(), k.1.dims()), values(q), values(k), values(v)) else {
            return Ok(None);
        };
        let (o, lse) = crate::threads::with_values(&self.bias, |bias: &[f32]| {
            attention_blocks::forward(qs, ks, vs, bias, dims, self.scale as f32, self.causal)
        })?;
        let attention_blocks::Dims { b, h, t, d, .. } = dims;
        self.save_lse(Tensor::from_vec(lse, (b, h, t, 1), &Device::Cpu)?)?;
        Ok(Some((CpuStorage::F32(o), Shape::from((b, t, h * d)))))
    }

    /// The backward by `attention_blocks`, when the forward ran there.
    fn cpu_bwd_blocks(&self, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, dout: &Tensor) -> candle_core::Result<Option<(Tensor, Tensor, Tensor)>> {
        let Some(lse) = self.lse.get() else { candle_core::bail!("{}: backward before forward", self.name()) };
        let Some(dims) = self.block_dims(q.dims(), k.dims()) else { return Ok(None) };
        if !q.device().is_cpu() || [q, k, v, o, dout, lse].iter().any(|t| t.dtype() != DType::F32) {
            return Ok(None);
        }
        let values = |t: &Tensor| -> candle_core::Result<Vec<f32>> { t.flatten_all()?.to_vec1() };
        let (q, k, v, o, dout, lse, bias) = (values(q)?, values(k)?, values(v)?, values(o)?, values(dout)?, values(lse)?, values(&self.bias)?);
        let saved = attention_blocks::Saved { o: &o, lse: &lse, dout: &dout };
        let (dq, dk, dv) = attention_blocks::backward(&q, &k, &v, &bias, saved, dims, self.scale as f32, self.causal);
        let attention_blocks::Dims { b, h, g, t, s, d } = dims;
        let cpu = &Device::Cpu;
        Ok(Some((Tensor::from_vec(dq, (b, h, t, d), cpu)?, Tensor::from_vec(dk, (b, g, s, d), cpu)?, Tensor::from_vec(dv, (b, g, s, d), cpu)?)))
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
        if let Some(out) = self.cpu_fwd_blocks((s1, l1), (s2, l2), (s3, l3))? {
            return Ok(out);
        }
        let q = cpu_tensor(s1, l1, self.name())?;
        let k = repeat_heads(&cpu_tensor(s2, l2, self.name())?, h / g)?;
        let v = repeat_heads(&cpu_tensor(s3, l3, self.name())?, h / g)?;
        let scores = self.scores(&q, &k)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = crate::ops::exp::exp_tensor(&scores.broadcast_sub(&max)?)?;
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
        if let Some((dq, dk, dv)) = self.cpu_bwd_blocks(&q, &k, &v, &o, dout)? {
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let (b, h, t, d) = q.dims4()?;
        let (_, g, s, _) = k.dims4()?;
        let n = h / g;
        let heads = |x: &Tensor| x.reshape((b, t, h, d))?.transpose(1, 2)?.contiguous();
        let (o, dout) = (heads(&o)?, heads(dout)?);
        let (kx, vx) = (repeat_heads(&k, n)?, repeat_heads(&v, n)?);
        let p = crate::ops::exp::exp_tensor(&self.scores(&q, &kx)?.broadcast_sub(lse)?)?;
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

// The op on a device against its CPU reference (`candle-peft selftest`) and against the
// unfused graph it replaces (`candle-peft bench kernels`).

/// The attention of training on both of its kernels.
pub fn selftest(c: &mut Case) -> crate::Result<()> {
    flash_cases(c)?;
    gemm_cases(c)
}

/// The flash-style attention of training (`kernels/attention.cu`) against the CPU op in f64, on
/// the model's shape (grouped-query, scale 1/√d, d not a multiple of 32) and on the nonlinear
/// controller's (one head, d = r + 1 = 65, scale 1); causal, one row left-padded. The causal
/// walk, which skips the masked chunks, must give the full walk's values exactly.
fn flash_cases(c: &mut Case) -> crate::Result<()> {
    use crate::ops::nn::{attention_bias, attention_scaled};
    let (b, t, d_model) = (2, c.odd(33, 150), c.odd(33, 127));
    let pad = c.rng.random_range(1..t / 2);
    let mask = vec![(0..t).map(|i| u32::from(i >= pad)).collect::<Vec<_>>(), vec![1; t]];
    let model = ("attention gqa", 4, 2, d_model, 1.0 / (d_model as f64).sqrt(), 1.0);
    let controller = ("attention control", 1, 1, 65, 1.0, 0.15);
    for (kernel, h, g, d, scale, std) in [model, controller] {
        let shape = format!("b{b} h{h} g{g} t{t} d{d} pad{pad}");
        let (q, k, v) = (c.draw(&[b, h, t, d], std)?, c.draw(&[b, g, t, d], std)?, c.draw(&[b, g, t, d], 1.0)?);
        let weights = c.draw(&[b, t, h * d], 1.0)?;
        let run = |device: &Device, dtype: DType| -> crate::Result<(Tensor, Vec<Tensor>)> {
            let bias = attention_bias(&mask, t, dtype, device)?;
            forward_backward(device, dtype, &[&q, &k, &v], &weights, &|x| attention_scaled(&x[0], &x[1], &x[2], &bias, scale, true))
        };
        let (o, g) = run(c.device, c.dtype)?;
        let (o_ref, g_ref) = run(&Device::Cpu, DType::F64)?;
        c.record_pass(kernel, &shape, &["o", "dq", "dk", "dv"], (&o, &g), (&o_ref, &g_ref))?;
        let bias = attention_bias(&mask, t, c.dtype, c.device)?;
        let full_walk = |x: &[Tensor]| -> crate::Result<Tensor> {
            Ok(x[0].contiguous()?.apply_op3(&x[1].contiguous()?, &x[2].contiguous()?, Attention::new(bias.clone(), scale))?)
        };
        let (o_full, g_full) = forward_backward(c.device, c.dtype, &[&q, &k, &v], &weights, &full_walk)?;
        let kernel = format!("{kernel} causal skip");
        c.record_equal(&kernel, &shape, "o", &o, &o_full)?;
        for (name, (got, full)) in ["dq", "dk", "dv"].iter().zip(g.iter().zip(&g_full)) {
            c.record_equal(&kernel, &shape, name, got, full)?;
        }
    }
    Ok(())
}

/// The tensor-core attention of training (`kernels/attention_gemm.cu`, cuBLAS) against the CPU
/// op in f64: grouped-query with d odd, one query head per key head with d over the flash
/// kernels' 128 (which only this path runs); causal, one row left-padded. Each shape runs twice,
/// with the scores of all heads in one chunk and with one key/value group a chunk.
fn gemm_cases(c: &mut Case) -> crate::Result<()> {
    use crate::ops::AttentionKernel;
    use crate::ops::nn::attention_bias;
    let (b, t) = (2, c.odd(17, 90));
    let pad = c.rng.random_range(1..t / 2);
    let mask = vec![(0..t).map(|i| u32::from(i >= pad)).collect::<Vec<_>>(), vec![1; t]];
    for (kernel, h, g, d) in [("attention_gemm gqa", 6, 2, c.odd(9, 127)), ("attention_gemm d>128", 2, 2, c.odd(129, 200))] {
        let shape = format!("b{b} h{h} g{g} t{t} d{d} pad{pad}");
        let (q, k, v) = (c.draw(&[b, h, t, d], 1.0)?, c.draw(&[b, g, t, d], 1.0)?, c.draw(&[b, g, t, d], 1.0)?);
        let weights = c.draw(&[b, t, h * d], 1.0)?;
        let scale = 1.0 / (d as f64).sqrt();
        let run = |device: &Device, dtype: DType| -> crate::Result<(Tensor, Vec<Tensor>)> {
            let bias = attention_bias(&mask, t, dtype, device)?;
            let op = |x: &[Tensor]| -> crate::Result<Tensor> {
                let op = Attention::causal(bias.clone(), scale).on(AttentionKernel::Gemm);
                Ok(x[0].contiguous()?.apply_op3(&x[1].contiguous()?, &x[2].contiguous()?, op)?)
            };
            forward_backward(device, dtype, &[&q, &k, &v], &weights, &op)
        };
        let (o_ref, g_ref) = run(&Device::Cpu, DType::F64)?;
        let (o, g) = run(c.device, c.dtype)?;
        c.record_pass(kernel, &shape, &["o", "dq", "dk", "dv"], (&o, &g), (&o_ref, &g_ref))?;
        #[cfg(feature = "cuda")]
        let (o, g) = crate::ops::cuda::attention_gemm::with_score_budget(1, || run(c.device, c.dtype))?;
        c.record_pass(&format!("{kernel} chunked"), &shape, &["o", "dq", "dk", "dv"], (&o, &g), (&o_ref, &g_ref))?;
    }
    Ok(())
}

/// The causal self-attention of training, forward + backward: `--tokens` (the first) split into
/// sequences of each of `--seqs`, `--attention-heads` heads of `--head-dim` over `--kv-heads`
/// key/value heads. TFLOP/s counts the
/// whole [t, t] score matrix (forward 4·b·h·t²·d, backward 10·b·h·t²·d), although the fused op
/// skips the causally masked half.
pub fn bench(shapes: &BenchShapes, device: &Device, dtype: DType, out: &mut Vec<KernelTiming>) -> crate::Result<()> {
    let tokens = shapes.tokens.first().copied().unwrap_or(4096);
    let (h, d) = (shapes.attention_heads, shapes.head_dim);
    let g = shapes.kv_heads.unwrap_or(h);
    if g == 0 || h % g != 0 {
        return Err(Error::msg(format!("--kv-heads {g} must divide --attention-heads {h}")));
    }
    for &t in &shapes.seqs {
        if t == 0 || tokens % t != 0 {
            return Err(Error::msg(format!("--seqs: {t} does not divide --tokens {tokens}")));
        }
        let b = tokens / t;
        let shape = if g == h { format!("b{b} h{h} t{t} d{d}") } else { format!("b{b} h{h} g{g} t{t} d{d}") };
        let qkv: Vec<Var> = [h, g, g].iter().map(|&heads| Ok(Var::from_tensor(&randn(&[b, heads, t, d], 1.0, dtype, device)?)?)).collect::<crate::Result<_>>()?;
        let bias = crate::ops::nn::attention_bias(&vec![vec![1u32; t]; b], t, dtype, device)?;
        let scale = 1.0 / (d as f64).sqrt();
        // None: the candle graph; Some: the fused op on those kernels.
        let step = |kernels: Option<crate::ops::AttentionKernel>| -> crate::Result<()> {
            let (q, k, v) = (qkv[0].as_tensor(), qkv[1].as_tensor(), qkv[2].as_tensor());
            let o = match kernels {
                Some(kernels) => q.apply_op3(k, v, Attention::causal(bias.clone(), scale).on(kernels))?,
                None => crate::ops::nn::attention_reference(q, k, v, &bias)?,
            };
            o.backward()?;
            Ok(())
        };
        // On the CPU the op has one implementation, whichever kernels it is given.
        let variants = match device.is_cuda() {
            true => vec![("unfused", None), ("fused (flash)", Some(crate::ops::AttentionKernel::Flash)), ("fused (gemm)", Some(crate::ops::AttentionKernel::Gemm))],
            false => vec![("unfused", None), ("fused", Some(crate::ops::AttentionKernel::Flash))],
        };
        let mut timed = Vec::new();
        for (variant, kernels) in variants {
            let ms = shapes.time(device, || step(kernels))?;
            timed.push((variant, ms, crate::memory::peak_extra_mib(device, || step(kernels))?));
        }
        let unfused = timed[0].1;
        let flops = 14.0 * (b * h * t * t * d) as f64;
        for (variant, ms, mib) in timed {
            out.push(KernelTiming::new("attention", &shape, variant, ms, unfused).flops(flops).peak_mib(mib));
        }
    }
    Ok(())
}

#[cfg(test)]
mod selftest_tests {
    use super::*;

    /// The checks run and pass with the CPU on both sides, so a failure on a GPU is the kernel's.
    #[test]
    fn the_selftest_checks_pass_on_the_cpu_reference() {
        // Each shape against the f64 reference and the causal walk against the full one; the
        // gemm kernel's two shapes in one chunk and chunked (on the CPU both are the reference).
        crate::selftest::passes_on_the_cpu(flash_cases, 2 * 4 * 2);
        crate::selftest::passes_on_the_cpu(gemm_cases, 2 * 2 * 4);
    }
}

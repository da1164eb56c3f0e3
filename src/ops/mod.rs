//! The ops layer: every custom op with its CPU reference, its backward and its CUDA launcher.
//! Each op lives in its own file beside its CUDA source in `kernels/`, with a plain CPU reference
//! of the same math that the tests check against the unfused candle computation (values and
//! gradients). At the end of each file are the op's `selftest` cases (the CUDA kernel against
//! that reference on the GPU, on the harness of `crate::selftest`; a unit test runs them with the
//! CPU on both sides) and, for the adapters' ops, its `bench` rows (fused against the unfused
//! graph, `crate::kernel_bench`); `cli::selftest` and `cli::bench_kernels` only list them.
//!
//! The model's layer ops: [`nn`] (RMSNorm, softmax, SwiGLU, attention, RoPE, cross-entropy, the
//! frozen matmuls: fused where it pays, the composed reference beside each) over the CPU custom ops
//! of [`fused`]; [`dropout`] (masks drawn from a seed, on the CPU and in `kernels/dropout.cu`);
//! [`adamw`] (the in-place update). Inference on the CPU: [`attention_cpu`] (a few query rows
//! against the KV cache), [`exp`] (vectorized exp, softmax, SiLU), [`matmul_bf16`] (few-row
//! products reading bf16 weights as stored). The adapters' fused ops:
//!
//! | op | CUDA | what it fuses |
//! |---|---|---|
//! | [`lowrank_add`] | `kernels/lowrank_add.cu`, cuBLAS | `out += s · (z Mᵀ) ⊙ mask` in place, no [T, d] product |
//! | [`lora_linear`] | cuBLAS + `lowrank_add` | the LoRA linear `x Wᵀ + s · (drop(x) Aᵀ) Bᵀ`, forward and backward; with the output split into attention heads ([`lora_linear_heads`], `kernels/rope.cu`) or SwiGLU in front ([`swiglu_lora_linear`]) |
//! | [`control_branch`] | `kernels/lowrank_add.cu` | the control branch with the residual add `base + α · z Bᵀ` |
//! | [`lora_rows`] | (CPU only) | LoRA's term at inference, row by row, each row with its own adapter (a mixed batch, `model::mixed`) |
//! | [`dora_linear`] | cuBLAS (candle ops) | the DoRA linear, forward and backward, keeping one [T, out] tensor instead of about six; [`dora_linear_heads`] with the output split into heads |
//! | [`row_norms`] | `kernels/row_norms.cu` | DoRA's `‖W + s·B A‖` per row without forming `W + s·B A` |
//! | [`snell`] | `kernels/snell.cu`, cuBLAS | SNELL's `x ΔW_s` with ΔW recomputed from its factors, never kept; its threshold by radix selection |
//! | [`snell_merge`] | (reference) | SNELL's kernelized merge and sparsification in plain candle ops |
//! | [`snell_sparse`] | `kernels/snell_sparse.cu` | SNELL's branch at high sparsity: ΔW_s applied as a sparse matrix, `xᵀ dy` sampled at the survivors |
//!
//! Training takes the fused ops whenever the tensors live on a CUDA device, unless
//! [`set_unfused`] (the CLI's `--unfused`) or `CANDLE_PEFT_UNFUSED=1` asks for the plain candle
//! ops, which stay the reference and the fallback. On the CPU (f32, f64) the same ops run candle's
//! CPU matmuls inside, so CPU training keeps only what backward needs too; in f64 they are the
//! reference `selftest` compares the GPU with.

/// The forward of a three-input custom op whose output is a [`Precomputed`] field: the body of
/// `cpu_fwd` and `cuda_fwd` in its `CustomOp3` impl.
macro_rules! precomputed_forward3 {
    ($field:ident) => {
        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
            _: &candle_core::CpuStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            self.$field.cpu(self.name())
        }

        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
            _: &candle_core::CudaStorage,
            _: &candle_core::Layout,
        ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
            self.$field.cuda(self.name())
        }
    };
}

pub mod adamw;
pub mod attention_cpu;
pub mod dropout;
pub mod exp;
pub mod fused;
pub mod gemm_bf16;
pub mod nn;
pub mod control_branch;
pub mod dora_linear;
pub mod lora_linear;
pub mod lora_rows;
pub mod lowrank_add;
pub mod matmul_bf16;

pub mod row_norms;
pub mod snell;
pub mod snell_merge;
pub mod snell_sparse;

#[cfg(feature = "cuda")]
pub mod cuda;

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Tensor};

use crate::ops::fused::OutputFreeBackward;

pub use control_branch::control_branch;
pub use dora_linear::{dora_linear, dora_linear_heads};
pub use lora_linear::{lora_linear, lora_linear_heads, swiglu_lora_linear, swiglu_lora_linear_backward_only};
pub use lowrank_add::lowrank_add;
pub use row_norms::row_norms;
pub use snell::snell_branch;

static UNFUSED: AtomicBool = AtomicBool::new(false);

/// Use the plain candle ops even on CUDA (the reference path, for comparison and debugging).
pub fn set_unfused(unfused: bool) {
    UNFUSED.store(unfused, Ordering::Relaxed);
}

/// `--unfused`, or `CANDLE_PEFT_UNFUSED` set to anything but 0 (read once: this is asked on
/// every linear layer's forward).
pub fn unfused() -> bool {
    static FROM_ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    UNFUSED.load(Ordering::Relaxed) || *FROM_ENV.get_or_init(|| std::env::var_os("CANDLE_PEFT_UNFUSED").is_some_and(|v| v != "0"))
}

/// Which CUDA kernels the fused attention of training runs (`--attention-kernel`,
/// `CANDLE_PEFT_ATTENTION=flash|gemm`): both keep only q, k, v, o and the log-sum-exp rows for
/// backward; they differ in where the scores live while a pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AttentionKernel {
    /// `kernels/attention.cu`: tiles of scores in shared memory, never in global memory, SIMT
    /// f32 arithmetic; head dim at most 128 (larger heads take `gemm`).
    #[default]
    Flash,
    /// `kernels/attention_gemm.cu`: the five products in cuBLAS (tensor cores in bf16 / f16),
    /// the scores of a chunk of heads a transient of at most 256 MiB between them (one
    /// key/value group's, where that alone is larger); any head dim.
    Gemm,
}

impl AttentionKernel {
    /// The name `--attention-kernel` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Flash => "flash",
            Self::Gemm => "gemm",
        }
    }
}

impl std::str::FromStr for AttentionKernel {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(s, true)
    }
}

/// None: the environment decides.
static ATTENTION_KERNEL: std::sync::Mutex<Option<AttentionKernel>> = std::sync::Mutex::new(None);

/// The attention kernels of training from here on (the CLI's `--attention-kernel`).
pub fn set_attention_kernel(kernel: AttentionKernel) {
    *ATTENTION_KERNEL.lock().unwrap_or_else(|e| e.into_inner()) = Some(kernel);
}

/// [`set_attention_kernel`]'s choice, else `CANDLE_PEFT_ATTENTION` (read once; a value that names
/// no kernel is reported once and ignored), else flash.
pub fn attention_kernel() -> AttentionKernel {
    static FROM_ENV: std::sync::OnceLock<AttentionKernel> = std::sync::OnceLock::new();
    let chosen = *ATTENTION_KERNEL.lock().unwrap_or_else(|e| e.into_inner());
    chosen.unwrap_or_else(|| {
        *FROM_ENV.get_or_init(|| match std::env::var("CANDLE_PEFT_ATTENTION") {
            Ok(name) => name.parse().unwrap_or_else(|e| {
                tracing::warn!("CANDLE_PEFT_ATTENTION={name}: {e}; using flash");
                AttentionKernel::Flash
            }),
            Err(_) => AttentionKernel::Flash,
        })
    })
}

/// Whether the fused ops handle tensors like `t`: on CUDA in f32 / f16 / bf16, on the CPU in
/// f32 / f64 (there they are candle's CPU matmuls around explicit saved tensors), unless the
/// unfused path was asked for.
pub fn fused_for(t: &Tensor) -> bool {
    let supported = match t.device() {
        candle_core::Device::Cuda(_) => matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16),
        candle_core::Device::Cpu => matches!(t.dtype(), DType::F32 | DType::F64),
        _ => false,
    };
    supported && !unfused()
}

/// Whether an adapter's forward takes its fused op: always on CUDA, in training on the CPU (where
/// inference is as fast through the plain ops, without the op's copies).
pub fn fused_forward(x: &Tensor, train: bool) -> bool {
    fused_for(x) && (train || x.device().is_cuda())
}

/// An op's output computed before candle applies the op (from detached inputs, so that no graph
/// holds the computation's intermediates), handed over once by the op's forward: a copy, since
/// candle's storages are owned, after which the op lets it go.
pub(crate) struct Precomputed(std::sync::Mutex<Option<Tensor>>);

impl Precomputed {
    pub(crate) fn new(output: Option<Tensor>) -> Self {
        Self(std::sync::Mutex::new(output))
    }

    pub(crate) fn set(&self, output: Tensor) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(output);
    }

    fn take(&self, op: &str) -> candle_core::Result<Tensor> {
        let output = self.0.lock().map_err(|_| candle_core::Error::Msg(format!("{op}: poisoned")))?.take();
        output.ok_or_else(|| candle_core::Error::Msg(format!("{op}: applied twice, or before its output was computed")))
    }

    /// The output as a CPU op's forward returns it.
    pub(crate) fn cpu(&self, op: &str) -> candle_core::Result<(CpuStorage, candle_core::Shape)> {
        let y = self.take(op)?;
        Ok((tensor_cpu_storage(&y)?, y.shape().clone()))
    }

    /// The output as a CUDA op's forward returns it.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self, op: &str) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        cuda::owned_storage(&self.take(op)?, op)
    }
}

/// A node with `Op`'s backward whose forward computes nothing: its output is zeros. For a graph
/// that is only backpropagated through, never read (gradient checkpointing's recompute of a
/// decoder layer, [`crate::model::Llama::layer_backward_graph`]), around an op whose backward
/// reads its inputs and what was saved beforehand, never its output ([`OutputFreeBackward`]):
/// the MLP's down projection, whose forward GEMM (and, on an NF4 base, dequantization) is then
/// not run, since the layer's output only adds into the residual and no backward reads it.
pub(crate) struct BackwardOnly<Op> {
    op: Op,
    zeros: Precomputed,
}

impl<Op: CustomOp3 + OutputFreeBackward> BackwardOnly<Op> {
    /// `op`'s node with an output of `shape`, in `like`'s dtype and device.
    pub(crate) fn new(op: Op, shape: &[usize], like: &Tensor) -> candle_core::Result<Self> {
        Ok(Self { op, zeros: Precomputed::new(Some(Tensor::zeros(shape, like.dtype(), like.device())?)) })
    }
}

impl<Op: CustomOp3 + OutputFreeBackward> CustomOp3 for BackwardOnly<Op> {
    fn name(&self) -> &'static str {
        self.op.name()
    }

    precomputed_forward3!(zeros);

    fn bwd(&self, a: &Tensor, b: &Tensor, c: &Tensor, y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        self.op.bwd(a, b, c, y, dy)
    }
}

/// A [r, in] and B [out, r] as one flat tensor, for the ops that take them as one argument (a
/// custom op takes three inputs): candle's cat routes the gradient back to each.
pub(crate) fn join_factors(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    Tensor::cat(&[a.flatten_all()?, b.flatten_all()?], 0)
}

/// A [r, d_in] and B [d_out, r] from [`join_factors`]'s tensor.
pub(crate) fn split_factors(ab: &Tensor, r: usize, d_in: usize, d_out: usize) -> candle_core::Result<(Tensor, Tensor)> {
    Ok((ab.narrow(0, 0, r * d_in)?.reshape((r, d_in))?, ab.narrow(0, r * d_in, d_out * r)?.reshape((d_out, r))?))
}

/// A contiguous CPU storage as a tensor (a copy), for the CPU paths written with candle ops.
pub(crate) fn cpu_tensor(s: &CpuStorage, l: &Layout, what: &str) -> candle_core::Result<Tensor> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: the input must be contiguous")
    };
    let (shape, cpu) = (l.shape().clone(), &candle_core::Device::Cpu);
    match s {
        CpuStorage::F64(v) => Tensor::from_slice(&v[start..end], shape, cpu),
        CpuStorage::F32(v) => Tensor::from_slice(&v[start..end], shape, cpu),
        CpuStorage::F16(v) => Tensor::from_slice(&v[start..end], shape, cpu),
        CpuStorage::BF16(v) => Tensor::from_slice(&v[start..end], shape, cpu),
        other => candle_core::bail!("{what}: unsupported dtype {:?}", other.dtype()),
    }
}

/// `x Wᵀ` for x [rows, in] and a frozen W [out, in] on the CPU: a bf16 W with f32 x (the mixed
/// precision of `--dtype bf16` training) on the bf16 kernel where the CPU has it
/// ([`gemm_bf16`]), else W in x's dtype.
pub(crate) fn frozen_x_wt(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if gemm_bf16::applies(x, w) {
        return gemm_bf16::x_wt(x, w).map_err(candle_core::Error::wrap);
    }
    x.matmul(&w.to_dtype(x.dtype())?.t()?)
}

/// `dy W` for dy [rows, out] and a frozen W [out, in]: the backward of [`frozen_x_wt`].
pub(crate) fn frozen_dy_w(dy: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if gemm_bf16::applies(dy, w) {
        return gemm_bf16::dy_w(dy, w).map_err(candle_core::Error::wrap);
    }
    dy.matmul(&w.to_dtype(dy.dtype())?)
}

pub(crate) use crate::threads::with_values;

/// The storage of a CPU tensor (a copy), in its dtype.
pub(crate) fn tensor_cpu_storage(t: &Tensor) -> candle_core::Result<CpuStorage> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F64 => CpuStorage::F64(t.to_vec1()?),
        DType::F32 => CpuStorage::F32(t.to_vec1()?),
        DType::F16 => CpuStorage::F16(t.to_vec1()?),
        DType::BF16 => CpuStorage::BF16(t.to_vec1()?),
        other => candle_core::bail!("unsupported dtype {other:?}"),
    })
}

/// `[..., n]` as `[rows, n]`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn rows_cols(l: &Layout) -> (usize, usize) {
    let cols = l.dims().last().copied().unwrap_or(1);
    (l.shape().elem_count() / cols.max(1), cols)
}

#[cfg(test)]
mod tests {
    use super::AttentionKernel;

    #[test]
    fn attention_kernel_names_parse_back_and_others_are_refused() {
        for kernel in [AttentionKernel::Flash, AttentionKernel::Gemm] {
            assert_eq!(kernel.name().parse::<AttentionKernel>(), Ok(kernel));
        }
        assert_eq!("GEMM".parse::<AttentionKernel>(), Ok(AttentionKernel::Gemm));
        let err = "tiled".parse::<AttentionKernel>().unwrap_err();
        assert!(err.contains("tiled"), "{err}");
    }
}

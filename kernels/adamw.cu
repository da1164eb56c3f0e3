// AdamW's update of one f32 parameter, in place, in three passes (torch.optim.AdamW's
// arithmetic, as `training::optim::AdamW` writes it in candle ops):
//
//   m ← β₁·m + (1−β₁)·g                                  adamw_moment (square = 0)
//   v ← β₂·v + (1−β₂)·g²                                 adamw_moment (square = 1)
//   p ← p·(1 − lr·wd) − lr · (m·(1/bc₁)) / (√(v·(1/bc₂)) + ε)   adamw_apply, bcᵢ = 1 − βᵢᵗ
//
// Why kernels: as candle ops one update is fourteen launches and six temporaries per
// parameter, and a LoRA on LLaMA-7B has 320 small parameters (launch-bound, not
// bandwidth-bound); here it is three launches that allocate nothing. Three, not one, because a
// candle in-place op writes one tensor: m and v are written by their own pass.
//
// Memory layout: p, g, m, v are contiguous f32 arrays of n elements. One thread per element,
// grid-stride. CPU reference: `ops::adamw` (`src/ops/adamw.rs`), the same expressions.

extern "C" __global__ void adamw_moment(float* moment, const float* g, long long n, float decay, float gain, int square) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float x = square ? g[i] * g[i] : g[i];
        moment[i] = moment[i] * decay + x * gain;
    }
}

extern "C" __global__ void adamw_apply(float* p, const float* m, const float* v, long long n, float decay,
                                       float inv_bc1, float inv_bc2, float eps, float lr) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float denom = sqrtf(v[i] * inv_bc2) + eps;
        p[i] = p[i] * decay - (m[i] * inv_bc1) / denom * lr;
    }
}

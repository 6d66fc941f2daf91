// TEAL column skipping: y += W mask(x) + bias, mask(x)_k = x_k if |x_k| * s_k >= t else 0, t = thr[0] and s read
// from device memory (per projection, per layer; changing them needs no recapture): s = 1 is TEAL, s = the weight
// column norms ||W[:, k]|| is WINA. The attention projections of a sparse step and
// every projection of a TEAL (e.g. SiLU) step.
// W is stored transposed (Wt (K, N): one row per input channel), so a skipped channel is a skipped row of Wt.
// Numpy twin: CpuBackend.linear(x, lin, teal=t) (cpu_dispatch.ColumnKernels: the kept channels' rows of Wt).
//   wt (K, N) in ENC fp32 | fp16 | int8 (scale (K,) per channel) | int4 | int8c (int8 with the source's per-output-row
//   scales, scale (N,), applied after the sum); x, xs (K,) fp32; thr (1,) fp32; bias (N,) fp32 | NULL; y (N,) fp32,
//   accumulated into (the launcher zeroes it unless it holds the residual); kept (1,) u64 | NULL: += channels kept.
// Grid (column tiles of 8 * blockDim.x, channel splits): each thread owns 8 columns and walks its split of the K
// channels, skipping those under the threshold; one atomicAdd per column per thread. N % 8 == 0.
#include "common.cuh"

#define ENC_INT8C 100  // int8 values, per-column (output) scales: the stored int8 weight transposed as it is

template <int ENC>
__device__ void teal_gemv(const void* __restrict__ wt, const __half* __restrict__ scale, int group, int K, int N,
                          int Np, const float* __restrict__ x, const float* __restrict__ xs,
                          const float* __restrict__ thr,
                          const float* __restrict__ bias, float* __restrict__ y, unsigned long long* __restrict__ kept) {
    const int col0 = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (col0 >= N) return;
    const float t = *thr;
    const int per = (K + gridDim.y - 1) / gridDim.y;
    const int begin = blockIdx.y * per, end = min(K, begin + per);
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    unsigned long long n_kept = 0;
    for (int k = begin; k < end; ++k) {
        const float xv = x[k];
        if (!(fabsf(xv) * xs[k] >= t)) continue;  // the channel's weight row is never read
        if (ENC == ENC_INT8C) {
            const uint2 v = __ldg(reinterpret_cast<const uint2*>(static_cast<const int8_t*>(wt) + (size_t)k * Np + col0));
            const int8_t* q = reinterpret_cast<const int8_t*>(&v);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] += xv * float(q[j]);
        } else {
            axpy8<ENC>(wt, scale, group, Np, k, col0, xv, acc);
        }
        ++n_kept;
    }
    if (kept && blockIdx.x == 0 && threadIdx.x == 0 && n_kept) atomicAdd(kept, n_kept);
    if (!n_kept && !(blockIdx.y == 0 && bias)) return;
    if (ENC == ENC_INT8C) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] *= __half2float(scale[col0 + j]);
    }
    if (blockIdx.y == 0 && bias) {
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] += bias[col0 + j];
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) atomicAdd(y + col0 + j, acc[j]);
}

#define INSTANTIATE(SUFFIX, ENC)                                                                                    \
    extern "C" __global__ void teal_gemv_##SUFFIX(const void* wt, const __half* scale, int group, int K, int N,     \
                                                  int Np, const float* x, const float* xs, const float* thr,        \
                                                  const float* bias, float* y, unsigned long long* kept) {          \
        teal_gemv<ENC>(wt, scale, group, K, N, Np, x, xs, thr, bias, y, kept);                                      \
    }

INSTANTIATE(fp32, ENC_FP32)
INSTANTIATE(fp16, ENC_FP16)
INSTANTIATE(int8, ENC_INT8)
INSTANTIATE(int4, ENC_INT4)
INSTANTIATE(int8c, ENC_INT8C)

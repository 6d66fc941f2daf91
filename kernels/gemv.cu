// Dense GEMV for decode (q/k/v/o projections, dense FFN, LM head): y = W norm(x) + bias + residual.
// Numpy twin: CpuBackend.linear (after CpuBackend.norm when fused), plus the residual add.
//   w: (N, K) in ENC (kernels/common.cuh); x (K,) fp32; norm_w (K,) fp32 | NULL (x as is), norm_b (K,) | NULL
//   (RMSNorm) else LayerNorm, eps: the norm fused into the x load (each block normalises its copy of x: no
//   extra launch, no extra pass over memory); bias (N,) | NULL; residual (N,) | NULL, may alias y (in-place
//   h += W x: each element is read before the same warp writes it). Out: y (N,) fp32.
// Grid-stride over rows, one warp per row, x in shared memory once per block (launcher caps the grid at a few
// blocks per SM); dynamic shared memory 4 * Kp bytes, then for compressed rows a stage per warp (csr_stage; the
// launcher raises the limit past 48 KB).
#include "common.cuh"

template <int ENC>
__device__ void gemv(const void* __restrict__ w, const __half* __restrict__ scale, int group,
                     const uint8_t* __restrict__ bitmap, const long long* __restrict__ row_offsets,
                     const float* __restrict__ x, const float* __restrict__ norm_w, const float* __restrict__ norm_b,
                     float eps, const float* __restrict__ bias, const float* residual, int N, int K, int Kp, float* y) {
    extern __shared__ float xs[];
    const int lane = threadIdx.x % WARP, wpb = blockDim.x / WARP;
    const int first = blockIdx.x * wpb + threadIdx.x / WARP;
    if (first < N) {  // this warp's first row streams into L2 while the block loads x
        const size_t bytes = dense_row_bytes<ENC>(Kp);
        prefetch_span(static_cast<const char*>(w) + first * bytes, bytes, lane);
    }
    load_x<ENC>(x, norm_w, norm_b, eps, K, Kp, xs);
    void* stage = csr_stage<ENC>(xs + Kp, threadIdx.x / WARP);  // compressed rows only
    for (int row = first; row < N; row += gridDim.x * wpb) {
        float v = row_dot<ENC>(w, scale, group, bitmap, row_offsets, row, Kp, xs, lane, stage);
        if (lane == 0) {
            if (bias) v += bias[row];
            if (residual) v += residual[row];
            y[row] = v;
        }
    }
}

#define INSTANTIATE(SUFFIX, ENC)                                                                                     \
    extern "C" __global__ void gemv_##SUFFIX(const void* w, const __half* scale, int group, const uint8_t* bitmap,   \
                                             const long long* row_offsets, const float* x, const float* norm_w,      \
                                             const float* norm_b, float eps, const float* bias,                      \
                                             const float* residual, int N, int K, int Kp, float* y) {                \
        gemv<ENC>(w, scale, group, bitmap, row_offsets, x, norm_w, norm_b, eps, bias, residual, N, K, Kp, y);        \
    }

INSTANTIATE(fp32, ENC_FP32)
INSTANTIATE(fp16, ENC_FP16)
INSTANTIATE(int8, ENC_INT8)
INSTANTIATE(int4, ENC_INT4)
INSTANTIATE(csr_fp16, ENC_CSR_FP16)
INSTANTIATE(csr_int8, ENC_CSR_INT8)

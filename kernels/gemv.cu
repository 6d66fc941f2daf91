// Dense GEMV for decode (q/k/v/o projections, dense FFN, LM head): y = W norm(x) + bias + residual; and gemv3, two
// or three projections of one normed input in one launch (attention's q, k, v; a dense FFN's gate and up).
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

// One of gemv3's matrices: (n, K) in the kernel's encoding, its bias (n,) fp32 | NULL and output y (n,) fp32.
struct Projection {
    const void* w;
    const __half* scale;
    const uint8_t* bitmap;
    const long long* row_offsets;
    const float* bias;
    float* y;
    int n;
};

// The projection holding stacked row `row` of a, b, c, and that row's index in it (*r). Field by field: a reference
// to one of the parameter structs would put all three in local memory (a stack frame per thread).
__device__ __forceinline__ Projection pick(Projection a, Projection b, Projection c, int row, int* r) {
    const bool in_a = row < a.n, in_b = !in_a && row < a.n + b.n;
    *r = in_a ? row : in_b ? row - a.n : row - a.n - b.n;
    return Projection{in_a ? a.w : in_b ? b.w : c.w,
                      in_a ? a.scale : in_b ? b.scale : c.scale,
                      in_a ? a.bitmap : in_b ? b.bitmap : c.bitmap,
                      in_a ? a.row_offsets : in_b ? b.row_offsets : c.row_offsets,
                      in_a ? a.bias : in_b ? b.bias : c.bias,
                      in_a ? a.y : in_b ? b.y : c.y,
                      in_a ? a.n : in_b ? b.n : c.n};
}

// gemv3: rows [0, a.n) of a, then b's, then c's (c.n may be 0: two matrices), one warp per row as in gemv (the
// selection is warp-uniform), x loaded and normed once per block for all: one launch where q, k, v took three (four
// with the norm), and one grid over N_q + N_k + N_v rows, so the small k and v projections of a GQA model do not
// each leave SMs idle.
template <int ENC>
__device__ void gemv3(Projection a, Projection b, Projection c, int group, const float* __restrict__ x,
                      const float* __restrict__ norm_w, const float* __restrict__ norm_b, float eps, int K, int Kp) {
    extern __shared__ float xs[];
    const int lane = threadIdx.x % WARP, wpb = blockDim.x / WARP, N = a.n + b.n + c.n;
    const int first = blockIdx.x * wpb + threadIdx.x / WARP;
    if (first < N) {
        int r;
        const Projection p = pick(a, b, c, first, &r);
        const size_t bytes = dense_row_bytes<ENC>(Kp);
        prefetch_span(static_cast<const char*>(p.w) + r * bytes, bytes, lane);
    }
    load_x<ENC>(x, norm_w, norm_b, eps, K, Kp, xs);
    void* stage = csr_stage<ENC>(xs + Kp, threadIdx.x / WARP);
    for (int row = first; row < N; row += gridDim.x * wpb) {
        int r;
        const Projection p = pick(a, b, c, row, &r);
        const float v = row_dot<ENC>(p.w, p.scale, group, p.bitmap, p.row_offsets, r, Kp, xs, lane, stage);
        if (lane == 0) p.y[r] = p.bias ? v + p.bias[r] : v;
    }
}

#define PROJECTION_ARGS(P)                                                                                           \
    const void *P##_w, const __half *P##_scale, const uint8_t *P##_bitmap, const long long *P##_offsets,              \
        const float *P##_bias, float *P##_y, int P##_n
#define PROJECTION(P) Projection{P##_w, P##_scale, P##_bitmap, P##_offsets, P##_bias, P##_y, P##_n}

#define INSTANTIATE(SUFFIX, ENC)                                                                                     \
    extern "C" __global__ void gemv_##SUFFIX(const void* w, const __half* scale, int group, const uint8_t* bitmap,   \
                                             const long long* row_offsets, const float* x, const float* norm_w,      \
                                             const float* norm_b, float eps, const float* bias,                      \
                                             const float* residual, int N, int K, int Kp, float* y) {                \
        gemv<ENC>(w, scale, group, bitmap, row_offsets, x, norm_w, norm_b, eps, bias, residual, N, K, Kp, y);        \
    }                                                                                                                \
    extern "C" __global__ void gemv3_##SUFFIX(PROJECTION_ARGS(a), PROJECTION_ARGS(b), PROJECTION_ARGS(c), int group,  \
                                              const float* x, const float* norm_w, const float* norm_b, float eps,    \
                                              int K, int Kp) {                                                        \
        gemv3<ENC>(PROJECTION(a), PROJECTION(b), PROJECTION(c), group, x, norm_w, norm_b, eps, K, Kp);               \
    }

INSTANTIATE(fp32, ENC_FP32)
INSTANTIATE(fp16, ENC_FP16)
INSTANTIATE(int8, ENC_INT8)
INSTANTIATE(int4, ENC_INT4)
INSTANTIATE(csr_fp16, ENC_CSR_FP16)
INSTANTIATE(csr_int8, ENC_CSR_INT8)

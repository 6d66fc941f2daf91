// Sparse FFN decode kernels (one token), CuPy RawModule. Semantics: edge_runtime/sparsity/predictor.py and
// edge_runtime/backends/cpu.py (ffn_sparse) are the numpy twins.
//
// Weights, one row per output (gate, up) or per FFN neuron (down stored transposed):
//   ENC_FP16: w (rows, K) half
//   ENC_INT8: w (rows, K) int8, scale (rows,) half            value = q * scale[row]
//   ENC_INT4: w (rows, K/2) uint8 (low nibble = even column), scale (rows, K/group) half, value = (nib - 8) * s
// Activations fp32. Accumulation fp32, warp-shuffle reductions, 16-byte weight loads (K % 8 == 0 for fp16,
// K % 16 == 0 for int8, K % 32 == 0 for int4; the host launcher asserts it).
// The active set never leaves the device: gate kernels append (row, gate value) pairs and bump *count;
// up and down kernels read *count, so a decode step needs no host synchronisation (graph-capturable).
#include <cuda_fp16.h>
#include <stdint.h>

#define ENC_FP16 0
#define ENC_INT8 1
#define ENC_INT4 2
#define WARP 32
#define MAX_D 8192  // largest hidden size held in shared memory (fp32): 32 KB

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// dot(W[row], x) for one warp; x (K,) fp32 in shared memory. Each lane reads 16 bytes per step.
template <int ENC>
__device__ __forceinline__ float row_dot(const void* __restrict__ w, const __half* __restrict__ scale, int row, int K,
                                         int group, const float* __restrict__ xs, int lane) {
    float acc = 0.f;
    if (ENC == ENC_FP16) {
        const uint4* p = reinterpret_cast<const uint4*>(static_cast<const __half*>(w) + (size_t)row * K);
        for (int c = lane; c < K / 8; c += WARP) {
            uint4 v = __ldg(p + c);
            const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                float2 f = __half22float2(h[j]);
                acc += f.x * xs[c * 8 + 2 * j] + f.y * xs[c * 8 + 2 * j + 1];
            }
        }
    } else if (ENC == ENC_INT8) {
        const uint4* p = reinterpret_cast<const uint4*>(static_cast<const int8_t*>(w) + (size_t)row * K);
        for (int c = lane; c < K / 16; c += WARP) {
            uint4 v = __ldg(p + c);
            const int8_t* q = reinterpret_cast<const int8_t*>(&v);
#pragma unroll
            for (int j = 0; j < 16; ++j) acc += float(q[j]) * xs[c * 16 + j];
        }
        acc = warp_sum(acc) * __half2float(scale[row]);
        return acc;  // already reduced
    } else {  // ENC_INT4: 16 bytes = 32 values, all inside one group (group % 32 == 0)
        const uint4* p = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(w) + (size_t)row * (K / 2));
        const int groups = K / group;
        for (int c = lane; c < K / 32; c += WARP) {
            uint4 v = __ldg(p + c);
            const uint8_t* b = reinterpret_cast<const uint8_t*>(&v);
            float part = 0.f;
#pragma unroll
            for (int j = 0; j < 16; ++j) {
                part += float(int(b[j] & 0xF) - 8) * xs[c * 32 + 2 * j] + float(int(b[j] >> 4) - 8) * xs[c * 32 + 2 * j + 1];
            }
            acc += part * __half2float(scale[(size_t)row * groups + (c * 32) / group]);
        }
    }
    return warp_sum(acc);
}

__device__ __forceinline__ void load_x(const float* __restrict__ x, float* xs, int K) {
    for (int i = threadIdx.x; i < K; i += blockDim.x) xs[i] = x[i];
    __syncthreads();
}

// A predicted-active row: count it, compute its gate, and append (row, gate) when the gate survives the
// activation (g > 0 and g >= the FATReLU threshold). Called by one whole warp.
template <int ENC>
__device__ __forceinline__ void gate_and_append(const void* __restrict__ w, const __half* __restrict__ scale, int group,
                                                int row, int K, const float* __restrict__ xs, int lane, float threshold,
                                                int* __restrict__ idx, float* __restrict__ gval, int* __restrict__ count,
                                                int* __restrict__ predicted) {
    if (lane == 0 && predicted) atomicAdd(predicted, 1);
    const float g = row_dot<ENC>(w, scale, row, K, group, xs, lane);
    if (lane == 0 && g > 0.f && g >= threshold) {
        const int pos = atomicAdd(count, 1);
        idx[pos] = row;
        gval[pos] = g;
    }
}

// SparseInfer predictor + gate GEMV, fused. One warp per gate row.
//   x (K,) fp32; x_signs (W,) uint32 sign words of x (bit j of word c: x[32c+j] < 0); gate_signs (N, W) uint32;
//   alpha: device pointer (per-layer value, so a change needs no graph recapture); threshold: FATReLU (0 = ReLU).
//   Out: idx (N,) int32, gval (N,) fp32 of surviving rows in arbitrary order, *count their number (zeroed
//   before launch). Row predicted zero when n_neg > alpha * (K - n_neg).
template <int ENC>
__device__ void sparseinfer_gate(const void* __restrict__ w, const __half* __restrict__ scale, int group,
                                 const float* __restrict__ x, const uint32_t* __restrict__ x_signs,
                                 const uint32_t* __restrict__ gate_signs, const float* __restrict__ alpha, float threshold,
                                 int N, int K, int* __restrict__ idx, float* __restrict__ gval, int* __restrict__ count,
                                 int* __restrict__ predicted) {
    extern __shared__ float xs[];
    load_x(x, xs, K);
    const int lane = threadIdx.x % WARP;
    const int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (row >= N) return;
    const int W = (K + 31) / 32;
    int n_neg = 0;
    for (int c = lane; c < W; c += WARP) n_neg += __popc(x_signs[c] ^ __ldg(gate_signs + (size_t)row * W + c));
    n_neg = warp_sum_int(n_neg);
    if ((float)n_neg > (*alpha) * (float)(K - n_neg)) return;  // predicted zero: the row is never read
    gate_and_append<ENC>(w, scale, group, row, K, xs, lane, threshold, idx, gval, count, predicted);
}

// Projection predictor + gate GEMV, fused. z_r = sum_i x_i * sign(w_ri) = sum(x) - 2 * sum_{bit set} x_i;
// predicted active when z_r >= theta[r] (theta (N,) fp32 read beside the row). x_sum: device scalar sum(x).
template <int ENC>
__device__ void projection_gate(const void* __restrict__ w, const __half* __restrict__ scale, int group,
                                const float* __restrict__ x, const float* __restrict__ x_sum,
                                const uint32_t* __restrict__ gate_signs, const float* __restrict__ theta, float threshold,
                                int N, int K, int* __restrict__ idx, float* __restrict__ gval, int* __restrict__ count,
                                int* __restrict__ predicted) {
    extern __shared__ float xs[];
    load_x(x, xs, K);
    const int lane = threadIdx.x % WARP;
    const int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (row >= N) return;
    const int W = (K + 31) / 32;
    float neg = 0.f;
    for (int c = lane; c < W; c += WARP) {
        uint32_t bits = __ldg(gate_signs + (size_t)row * W + c);
        while (bits) {
            const int j = __ffs(bits) - 1;
            neg += xs[c * 32 + j];
            bits &= bits - 1;
        }
    }
    const float z = *x_sum - 2.f * warp_sum(neg);
    if (z < __ldg(theta + row)) return;
    gate_and_append<ENC>(w, scale, group, row, K, xs, lane, threshold, idx, gval, count, predicted);
}

// Up projection over the surviving rows: h[pos] = gval[pos] * dot(W_up[idx[pos]], x). One warp per entry;
// launched for N entries, entries at or past *count return at once.
template <int ENC>
__device__ void up_sparse(const void* __restrict__ w, const __half* __restrict__ scale, int group, const float* __restrict__ x,
                          int K, const int* __restrict__ idx, const float* __restrict__ gval, const int* __restrict__ count,
                          float* __restrict__ h) {
    extern __shared__ float xs[];
    const int n = *count;
    const int pos = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (blockIdx.x * (blockDim.x / WARP) >= n) return;  // whole block idle: skip loading x
    load_x(x, xs, K);
    if (pos >= n) return;
    const float u = row_dot<ENC>(w, scale, idx[pos], K, group, xs, threadIdx.x % WARP);
    if (threadIdx.x % WARP == 0) h[pos] = gval[pos] * u;
}

// Down projection as an accumulation over rows of W_down^T (N, D): y[col] += sum_pos h[pos] * Wt[idx[pos], col].
// Grid (D / (8 * blockDim.x) column tiles, row splits); each thread owns 8 columns (one 16-byte fp16 load, or 8
// int8 values) and walks its split of the active list; one atomicAdd per column per thread. y zeroed before.
template <int ENC>
__device__ void down_sparse(const void* __restrict__ wt, const __half* __restrict__ scale, int group, int D,
                            const int* __restrict__ idx, const float* __restrict__ h, const int* __restrict__ count,
                            float* __restrict__ y) {
    const int n = *count;
    const int col0 = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (col0 >= D) return;
    const int per = (n + gridDim.y - 1) / gridDim.y;
    const int begin = blockIdx.y * per, end = min(n, begin + per);
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int pos = begin; pos < end; ++pos) {
        const int r = idx[pos];
        const float hv = h[pos];
        if (ENC == ENC_FP16) {
            uint4 v = __ldg(reinterpret_cast<const uint4*>(static_cast<const __half*>(wt) + (size_t)r * D + col0));
            const __half2* p = reinterpret_cast<const __half2*>(&v);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                float2 f = __half22float2(p[j]);
                acc[2 * j] += hv * f.x;
                acc[2 * j + 1] += hv * f.y;
            }
        } else if (ENC == ENC_INT8) {
            uint2 v = __ldg(reinterpret_cast<const uint2*>(static_cast<const int8_t*>(wt) + (size_t)r * D + col0));
            const int8_t* q = reinterpret_cast<const int8_t*>(&v);
            const float s = hv * __half2float(scale[r]);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] += s * float(q[j]);
        } else {
            uint32_t v = __ldg(reinterpret_cast<const uint32_t*>(static_cast<const uint8_t*>(wt) + (size_t)r * (D / 2) + col0 / 2));
            const float s = hv * __half2float(scale[(size_t)r * (D / group) + col0 / group]);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint32_t b = (v >> (8 * j)) & 0xFF;
                acc[2 * j] += s * float(int(b & 0xF) - 8);
                acc[2 * j + 1] += s * float(int(b >> 4) - 8);
            }
        }
    }
    if (begin < end) {
#pragma unroll
        for (int j = 0; j < 8; ++j) atomicAdd(y + col0 + j, acc[j]);
    }
}

// Dense GEMV, one warp per row: y[row] = dot(W[row], x). The baseline and the non-FFN projections.
template <int ENC>
__device__ void gemv(const void* __restrict__ w, const __half* __restrict__ scale, int group, const float* __restrict__ x,
                     int N, int K, float* __restrict__ y) {
    extern __shared__ float xs[];
    load_x(x, xs, K);
    const int row = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    if (row >= N) return;
    const float v = row_dot<ENC>(w, scale, row, K, group, xs, threadIdx.x % WARP);
    if (threadIdx.x % WARP == 0) y[row] = v;
}

// Sign words of x and sum(x), one block: x_signs (ceil(K/32),) uint32, x_sum scalar. Zeroes the counters
// of this layer's active list (count, predicted) so that the whole step stays on the device.
extern "C" __global__ void prepare_x(const float* __restrict__ x, int K, uint32_t* __restrict__ x_signs,
                                     float* __restrict__ x_sum, int* __restrict__ count, int* __restrict__ predicted) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    float s = 0.f;
    for (int base = warp * WARP; base < K; base += blockDim.x) {
        const int i = base + lane;
        const float v = i < K ? x[i] : 0.f;
        s += v;
        const uint32_t word = __ballot_sync(0xffffffffu, v < 0.f);
        if (lane == 0) x_signs[base / 32] = word;
    }
    s = warp_sum(s);
    if (lane == 0) partial[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.f;
        for (int w = 0; w < (int)(blockDim.x / WARP); ++w) t += partial[w];
        *x_sum = t;
        *count = 0;
        if (predicted) *predicted = 0;
    }
}

#define INSTANTIATE(SUFFIX, ENC)                                                                                          \
    extern "C" __global__ void sparseinfer_gate_##SUFFIX(const void* w, const __half* scale, int group, const float* x,     \
                                                         const uint32_t* x_signs, const uint32_t* gate_signs,               \
                                                         const float* alpha, float threshold, int N, int K, int* idx,       \
                                                         float* gval, int* count, int* predicted) {                         \
        sparseinfer_gate<ENC>(w, scale, group, x, x_signs, gate_signs, alpha, threshold, N, K, idx, gval, count, predicted); \
    }                                                                                                                     \
    extern "C" __global__ void projection_gate_##SUFFIX(const void* w, const __half* scale, int group, const float* x,      \
                                                        const float* x_sum, const uint32_t* gate_signs, const float* theta, \
                                                        float threshold, int N, int K, int* idx, float* gval, int* count,   \
                                                        int* predicted) {                                                   \
        projection_gate<ENC>(w, scale, group, x, x_sum, gate_signs, theta, threshold, N, K, idx, gval, count, predicted);  \
    }                                                                                                                     \
    extern "C" __global__ void up_sparse_##SUFFIX(const void* w, const __half* scale, int group, const float* x, int K,      \
                                                  const int* idx, const float* gval, const int* count, float* h) {          \
        up_sparse<ENC>(w, scale, group, x, K, idx, gval, count, h);                                                       \
    }                                                                                                                     \
    extern "C" __global__ void down_sparse_##SUFFIX(const void* wt, const __half* scale, int group, int D, const int* idx,  \
                                                    const float* h, const int* count, float* y) {                           \
        down_sparse<ENC>(wt, scale, group, D, idx, h, count, y);                                                          \
    }                                                                                                                     \
    extern "C" __global__ void gemv_##SUFFIX(const void* w, const __half* scale, int group, const float* x, int N, int K,   \
                                             float* y) {                                                                    \
        gemv<ENC>(w, scale, group, x, N, K, y);                                                                           \
    }

INSTANTIATE(fp16, ENC_FP16)
INSTANTIATE(int8, ENC_INT8)
INSTANTIATE(int4, ENC_INT4)

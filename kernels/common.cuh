// Device helpers shared by kernels/*.cu. nvcc finds it beside the including file; the host loader
// (edge_runtime/backends/cuda_ops/common.py) inlines it into the source it hands to NVRTC.
//
// Weight encodings (edge_runtime/pack/quant.py, sparse_weights.py), a logical (N, K) matrix, one row per output:
//   ENC_FP32      w (N, K) float (small models, exact references)           K % 4 == 0
//   ENC_FP16      w (N, K) half                                             K % 8 == 0
//   ENC_INT8      w (N, K) int8, scale (N,) half: value = q * scale[row]    K % 16 == 0
//   ENC_INT4      w (N, Kp/2) uint8, Kp = K rounded up to the group (quantize pads with zeros); low nibble =
//                 even column; scale (N, Kp/group) half: value = (nibble - 8) * s; group % 32 == 0
//   ENC_CSR_FP16  compressed weight-sparse rows: bitmap (N, ceil(K/8)) uint8 (bit j of byte c = column 8c+j kept),
//                 values (nnz,) half in row order, row_offsets (N+1,) int64
//   ENC_CSR_INT8  the same with int8 values and scale (N,) half
// Activations fp32; accumulation fp32; warp-shuffle reductions. Launchers assert every precondition.
#pragma once
#include <cuda_fp16.h>
#ifdef __CUDACC_RTC__
// NVRTC (how CuPy compiles these files) searches no system include directory: no <stdint.h>, no INFINITY.
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

#define WARP 32
// Row kernels' block and the blocks per SM their grids are sized for (cuda_ops/common.py THREADS, BLOCKS_PER_SM).
// As __launch_bounds__ (ffn_gate, csr_down) they hold a kernel to 64 registers, so 4 blocks fit; gemv.cu's kernels
// go without (held to 64, gemv3_int4 spills) and the launcher sizes their grid by the registers they use.
#define ROW_THREADS 256
#define ROW_BLOCKS_PER_SM 4
#define FULL_MASK 0xffffffffu
#define ENC_FP16 0
#define ENC_INT8 1
#define ENC_INT4 2
#define ENC_CSR_FP16 3
#define ENC_CSR_INT8 4
#define ENC_FP32 5

// The int32 step buffer: what changes every token, read by pointer so that one captured graph serves every step.
// Slots (edge_runtime/backends/cuda_ops/common.py STEP_* must agree):
#define STEP_TOKEN 0  // the token this step decodes; the sampler writes the next one here
#define STEP_POS 1    // its position: the KV append writes there, attention covers [0, pos]; advance_pos moves it
#define STEP_RNG 2    // sampling counter (uint32), advanced by the sampler

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;  // xor butterfly: every lane gets the bitwise-same value
}

__device__ __forceinline__ int warp_sum_int(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Inclusive prefix sum of v over the warp's lanes (lane order). Whole warp.
template <typename T>
__device__ __forceinline__ T warp_scan(T v, int lane) {
    for (int o = 1; o < WARP; o <<= 1) {
        const T t = __shfl_up_sync(FULL_MASK, v, o);
        if (lane >= o) v += t;
    }
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, every thread calling); every thread gets the same value.
// red: __shared__ float[32].
__device__ __forceinline__ float block_sum(float v, float* red) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, nw = blockDim.x / WARP;
    v = warp_sum(v);
    __syncthreads();  // red may still be read by a previous call
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = 0.f;
    for (int i = 0; i < nw; ++i) t += red[i];
    return t;
}

__device__ __forceinline__ float block_max(float v, float* red) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, nw = blockDim.x / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = red[0];
    for (int i = 1; i < nw; ++i) t = fmaxf(t, red[i]);
    return t;
}

// mean and 1/sqrt(var + eps) of x (K,) over the block: LayerNorm when center, else RMSNorm (mean 0, mean of x^2).
// The cpu backend's `norm`: two passes (mean, then centred squares), as numpy does.
__device__ __forceinline__ void norm_stats(const float* x, bool center, float eps, int K, float* red, float* mu,
                                           float* inv) {
    float m = 0.f;
    if (center) {
        float s = 0.f;
        for (int i = threadIdx.x; i < K; i += blockDim.x) s += x[i];
        m = block_sum(s, red) / (float)K;
    }
    float ss = 0.f;
    for (int i = threadIdx.x; i < K; i += blockDim.x) {
        const float d = x[i] - m;
        ss += d * d;
    }
    *mu = m;
    *inv = 1.f / sqrtf(block_sum(ss, red) / (float)K + eps);
}

// One normalised element: norm_w == NULL: x as is; norm_b == NULL: RMSNorm; else LayerNorm.
__device__ __forceinline__ float norm_apply(float v, int i, const float* norm_w, const float* norm_b, float mu,
                                            float inv) {
    if (!norm_w) return v;
    return norm_b ? (v - mu) * inv * norm_w[i] + norm_b[i] : v * inv * norm_w[i];
}

// Ask for the 128-byte line at p to be brought into L2 (a hint: nothing waits for it, nothing faults). A block
// issues these for the first weights it will read before it loads x (load_x ends with a barrier), so HBM is busy
// during that load instead of idle. The emulator has no cache: a no-op there.
__device__ __forceinline__ void prefetch_l2(const void* p) {
#ifndef CUDA_EMU
    asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
#endif
}

// Lane's share of the prefetch of `bytes` bytes from p: lines lane, lane + 32, ... of the span.
__device__ __forceinline__ void prefetch_span(const void* p, size_t bytes, int lane) {
    for (size_t off = (size_t)lane * 128; off < bytes; off += WARP * 128)
        prefetch_l2(static_cast<const char*>(p) + off);
}

// Values per 16-byte weight chunk: the shared-memory layout of x for a row dot (see load_x). 8 for fp16, and for
// compressed rows the 8 columns of a bitmap byte (a lane walks its byte's bits; Kp = K rounded up to 8).
template <int ENC>
struct Enc {
    static constexpr int VALS = 8;
};
template <>
struct Enc<ENC_INT8> {
    static constexpr int VALS = 16;
};
template <>
struct Enc<ENC_INT4> {
    static constexpr int VALS = 32;
};
template <>
struct Enc<ENC_FP32> {
    static constexpr int VALS = 4;
};

// Index of x[i] in the shared layout of ENC for Kp inputs.
template <int ENC>
__device__ __forceinline__ int xs_index(int i, int Kp) {
    constexpr int V = Enc<ENC>::VALS;
    return (i % V) * (Kp / V) + i / V;
}

// x (K,) fp32 (optionally normalised) -> xs, zero-padded to Kp, chunk-transposed: xs[j * C + c] = x[c * V + j],
// V values per 16-byte weight chunk, C = Kp / V. Lane c of a warp reading value j of its chunk c then hits bank
// (j * C + c) % 32: consecutive lanes, consecutive banks, no conflicts (a natural layout gives 8/16/32-way ones).
// Whole block, uniform control flow; ends with __syncthreads.
template <int ENC>
__device__ void load_x(const float* x, const float* norm_w, const float* norm_b, float eps, int K, int Kp, float* xs) {
    __shared__ float red[32];
    float mu = 0.f, inv = 1.f;
    if (norm_w) norm_stats(x, norm_b != nullptr, eps, K, red, &mu, &inv);
    for (int i = threadIdx.x; i < Kp; i += blockDim.x)
        xs[xs_index<ENC>(i, Kp)] = i < K ? norm_apply(x[i], i, norm_w, norm_b, mu, inv) : 0.f;
    __syncthreads();
}

// Compressed rows (ENC_CSR_*) are read a segment of CSR_SEG_BYTES bitmap bytes (8 stretches of 32, 2048 columns)
// at a time: the warp loads the segment's bitmap (lane l: byte l of each stretch), scans the kept counts, copies
// the segment's values (contiguous in the value array) into its shared-memory stage with coalesced loads, 16 in
// flight per lane, then each lane walks its bytes' set bits against the stage. Two dependent memory round trips a
// segment; reading values where the bits are walked would be one round trip per kept weight of a lane.
#define CSR_SEG_BYTES 256
#define CSR_SEG_VALUES (8 * CSR_SEG_BYTES)
#define CSR_COPY_UNROLL 16

template <int ENC>
struct CsrValue {
    typedef __half T;
};
template <>
struct CsrValue<ENC_CSR_INT8> {
    typedef int8_t T;
};

__device__ __forceinline__ float csr_value(__half v) { return __half2float(v); }
__device__ __forceinline__ float csr_value(int8_t v) { return float(v); }

// A warp's stage: CSR_SEG_VALUES values (fp16: 4 KB, int8: 2 KB) at `base` (shared memory past what the kernel
// keeps there), one per warp of the block.
template <int ENC>
__device__ __forceinline__ void* csr_stage(void* base, int warp) {
    return static_cast<char*>(base) + (size_t)warp * CSR_SEG_VALUES * sizeof(typename CsrValue<ENC>::T);
}

template <int ENC>
__device__ __forceinline__ float csr_row_dot(const void* __restrict__ w, const __half* __restrict__ scale,
                                             const uint8_t* __restrict__ bitmap,
                                             const long long* __restrict__ row_offsets, int row, int K,
                                             const float* __restrict__ xs, int lane, void* stage_raw) {
    typedef typename CsrValue<ENC>::T T;
    const T* __restrict__ vals = static_cast<const T*>(w);
    T* stage = static_cast<T*>(stage_raw);
    const int KB = (K + 7) / 8, C = K / 8;  // K = Kp, a multiple of 8
    const uint8_t* bm = bitmap + (size_t)row * KB;
    long long base = row_offsets[row];
    float acc = 0.f;
    for (int s0 = 0; s0 < KB; s0 += CSR_SEG_BYTES) {
        constexpr int S = CSR_SEG_BYTES / WARP;
        uint32_t b[S];
        int excl[S], total = 0;  // byte s0 + 32t + lane: its first value's place in the segment
#pragma unroll
        for (int t = 0; t < S; ++t) {
            const int c = s0 + WARP * t + lane;
            b[t] = c < KB ? __ldg(bm + c) : 0u;
        }
#pragma unroll
        for (int t = 0; t < S; ++t) {
            const int n = __popc(b[t]), incl = warp_scan(n, lane);
            excl[t] = total + incl - n;
            total += __shfl_sync(FULL_MASK, incl, WARP - 1);
        }
        for (int v0 = 0; v0 < total; v0 += CSR_COPY_UNROLL * WARP) {  // warp-uniform trip count
            T r[CSR_COPY_UNROLL];
#pragma unroll
            for (int u = 0; u < CSR_COPY_UNROLL; ++u)  // clamped index: every load valid, none predicated
                r[u] = __ldg(vals + base + min(v0 + u * WARP + lane, total - 1));
#pragma unroll
            for (int u = 0; u < CSR_COPY_UNROLL; ++u)
                if (v0 + u * WARP + lane < total) stage[v0 + u * WARP + lane] = r[u];
        }
        __syncwarp();
#pragma unroll
        for (int t = 0; t < S; ++t) {
            uint32_t bits = b[t];
            int at = excl[t];
            const float* xc = xs + (s0 + WARP * t + lane);  // x[8c + j] at xc[j * C]: lanes on consecutive banks
            while (bits) {
                const int j = __ffs(bits) - 1;
                acc += csr_value(stage[at++]) * xc[j * C];
                bits &= bits - 1;
            }
        }
        __syncwarp();  // the stage is rewritten by the next segment
        base += total;
    }
    acc = warp_sum(acc);
    return ENC == ENC_CSR_INT8 ? acc * __half2float(scale[row]) : acc;
}

// Bytes of one dense row of Kp inputs in ENC (compressed rows: 0, their length is data-dependent).
template <int ENC>
__device__ __forceinline__ size_t dense_row_bytes(int Kp) {
    return ENC == ENC_FP32 ? 4 * (size_t)Kp : ENC == ENC_FP16 ? 2 * (size_t)Kp : ENC == ENC_INT8 ? (size_t)Kp
         : ENC == ENC_INT4 ? (size_t)Kp / 2 : 0;
}

// dot(W[row], x) by one warp, x in shared memory as load_x<ENC> left it; every lane gets the result.
// Dense encodings: each lane reads 16 bytes per step. bitmap/row_offsets/stage: compressed rows only (else unused).
template <int ENC>
__device__ __forceinline__ float row_dot(const void* __restrict__ w, const __half* __restrict__ scale, int group,
                                         const uint8_t* __restrict__ bitmap, const long long* __restrict__ row_offsets,
                                         int row, int Kp, const float* __restrict__ xs, int lane, void* stage) {
    constexpr int V = Enc<ENC>::VALS;
    const int C = Kp / V;
    float acc = 0.f;
    if (ENC == ENC_FP32) {
        const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(w) + (size_t)row * Kp);
#pragma unroll 4  // four 16-byte loads in flight per lane: a 7B row is 8 KB, one warp's 512 B a step
        for (int c = lane; c < C; c += WARP) {
            const float4 v = __ldg(p + c);
            acc += v.x * xs[c] + v.y * xs[C + c] + v.z * xs[2 * C + c] + v.w * xs[3 * C + c];
        }
        return warp_sum(acc);
    } else if (ENC == ENC_FP16) {
        const uint4* p = reinterpret_cast<const uint4*>(static_cast<const __half*>(w) + (size_t)row * Kp);
#pragma unroll 4  // four 16-byte loads in flight per lane: a 7B row is 8 KB, one warp's 512 B a step
        for (int c = lane; c < C; c += WARP) {
            const uint4 v = __ldg(p + c);
            const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float2 f = __half22float2(h[j]);
                acc += f.x * xs[(2 * j) * C + c] + f.y * xs[(2 * j + 1) * C + c];
            }
        }
        return warp_sum(acc);
    } else if (ENC == ENC_INT8) {
        const uint4* p = reinterpret_cast<const uint4*>(static_cast<const int8_t*>(w) + (size_t)row * Kp);
#pragma unroll 4  // four 16-byte loads in flight per lane: a 7B row is 8 KB, one warp's 512 B a step
        for (int c = lane; c < C; c += WARP) {
            const uint4 v = __ldg(p + c);
            const int8_t* q = reinterpret_cast<const int8_t*>(&v);
#pragma unroll
            for (int j = 0; j < 16; ++j) acc += float(q[j]) * xs[j * C + c];
        }
        return warp_sum(acc) * __half2float(scale[row]);
    } else if (ENC == ENC_INT4) {  // 16 bytes = 32 values, all inside one group (group % 32 == 0)
        const uint4* p = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(w) + (size_t)row * (Kp / 2));
        const __half* srow = scale + (size_t)row * (Kp / group);
#pragma unroll 4  // four 16-byte loads in flight per lane: a 7B row is 8 KB, one warp's 512 B a step
        for (int c = lane; c < C; c += WARP) {
            const uint4 v = __ldg(p + c);
            const uint8_t* b = reinterpret_cast<const uint8_t*>(&v);
            float part = 0.f;
#pragma unroll
            for (int j = 0; j < 16; ++j)
                part += float(int(b[j] & 0xF) - 8) * xs[(2 * j) * C + c]
                      + float(int(b[j] >> 4) - 8) * xs[(2 * j + 1) * C + c];
            acc += part * __half2float(srow[(c * 32) / group]);
        }
        return warp_sum(acc);
    } else {
        return csr_row_dot<ENC>(w, scale, bitmap, row_offsets, row, Kp, xs, lane, stage);
    }
}

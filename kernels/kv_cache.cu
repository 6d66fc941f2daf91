// KV-cache append for one decode token, RoPE of k fused (one launch for k and v, k never written unrotated).
// Numpy twin: the first lines of CpuBackend.attention (after CpuBackend.rope on k).
//   k, v (n_kv, hd) fp32 (this token's projections); cos, sin (n_pos, hd/2) fp32 | NULL (no rotation, OPT);
//   step: the position is step[STEP_POS] (outside [0, min(max_ctx, n_pos)): nothing is written);
//   k_cache, v_cache (n_kv, max_ctx, hd) of one layer, fp32 (kv_append_f32) or fp16 (kv_append_f16, RNE).
// Grid (n_kv,), any block size.
#include "common.cuh"

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }

template <typename T>
__device__ void kv_append(const float* __restrict__ k, const float* __restrict__ v, const float* __restrict__ cos_t,
                          const float* __restrict__ sin_t, const int* __restrict__ step, int n_pos, int max_ctx,
                          int hd, T* __restrict__ k_cache, T* __restrict__ v_cache) {
    const int pos = step[STEP_POS], half = hd / 2, h = blockIdx.x;
    if (pos < 0 || pos >= max_ctx || (cos_t && pos >= n_pos)) return;
    const float* kh = k + (size_t)h * hd;
    const float* vh = v + (size_t)h * hd;
    T* kc = k_cache + ((size_t)h * max_ctx + pos) * hd;
    T* vc = v_cache + ((size_t)h * max_ctx + pos) * hd;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float k1 = kh[i], k2 = kh[i + half];
        if (cos_t) {
            const float c = cos_t[(size_t)pos * half + i], s = sin_t[(size_t)pos * half + i];
            const float r1 = k1 * c - k2 * s, r2 = k2 * c + k1 * s;
            k1 = r1;
            k2 = r2;
        }
        store(kc + i, k1);
        store(kc + i + half, k2);
        store(vc + i, vh[i]);
        store(vc + i + half, vh[i + half]);
    }
}

extern "C" __global__ void kv_append_f32(const float* k, const float* v, const float* cos_t, const float* sin_t,
                                         const int* step, int n_pos, int max_ctx, int hd, float* k_cache,
                                         float* v_cache) {
    kv_append<float>(k, v, cos_t, sin_t, step, n_pos, max_ctx, hd, k_cache, v_cache);
}

extern "C" __global__ void kv_append_f16(const float* k, const float* v, const float* cos_t, const float* sin_t,
                                         const int* step, int n_pos, int max_ctx, int hd, __half* k_cache,
                                         __half* v_cache) {
    kv_append<__half>(k, v, cos_t, sin_t, step, n_pos, max_ctx, hd, k_cache, v_cache);
}

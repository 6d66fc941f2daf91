// Decode attention over the KV cache, split over the KV length (flash-decoding), GQA.
// Numpy twin: CpuBackend.attention for one token (T = 1): softmax(cap(scale q k^T)) v over positions [lo, pos],
// cap(s) = softcap * tanh(s / softcap) (softcap 0: none), lo = max(0, pos + 1 - window) (window 0: lo = 0).
//   attn_partial_<f32|f16>: grid (n_kv, n_chunks), block (threads, a multiple of 32). Block (g, c) covers
//     positions [max(c * chunk, lo), min((c + 1) * chunk, L)), L = min(step[STEP_POS] + 1, max_ctx), for the
//     group = n_heads / n_kv query heads g * group .. (g + 1) * group - 1 that share kv head g (K and V read once
//     for the group).
//     q (n_heads, hd) fp32; cos, sin (n_pos, hd/2) fp32: q rotated (RoPE, rotate_half) at step[STEP_POS] as the
//     block loads it, the rope launch fused away (NULL, or a position outside the table: q used as given);
//     k_cache, v_cache (n_kv, max_ctx, hd) fp32 | fp16.
//     Out, per query head h and chunk c: part_m (n_heads, n_chunks) the chunk's max score, part_l the sum of
//     exp(score - m), part_acc (n_heads, n_chunks, hd) sum of exp(score - m) v. Chunks at or past L write nothing;
//     chunks wholly before lo (sliding window) write m = -inf, l = 0, acc = 0.
//     Dynamic shared memory: 4 * group * (hd + chunk) bytes.
//   attn_combine: grid (n_heads,), block >= 32. out (n_heads, hd) fp32
//     = sum_c acc_c e^(m_c - M) / sum_c l_c e^(m_c - M) over the chunks below L.
#include "common.cuh"

__device__ __forceinline__ float load_f(const float* p) { return *p; }
__device__ __forceinline__ float load_f(const __half* p) { return __half2float(*p); }

// qs[j * hd + d] = query head g * group + j, rotated when `rotate`: Hugging Face rotate_half, for i < hd/2
// (x[i], x[i + hd/2]) -> (x[i] c - x[i + hd/2] s, x[i + hd/2] c + x[i] s), c, s = cos/sin[pos, i] (as the k of
// kernels/kv_cache.cu).
__device__ void load_queries(const float* __restrict__ q, const float* __restrict__ cos_t,
                             const float* __restrict__ sin_t, bool rotate, int pos, int g, int group, int hd,
                             float* qs) {
    const int half = hd / 2;
    for (int i = threadIdx.x; i < group * hd; i += blockDim.x) {
        const float* qh = q + ((size_t)g * group + i / hd) * hd;
        const int d = i % hd;
        float v = qh[d];
        if (rotate) {
            const int j = d % half;
            const float c = cos_t[(size_t)pos * half + j], s = sin_t[(size_t)pos * half + j];
            v = d < half ? v * c - qh[d + half] * s : v * c + qh[d - half] * s;
        }
        qs[i] = v;
    }
}

template <typename T>
__device__ void attn_partial(const float* __restrict__ q, const float* __restrict__ cos_t,
                             const float* __restrict__ sin_t, int n_pos, const T* __restrict__ k_cache,
                             const T* __restrict__ v_cache, const int* __restrict__ step, int n_heads, int n_kv,
                             int max_ctx, int hd, int chunk, float scale, float softcap, int window,
                             float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_acc) {
    extern __shared__ float sm[];
    const int g = blockIdx.x, c = blockIdx.y, n_chunks = gridDim.y;
    const int pos = step[STEP_POS], L = min(pos + 1, max_ctx);
    if (c * chunk >= L) return;  // past the context: the combine does not read this chunk
    const int lo = window > 0 ? max(0, L - window) : 0;
    const int t0 = max(c * chunk, lo);
    const int nt = min((c + 1) * chunk, L) - t0, group = n_heads / n_kv;
    if (nt <= 0) {  // wholly before the sliding window: an empty chunk for the combine
        for (int i = threadIdx.x; i < group * hd; i += blockDim.x) {
            const int h = g * group + i / hd;
            part_acc[((size_t)h * n_chunks + c) * hd + i % hd] = 0.f;
            if (i % hd == 0) {
                part_m[h * n_chunks + c] = -INFINITY;
                part_l[h * n_chunks + c] = 0.f;
            }
        }
        return;
    }
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, nw = blockDim.x / WARP;
    float* qs = sm;                 // (group, hd)
    float* s = sm + group * hd;     // (group, chunk) scores, then exp(score - m)
    load_queries(q, cos_t, sin_t, cos_t && pos >= 0 && pos < n_pos, pos, g, group, hd, qs);
    __syncthreads();
    const T* kbase = k_cache + ((size_t)g * max_ctx + t0) * hd;
    const T* vbase = v_cache + ((size_t)g * max_ctx + t0) * hd;
    for (int t = warp; t < nt; t += nw) {  // one warp per position, all heads of the group
        const T* kt = kbase + (size_t)t * hd;
        for (int j = 0; j < group; ++j) {
            float a = 0.f;
            for (int d = lane; d < hd; d += WARP) a += qs[j * hd + d] * load_f(kt + d);
            a = warp_sum(a) * scale;
            if (softcap > 0.f) a = softcap * tanhf(a / softcap);
            if (lane == 0) s[j * chunk + t] = a;
        }
    }
    __syncthreads();
    for (int j = warp; j < group; j += nw) {  // one warp per head: max and sum of exponentials
        float m = -INFINITY;
        for (int t = lane; t < nt; t += WARP) m = fmaxf(m, s[j * chunk + t]);
        m = warp_max(m);
        float l = 0.f;
        for (int t = lane; t < nt; t += WARP) {
            const float e = expf(s[j * chunk + t] - m);
            s[j * chunk + t] = e;
            l += e;
        }
        l = warp_sum(l);
        if (lane == 0) {
            const int h = g * group + j;
            part_m[h * n_chunks + c] = m;
            part_l[h * n_chunks + c] = l;
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * hd; i += blockDim.x) {  // one thread per (head, dim): coalesced v reads
        const int j = i / hd, d = i % hd;
        float a = 0.f;
        for (int t = 0; t < nt; ++t) a += s[j * chunk + t] * load_f(vbase + (size_t)t * hd + d);
        part_acc[((size_t)(g * group + j) * n_chunks + c) * hd + d] = a;
    }
}

#define INSTANTIATE(SUFFIX, T)                                                                                        \
    extern "C" __global__ void attn_partial_##SUFFIX(const float* q, const float* cos_t, const float* sin_t,           \
                                                     int n_pos, const T* k_cache, const T* v_cache, const int* step,   \
                                                     int n_heads, int n_kv, int max_ctx, int hd, int chunk,            \
                                                     float scale, float softcap, int window, float* part_m,            \
                                                     float* part_l, float* part_acc) {                                 \
        attn_partial<T>(q, cos_t, sin_t, n_pos, k_cache, v_cache, step, n_heads, n_kv, max_ctx, hd, chunk, scale,     \
                        softcap, window, part_m, part_l, part_acc);                                                   \
    }

INSTANTIATE(f32, float)
INSTANTIATE(f16, __half)

extern "C" __global__ void attn_combine(const float* __restrict__ part_m, const float* __restrict__ part_l,
                                        const float* __restrict__ part_acc, const int* __restrict__ step, int max_ctx,
                                        int chunk, int n_chunks, int hd, float* __restrict__ out) {
    const int h = blockIdx.x;
    const int L = min(step[STEP_POS] + 1, max_ctx);
    const int used = (L + chunk - 1) / chunk;
    const float* m = part_m + (size_t)h * n_chunks;
    const float* l = part_l + (size_t)h * n_chunks;
    float M = -INFINITY;
    for (int c = 0; c < used; ++c) M = fmaxf(M, m[c]);
    float den = 0.f;
    for (int c = 0; c < used; ++c) den += l[c] * expf(m[c] - M);
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float num = 0.f;
        for (int c = 0; c < used; ++c) num += part_acc[((size_t)h * n_chunks + c) * hd + d] * expf(m[c] - M);
        out[(size_t)h * hd + d] = num / den;
    }
}

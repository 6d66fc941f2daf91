// Next-token sampling on the device: one block, so that a captured decode graph ends with the next token id in the
// step buffer (the position is the step's to advance: elementwise.cu advance_pos).
// Semantics of edge_runtime/model/sampling.py Sampler:
//   1. repetition penalty (HF): for tokens in the history, positive logits divided by it, others multiplied
//   2. temperature 0 (or any value that is not > 0): greedy, argmax with ties to the lowest index (numpy)
//   3. top-k (0 = off): logits below the k-th largest are dropped (ties with it kept)
//   4. softmax with the maximum subtracted BEFORE dividing by the temperature: e = exp((l - max) / T), e = 1 at
//      the maximum, so any positive T is safe (a tiny T gives e = 0 elsewhere: no inf - inf, no NaN)
//   5. top-p (1 = off): the smallest set of the most probable tokens whose mass reaches top_p, ties at the
//      boundary taken in index order (the numpy sampler's stable sort), the first token always kept
//   6. draw: the first index whose cumulative kept mass exceeds u * total (numpy Generator.choice's rule)
//      u from a counter-based RNG: splitmix64(seed ^ splitmix64(counter)) >> 40, times 2^-24; counter = step[STEP_RNG]
// Arguments:
//   logits (V,) fp32; params (4,) fp32 {temperature, top_p, repetition_penalty, unused};
//   iparams (4,) int32 {top_k, seed low 32 bits, seed high 32 bits, unused}: device memory, so that a request's
//   settings are written between replays without recapture;
//   seen (V,) uint8: 1 for history tokens (the host marks the prompt; the kernel marks every sampled token);
//   uniform (1,) fp32 | NULL: a given draw instead of the RNG (tests); work (V,) fp32 scratch;
//   step (STEP_SIZE,) int32: writes STEP_TOKEN = id, STEP_RNG += 1; ids (max_ctx,) int32: ids[n] = id, n the draw's
//   counter (step[STEP_RNG] before the draw): the request's sampled ids in order.
// A logit that is NaN or infinite (a model whose weights are not finite) gives id NO_TOKEN = -1 and nothing
// marked in seen: the host stops the generation (edge_runtime/model/sampling.py NO_TOKEN).
// One block of blockDim.x threads (a multiple of 32, at most 1024).
#include "common.cuh"

union FloatBits {
    float f;
    uint32_t u;
};

__device__ __forceinline__ uint32_t f2u(float f) {
    FloatBits b;
    b.f = f;
    return b.u;
}

__device__ __forceinline__ float u2f(uint32_t u) {
    FloatBits b;
    b.u = u;
    return b.f;
}

// float -> uint32 with the same order (negative values reversed below the positive ones)
__device__ __forceinline__ uint32_t order_key(float f) {
    const uint32_t b = f2u(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_value(uint32_t k) { return u2f((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k); }

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Exclusive prefix sum over the block of one value per thread (thread order); *total gets the block's sum.
// scratch: __shared__ T[32]. Every thread must call.
template <typename T>
__device__ T block_scan(T v, T* scratch, T* total) {
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, nw = blockDim.x / WARP;
    const T incl = warp_scan(v, lane);
    __syncthreads();
    if (lane == WARP - 1) scratch[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        const T s = warp_scan(lane < nw ? scratch[lane] : T(0), lane);
        if (lane < nw) scratch[lane] = s;
    }
    __syncthreads();
    *total = scratch[nw - 1];
    return incl - v + (warp > 0 ? scratch[warp - 1] : T(0));
}

// One block of up to 1024 threads (the launcher's default). No __launch_bounds__: with one, ptxas for sm_90
// spills (it uses 40 registers without, well inside the 64 a 1024-thread block may have).
extern "C" __global__ void sample(const float* __restrict__ logits, int V, const float* __restrict__ params,
                                  const int* __restrict__ iparams, uint8_t* __restrict__ seen,
                                  const float* __restrict__ uniform, float* __restrict__ work, int* __restrict__ step,
                                  int* __restrict__ ids, int max_ctx) {
    __shared__ float redf[32];
    __shared__ int redi[32];
    __shared__ unsigned int hist_n[256];
    __shared__ float hist_m[256];
    __shared__ unsigned int sel_u[2];
    __shared__ float sel_f[1];
    __shared__ int found;
    const int tid = threadIdx.x, nt = blockDim.x, lane = tid % WARP, warp = tid / WARP, nw = nt / WARP;
    const float T = params[0], top_p = params[1], rp = params[2];
    const int top_k = iparams[0];

    // 1. penalised logits into work; argmax (ties: lowest index)
    float best = -INFINITY;
    int besti = V, nonfinite = 0;
    for (int i = tid; i < V; i += nt) {
        float l = logits[i];
        nonfinite |= !isfinite(l);
        if (rp != 1.f && seen[i]) l = l > 0.f ? l / rp : l * rp;
        work[i] = l;
        if (besti == V || l > best) best = l, besti = i;
    }
    if (__syncthreads_or(nonfinite)) {  // block-uniform
        if (tid == 0) {
            const uint32_t n = (uint32_t)step[STEP_RNG];
            step[STEP_TOKEN] = -1;
            if (n < (uint32_t)max_ctx) ids[n] = -1;
            step[STEP_RNG] = (int)(n + 1u);
        }
        return;
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(FULL_MASK, best, o);
        const int oi = __shfl_xor_sync(FULL_MASK, besti, o);
        if (oi < V && (besti == V || ob > best || (ob == best && oi < besti))) best = ob, besti = oi;
    }
    if (lane == 0) redf[warp] = best, redi[warp] = besti;
    __syncthreads();
    best = redf[0];
    besti = redi[0];
    for (int w = 1; w < nw; ++w)
        if (redi[w] < V && (besti == V || redf[w] > best || (redf[w] == best && redi[w] < besti)))
            best = redf[w], besti = redi[w];
    int id = besti;

    if (T > 0.f) {
        // 3. top-k: radix select of the k-th largest key, 8 bits a pass
        if (top_k > 0 && top_k < V) {
            uint32_t prefix = 0, pmask = 0;
            int remaining = top_k;
            for (int shift = 24; shift >= 0; shift -= 8) {
                __syncthreads();
                for (int b = tid; b < 256; b += nt) hist_n[b] = 0;
                __syncthreads();
                for (int i = tid; i < V; i += nt) {
                    const uint32_t key = order_key(work[i]);
                    if ((key & pmask) == prefix) atomicAdd(&hist_n[(key >> shift) & 255u], 1u);
                }
                __syncthreads();
                if (tid == 0) {
                    int r = remaining, b = 255;
                    for (; b > 0 && (int)hist_n[b] < r; --b) r -= hist_n[b];
                    sel_u[0] = b;
                    sel_u[1] = r;
                }
                __syncthreads();
                prefix |= sel_u[0] << shift;
                pmask |= 255u << shift;
                remaining = sel_u[1];
            }
            const float kth = key_value(prefix);
            for (int i = tid; i < V; i += nt)
                if (work[i] < kth) work[i] = -INFINITY;
        }
        // 4. e = exp((l - max) / T) without ever dividing an unbounded value
        float s = 0.f;
        for (int i = tid; i < V; i += nt) {
            const float d = work[i] - best;
            const float e = d == 0.f ? 1.f : (d == -INFINITY ? 0.f : expf(d / T));
            work[i] = e;
            s += e;
        }
        s = block_sum(s, redf);
        // 5. top-p: tau = the largest e with mass(e >= tau) >= top_p * s, by radix over the bits of e >= 0
        if (top_p < 1.f) {
            const float target = top_p * s;
            uint32_t prefix = 0, pmask = 0;
            float above = 0.f;  // mass of e above the current prefix range
            for (int shift = 24; shift >= 0; shift -= 8) {
                __syncthreads();
                for (int b = tid; b < 256; b += nt) hist_n[b] = 0, hist_m[b] = 0.f;
                __syncthreads();
                for (int i = tid; i < V; i += nt) {
                    const float e = work[i];
                    const uint32_t key = f2u(e);
                    if ((key & pmask) == prefix) {
                        atomicAdd(&hist_m[(key >> shift) & 255u], e);
                        atomicAdd(&hist_n[(key >> shift) & 255u], 1u);
                    }
                }
                __syncthreads();
                if (tid == 0) {
                    float a = above;
                    int b = 255;
                    for (; b > 0 && !(a + hist_m[b] >= target); --b) a += hist_m[b];
                    sel_u[0] = b;
                    sel_u[1] = hist_n[b];
                    sel_f[0] = a;
                }
                __syncthreads();
                prefix |= sel_u[0] << shift;
                pmask |= 255u << shift;
                above = sel_f[0];
            }
            const float tau = u2f(prefix);
            const int n_tie = (int)sel_u[1];
            int keep_ties = n_tie;  // ties at tau kept, in index order, until the mass reaches the target
            if (tau > 0.f) keep_ties = max(1, min(n_tie, (int)ceilf((target - above) / tau)));
            int carry = 0;
            for (int base = 0; base < V; base += nt) {
                const int i = base + tid;
                const float e = i < V ? work[i] : 0.f;
                const int tie = (i < V && e == tau) ? 1 : 0;
                int chunk_ties;
                const int rank = carry + block_scan<int>(tie, redi, &chunk_ties);
                if (i < V && (e < tau || (tie && rank >= keep_ties))) work[i] = 0.f;
                carry += chunk_ties;
            }
            __syncthreads();
        }
        // 6. draw: first index whose cumulative kept mass exceeds u * total
        float total = 0.f;
        for (int i = tid; i < V; i += nt) total += work[i];
        total = block_sum(total, redf);
        float u;
        if (uniform) {
            u = uniform[0];
        } else {
            const unsigned long long seed = (unsigned long long)(uint32_t)iparams[1] |
                                            ((unsigned long long)(uint32_t)iparams[2] << 32);
            const unsigned long long z = splitmix64(seed ^ splitmix64((unsigned long long)(uint32_t)step[STEP_RNG]));
            u = (float)(z >> 40) * (1.f / 16777216.f);
        }
        const float r = u * total;
        if (tid == 0) found = V;
        int last = -1;  // the last index with mass, if rounding leaves r at or past the total
        float carry = 0.f;
        for (int base = 0; base < V; base += nt) {
            const int i = base + tid;
            const float e = i < V ? work[i] : 0.f;
            float chunk_mass;
            const float incl = carry + block_scan<float>(e, redf, &chunk_mass) + e;
            if (e > 0.f) {
                last = i;
                if (incl > r) atomicMin(&found, i);
            }
            carry += chunk_mass;
            __syncthreads();
            if (found < V) break;  // uniform: every thread reads the same shared value
        }
        for (int o = 16; o > 0; o >>= 1) last = max(last, __shfl_xor_sync(FULL_MASK, last, o));
        __syncthreads();
        if (lane == 0) redi[warp] = last;
        __syncthreads();
        if (found < V) {
            id = found;
        } else {
            id = redi[0];
            for (int w = 1; w < nw; ++w) id = max(id, redi[w]);
        }
    }
    // 7. the sampled id and the draw counter
    if (tid == 0) {
        const uint32_t n = (uint32_t)step[STEP_RNG];
        step[STEP_TOKEN] = id;
        if (n < (uint32_t)max_ctx) ids[n] = id;
        step[STEP_RNG] = (int)(n + 1u);
        if (id >= 0 && id < V) seen[id] = 1;
    }
}

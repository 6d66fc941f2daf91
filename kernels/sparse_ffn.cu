// Sparse FFN decode (one token): three launches, no host synchronisation (graph-capturable).
//   ffn_prepare       norm(x) -> xn once, its sign words and sum for the predictors; zero this step's counters;
//                     y = residual + down bias (the down accumulation then adds into it: residual add fused)
//   ffn_gate_<P>_<E>  predictor + gate GEMV + (gated models) up GEMV, fused: a predicted row's gate is computed,
//                     dropped when it does not survive the activation (g > 0 and g >= FATReLU threshold), else
//                     h = g * (up . x + up bias) (or h = g without an up projection, OPT) and (row, h) appended to
//                     the active list (dReLU, up_relu: only when up . x + up bias > 0, the others counted as
//                     up-dropped); P = sparseinfer | projection, E = fp16 | int8 | int4 | csr_fp16 | csr_int8
//   ffn_down_<E>      y += sum over the active list of h * W_down^T[row] (dense encodings; compressed rows:
//                     kernels/sparse_weights.cu csr_down_*), and the step's counts added into per-layer statistics
// Numpy twin: edge_runtime/backends/cpu.py CpuBackend.ffn_sparse (semantics of the predictors:
// edge_runtime/sparsity/predictor.py).
#include "column_gemv.cuh"

#define PRED_SPARSEINFER 0
#define PRED_PROJECTION 1

// One block (blockDim.x a multiple of 32).
//   x (K,) fp32 the FFN input before its norm; norm_w (K,) fp32 | NULL (no norm), norm_b (K,) | NULL (RMSNorm);
//   residual (K,) | NULL (0), down_b (K,) | NULL; y may alias residual or x (each element read before written).
// Out: xn (K,) fp32; x_signs (ceil(K/32),) uint32 (bit j of word c: xn[32c+j] < 0); x_sum (1,) fp32 = sum(xn);
//   counters (2,) int32 = {kept, predicted} zeroed; y (K,) = residual + down_b.
// __launch_bounds__(1024): launched as one block of up to 1024 threads.
extern "C" __global__ void __launch_bounds__(1024)
    ffn_prepare(const float* x, const float* norm_w, const float* norm_b, float eps, int K, const float* residual,
                const float* down_b, float* xn, uint32_t* x_signs, float* x_sum, int* counters, float* y) {
    __shared__ float red[32];
    const int lane = threadIdx.x % WARP;
    float mu = 0.f, inv = 1.f;
    if (norm_w) norm_stats(x, norm_b != nullptr, eps, K, red, &mu, &inv);
    float s = 0.f;
    for (int base = (threadIdx.x / WARP) * WARP; base < K; base += blockDim.x) {  // whole warps: the ballot is uniform
        const int i = base + lane;
        float v = 0.f;
        if (i < K) {
            v = norm_apply(x[i], i, norm_w, norm_b, mu, inv);
            xn[i] = v;
            y[i] = (residual ? residual[i] : 0.f) + (down_b ? down_b[i] : 0.f);
        }
        s += v;
        const uint32_t word = __ballot_sync(FULL_MASK, v < 0.f);
        if (lane == 0) x_signs[base / WARP] = word;
    }
    s = block_sum(s, red);
    if (threadIdx.x == 0) {
        *x_sum = s;
        counters[0] = 0;
        counters[1] = 0;
    }
}

// Grid-stride over gate rows, one warp per row, x loaded into shared memory once per block (the launcher caps the
// grid at a few blocks per SM, so a block serves many rows instead of reloading x for every 8).
//   gate/up: (N, K) in encoding ENC (same encoding and group for both; up_w NULL: no up projection);
//   gate_b, up_b (N,) fp32 | NULL; xn (K,) fp32; x_signs (ceil(K/32),) uint32; x_sum (1,) fp32;
//   gate_signs (N, ceil(K/32)) uint32; knob: SparseInfer alpha (1,) fp32 (row predicted zero when
//   n_neg > alpha * (K - n_neg)) | projection theta (N,) fp32 (row predicted active when z >= theta[row]), read from
//   device memory every launch; threshold: FATReLU threshold (0 = ReLU), a model constant; up_relu: 1 for dReLU
//   (relu on up too), else 0; up_dropped (1,) uint64 | NULL: this layer's count of rows dropped for up <= 0;
//   use_lut (projection): 1 scores rows through the nibble table (projection_lut), 0 by walking the set bits.
// Dynamic shared memory: xs 4 * Kp bytes, then with use_lut the table, 16 * 8 * ceil(K/32) floats, then for
// compressed rows a stage per warp (csr_stage).
// Out: idx (N,) int32 and h (N,) fp32, the first counters[0] entries (in arbitrary order); counters (2,) int32
//   {kept, predicted}, zeroed by ffn_prepare; up_dropped += this step's up-dropped rows.
// The projection predictor's table: for every 4-input slice of x (nibble j of sign word c, inputs 32c + 4j ..
// + 3) and every 4-bit pattern v, the sum of the slice's inputs whose bit in v is set; a row's sum over its negative
// weights is then 8 lookups per sign word instead of a walk over ~16 set bits. Layout lut[v * P + j * W + c],
// P = 8W: lane c of a warp scoring a row reads entry (v, j * W + c), bank (v * P + j * W + c) % 32 = c % 32 when W
// % 32 == 0 (K % 1024 == 0): no conflicts, whatever the patterns. x from xs (load_x<ENC>'s layout), 0 past K.
// Whole block; ends with __syncthreads.
template <int ENC>
__device__ void projection_lut(const float* xs, int K, int Kp, int W, float* lut) {
    const int P = 8 * W;
    for (int pos = threadIdx.x; pos < P; pos += blockDim.x) {
        const int c = pos % W, i0 = 32 * c + 4 * (pos / W);
        float v[4];
#pragma unroll
        for (int b = 0; b < 4; ++b) v[b] = i0 + b < K ? xs[xs_index<ENC>(i0 + b, Kp)] : 0.f;
        float e[16];
        e[0] = 0.f;
#pragma unroll
        for (int m = 1; m < 16; ++m) e[m] = e[m & (m - 1)] + v[(m & 1) ? 0 : (m & 2) ? 1 : (m & 4) ? 2 : 3];
#pragma unroll
        for (int m = 0; m < 16; ++m) lut[m * P + pos] = e[m];
    }
    __syncthreads();
}

template <int ENC, int PRED>
__device__ void ffn_gate(const void* __restrict__ gate_w, const __half* __restrict__ gate_scale,
                         const float* __restrict__ gate_b, const uint8_t* __restrict__ gate_bitmap,
                         const long long* __restrict__ gate_offsets, const void* __restrict__ up_w,
                         const __half* __restrict__ up_scale, const float* __restrict__ up_b,
                         const uint8_t* __restrict__ up_bitmap, const long long* __restrict__ up_offsets, int group,
                         int N, int K, int Kp, const float* __restrict__ xn, const uint32_t* __restrict__ x_signs,
                         const float* __restrict__ x_sum, const uint32_t* __restrict__ gate_signs,
                         const float* __restrict__ knob, float threshold, int up_relu,
                         unsigned long long* __restrict__ up_dropped, int use_lut, int* __restrict__ idx,
                         float* __restrict__ h, int* __restrict__ counters) {
    extern __shared__ float xs[];
    const int lane = threadIdx.x % WARP, wpb = blockDim.x / WARP;
    const int W = (K + WARP - 1) / WARP;
    const int first = blockIdx.x * wpb + threadIdx.x / WARP;
    if (first < N) prefetch_span(gate_signs + (size_t)first * W, 4 * (size_t)W, lane);  // read first, after x
    load_x<ENC>(xn, nullptr, nullptr, 0.f, K, Kp, xs);
    float* lut = xs + Kp;
    if (PRED == PRED_PROJECTION && use_lut) projection_lut<ENC>(xs, K, Kp, W, lut);
    void* stage = csr_stage<ENC>(lut + (PRED == PRED_PROJECTION && use_lut ? 16 * 8 * W : 0), threadIdx.x / WARP);
    const float alpha = PRED == PRED_SPARSEINFER ? *knob : 0.f;
    const float sum = PRED == PRED_PROJECTION ? *x_sum : 0.f;
    int n_pred = 0, n_up_dropped = 0;
    for (int row = first; row < N; row += gridDim.x * wpb) {
        const uint32_t* srow = gate_signs + (size_t)row * W;
        bool active;
        if (PRED == PRED_SPARSEINFER) {
            int n_neg = 0;
            for (int c = lane; c < W; c += WARP) n_neg += __popc(x_signs[c] ^ __ldg(srow + c));
            n_neg = warp_sum_int(n_neg);
            active = !((float)n_neg > alpha * (float)(K - n_neg));
        } else {  // z = sum(x) - 2 * sum of x_i where w_ri < 0
            float neg = 0.f;
            if (use_lut) {
                for (int c = lane; c < W; c += WARP) {
                    const uint32_t bits = __ldg(srow + c);
                    const float* t = lut + c;
#pragma unroll
                    for (int j = 0; j < 8; ++j) neg += t[((bits >> (4 * j)) & 15u) * (8 * W) + j * W];
                }
            } else {  // the table does not fit in shared memory
                for (int c = lane; c < W; c += WARP) {
                    uint32_t bits = __ldg(srow + c);
                    // bits past K: zero in a valid pack (validate.py), and never an index past xs
                    if (c == W - 1 && (K & (WARP - 1))) bits &= (1u << (K & (WARP - 1))) - 1u;
                    while (bits) {
                        neg += xs[xs_index<ENC>(c * WARP + __ffs(bits) - 1, Kp)];
                        bits &= bits - 1;
                    }
                }
            }
            active = sum - 2.f * warp_sum(neg) >= __ldg(knob + row);
        }
        if (!active) continue;  // warp-uniform: the row's weights are never read
        ++n_pred;
        float g = row_dot<ENC>(gate_w, gate_scale, group, gate_bitmap, gate_offsets, row, Kp, xs, lane, stage);
        if (gate_b) g += gate_b[row];
        if (!(g > 0.f && g >= threshold)) continue;
        float hv = g;
        if (up_w) {
            float u = row_dot<ENC>(up_w, up_scale, group, up_bitmap, up_offsets, row, Kp, xs, lane, stage);
            if (up_b) u += up_b[row];
            if (up_relu && !(u > 0.f)) {  // dReLU: relu(u) = 0, an exact zero; down never reads the row
                ++n_up_dropped;
                continue;
            }
            hv = g * u;
        }
        if (lane == 0) {
            const int at = atomicAdd(counters, 1);
            idx[at] = row;
            h[at] = hv;
        }
    }
    if (lane == 0 && n_pred) atomicAdd(counters + 1, n_pred);
    if (lane == 0 && n_up_dropped && up_dropped) atomicAdd(up_dropped, (unsigned long long)n_up_dropped);
}

// y (D,) += sum_{pos < counters[0]} h[pos] * Wt[idx[pos], :], Wt (N, D) = W_down^T packed in ENC (int4: rows of Dp).
// Grid (column tiles of COL_TILE, list splits), COL_THREADS threads (column_gemv.cuh): a block's warps share its
// split of the active list, COL_UNROLL rows in flight per lane, one atomicAdd per column per block. y was
// initialised by ffn_prepare (residual + down bias). Block (0, 0) thread 0 adds this step's {predicted, kept} into
// stats[layer] (n_layers, 2) uint64.
template <int ENC>
__device__ void ffn_down(const void* __restrict__ wt, const __half* __restrict__ scale, int group, int D, int Dp,
                         const int* __restrict__ idx, const float* __restrict__ h, const int* __restrict__ counters,
                         unsigned long long* __restrict__ stats, int layer, float* __restrict__ y) {
    __shared__ float red[COL_WARPS * COL_TILE];
    const int n = counters[0];
    if (blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) {
        stats[2 * layer] += (unsigned long long)counters[1];
        stats[2 * layer + 1] += (unsigned long long)n;
    }
    const int per = (n + gridDim.y - 1) / gridDim.y;
    const int begin = blockIdx.y * per, end = min(n, begin + per);
    if (begin >= end) return;  // block-uniform
    const int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP;
    const int tile = blockIdx.x * COL_TILE;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    accumulate_rows<ENC>(wt, scale, group, Dp, D, tile + 8 * lane, idx, h, begin + warp, end, COL_WARPS, acc);
    flush_columns(acc, red, tile, D, nullptr, nullptr, y);
}

#define GATE_ARGS                                                                                                     \
    const void *gate_w, const __half *gate_scale, const float *gate_b, const uint8_t *gate_bitmap,                    \
        const long long *gate_offsets, const void *up_w, const __half *up_scale, const float *up_b,                   \
        const uint8_t *up_bitmap, const long long *up_offsets, int group, int N, int K, int Kp, const float *xn,       \
        const uint32_t *x_signs, const float *x_sum, const uint32_t *gate_signs, const float *knob, float threshold,  \
        int up_relu, unsigned long long *up_dropped, int use_lut, int *idx, float *h, int *counters
#define GATE_CALL                                                                                                     \
    gate_w, gate_scale, gate_b, gate_bitmap, gate_offsets, up_w, up_scale, up_b, up_bitmap, up_offsets, group, N, K, \
        Kp, xn, x_signs, x_sum, gate_signs, knob, threshold, up_relu, up_dropped, use_lut, idx, h, counters

#define GATE_KERNEL extern "C" __global__ void __launch_bounds__(ROW_THREADS, ROW_BLOCKS_PER_SM)
#define INSTANTIATE_GATE(SUFFIX, ENC)                                                                                  \
    GATE_KERNEL ffn_gate_sparseinfer_##SUFFIX(GATE_ARGS) { ffn_gate<ENC, PRED_SPARSEINFER>(GATE_CALL); }               \
    GATE_KERNEL ffn_gate_projection_##SUFFIX(GATE_ARGS) { ffn_gate<ENC, PRED_PROJECTION>(GATE_CALL); }

#define INSTANTIATE_DOWN(SUFFIX, ENC)                                                                                 \
    extern "C" __global__ void __launch_bounds__(COL_THREADS)                                                         \
        ffn_down_##SUFFIX(const void* wt, const __half* scale, int group, int D, int Dp, const int* idx,              \
                          const float* h, const int* counters, unsigned long long* stats, int layer, float* y) {      \
        ffn_down<ENC>(wt, scale, group, D, Dp, idx, h, counters, stats, layer, y);                                    \
    }

INSTANTIATE_GATE(fp32, ENC_FP32)
INSTANTIATE_GATE(fp16, ENC_FP16)
INSTANTIATE_GATE(int8, ENC_INT8)
INSTANTIATE_GATE(int4, ENC_INT4)
INSTANTIATE_GATE(csr_fp16, ENC_CSR_FP16)
INSTANTIATE_GATE(csr_int8, ENC_CSR_INT8)
INSTANTIATE_DOWN(fp32, ENC_FP32)
INSTANTIATE_DOWN(fp16, ENC_FP16)
INSTANTIATE_DOWN(int8, ENC_INT8)
INSTANTIATE_DOWN(int4, ENC_INT4)

// Compressed weight-sparse rows (issue 8; edge_runtime/pack/sparse_weights.py), read as stored, never densified:
//   bitmap (N, ceil(D/8)) uint8, bit j of byte c = column 8c+j kept; values (nnz,) half | int8 in row order;
//   row_offsets (N+1,) int64; scale (N,) half for int8 (value = q * scale[row]).
// Row dots over compressed rows (GEMV, the sparse FFN's gate and up) are the ENC_CSR_* instances of row_dot in
// kernels/gemv.cu and kernels/sparse_ffn.cu; this file holds the accumulation over compressed rows, the down
// projection of the sparse FFN over W_down^T. Numpy twin: PackedTensor.rows_weighted_sum.
#include "common.cuh"

// y (D,) += sum_{pos < counters[0]} h[pos] * Wt[idx[pos], :]. One warp per active entry (grid-stride), lanes over
// the row's bitmap bytes, one atomicAdd per kept weight. y initialised by ffn_prepare (residual + down bias).
// Block 0 thread 0 adds this step's {predicted, kept} = counters[1], counters[0] into stats[layer] (n_layers, 2).
template <int ENC>
__device__ void csr_down(const void* __restrict__ values, const __half* __restrict__ scale,
                         const uint8_t* __restrict__ bitmap, const long long* __restrict__ row_offsets, int D,
                         const int* __restrict__ idx, const float* __restrict__ h, const int* __restrict__ counters,
                         unsigned long long* __restrict__ stats, int layer, float* __restrict__ y) {
    const int n = counters[0];
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        stats[2 * layer] += (unsigned long long)counters[1];
        stats[2 * layer + 1] += (unsigned long long)n;
    }
    const int lane = threadIdx.x % WARP, wpb = blockDim.x / WARP;
    const int KB = (D + 7) / 8;
    for (int pos = blockIdx.x * wpb + threadIdx.x / WARP; pos < n; pos += gridDim.x * wpb) {
        const int row = idx[pos];
        const float hv = ENC == ENC_CSR_INT8 ? h[pos] * __half2float(scale[row]) : h[pos];
        const uint8_t* bm = bitmap + (size_t)row * KB;
        long long base = row_offsets[row];
        for (int c0 = 0; c0 < KB; c0 += WARP) {
            const int c = c0 + lane;
            uint32_t b = c < KB ? bm[c] : 0u;
            const int cnt = __popc(b);
            int incl = cnt;
            for (int o = 1; o < WARP; o <<= 1) {
                const int t = __shfl_up_sync(FULL_MASK, incl, o);
                if (lane >= o) incl += t;
            }
            long long at = base + incl - cnt;
            while (b) {
                const int j = __ffs(b) - 1;
                const float v = ENC == ENC_CSR_FP16 ? __half2float(static_cast<const __half*>(values)[at])
                                                    : float(static_cast<const int8_t*>(values)[at]);
                atomicAdd(y + 8 * c + j, hv * v);
                ++at;
                b &= b - 1;
            }
            base += __shfl_sync(FULL_MASK, incl, WARP - 1);
        }
    }
}

#define INSTANTIATE(SUFFIX, ENC)                                                                                      \
    extern "C" __global__ void csr_down_##SUFFIX(const void* values, const __half* scale, const uint8_t* bitmap,      \
                                                 const long long* row_offsets, int D, const int* idx, const float* h, \
                                                 const int* counters, unsigned long long* stats, int layer,            \
                                                 float* y) {                                                           \
        csr_down<ENC>(values, scale, bitmap, row_offsets, D, idx, h, counters, stats, layer, y);                      \
    }

INSTANTIATE(fp16, ENC_CSR_FP16)
INSTANTIATE(int8, ENC_CSR_INT8)

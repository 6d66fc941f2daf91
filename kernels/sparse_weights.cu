// Compressed weight-sparse rows (issue 8; edge_runtime/pack/sparse_weights.py), read as stored, never densified:
//   bitmap (N, ceil(D/8)) uint8, bit j of byte c = column 8c+j kept; values (nnz,) half | int8 in row order;
//   row_offsets (N+1,) int64; scale (N,) half for int8 (value = q * scale[row]);
//   tile_offsets (N, ceil(D/COL_TILE)) int32: the row's kept values before each tile of COL_TILE columns (derived
//   at upload, DeviceMatrix), so a block on one tile finds its values without counting the bits before it.
// Row dots over compressed rows (GEMV, the sparse FFN's gate and up) are the ENC_CSR_* instances of row_dot in
// kernels/gemv.cu and kernels/sparse_ffn.cu; this file holds the accumulation over compressed rows, the down
// projection of the sparse FFN over W_down^T. Numpy twin: PackedTensor.rows_weighted_sum.
#include "column_gemv.cuh"

#define CSR_DOWN_UNROLL 4

// y (D,) += sum_{pos < counters[0]} h[pos] * Wt[idx[pos], :] as column_gemv.cuh's blocks do it: grid (tiles of
// COL_TILE columns, splits of the list), lane l of every warp owns bitmap byte (tile / 8 + l), warp w takes rows
// w, w + COL_WARPS, ... of its split, CSR_DOWN_UNROLL of them with their bitmap bytes and offsets loaded before
// any value is; the warps' sums meet in shared memory, one atomicAdd per column per block (a per-weight atomicAdd
// was ~2 M a layer a token at 7B shapes). y initialised by ffn_prepare (residual + down bias).
// Block (0, 0) thread 0 adds this step's {predicted, kept} = counters[1], counters[0] into stats[layer] (n_layers, 2).
template <int ENC>
__device__ void csr_down(const void* __restrict__ values, const __half* __restrict__ scale,
                         const uint8_t* __restrict__ bitmap, const long long* __restrict__ row_offsets,
                         const int* __restrict__ tile_offsets, int D, const int* __restrict__ idx,
                         const float* __restrict__ h, const int* __restrict__ counters,
                         unsigned long long* __restrict__ stats, int layer, float* __restrict__ y) {
    typedef typename CsrValue<ENC>::T T;
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
    const int KB = (D + 7) / 8, tiles = gridDim.x;
    const int c = blockIdx.x * WARP + lane;  // this lane's bitmap byte of every row
    const T* __restrict__ vals = static_cast<const T*>(values);
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int i = begin + warp; i < end; i += CSR_DOWN_UNROLL * COL_WARPS) {  // warp-uniform bounds
        uint32_t b[CSR_DOWN_UNROLL];
        long long base[CSR_DOWN_UNROLL];
        float hv[CSR_DOWN_UNROLL];
#pragma unroll
        for (int u = 0; u < CSR_DOWN_UNROLL; ++u) {
            const int pos = i + u * COL_WARPS;
            b[u] = 0u;
            base[u] = 0;
            hv[u] = 0.f;
            if (pos < end) {
                const int row = idx[pos];
                hv[u] = ENC == ENC_CSR_INT8 ? h[pos] * __half2float(scale[row]) : h[pos];
                base[u] = row_offsets[row] + tile_offsets[(size_t)row * tiles + blockIdx.x];
                b[u] = c < KB ? __ldg(bitmap + (size_t)row * KB + c) : 0u;
            }
        }
        long long first[CSR_DOWN_UNROLL];  // a lane's first value: its byte's place among the warp's 32
#pragma unroll
        for (int u = 0; u < CSR_DOWN_UNROLL; ++u) {
            const int kept = __popc(b[u]);
            first[u] = base[u] + (warp_scan(kept, lane) - kept);
        }
        float w[CSR_DOWN_UNROLL][8];  // every row's kept weights loaded (predicated by bit) before any is used
#pragma unroll
        for (int u = 0; u < CSR_DOWN_UNROLL; ++u)
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                w[u][j] = 0.f;
                if (b[u] >> j & 1u) w[u][j] = csr_value(__ldg(vals + first[u] + __popc(b[u] & ((1u << j) - 1u))));
            }
#pragma unroll
        for (int u = 0; u < CSR_DOWN_UNROLL; ++u)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] += hv[u] * w[u][j];
    }
    flush_columns(acc, red, blockIdx.x * COL_TILE, D, nullptr, nullptr, y);
}

#define INSTANTIATE(SUFFIX, ENC)                                                                                      \
    extern "C" __global__ void __launch_bounds__(COL_THREADS, ROW_BLOCKS_PER_SM)                                      \
        csr_down_##SUFFIX(const void* values, const __half* scale, const uint8_t* bitmap,                            \
                          const long long* row_offsets, const int* tile_offsets, int D, const int* idx,               \
                          const float* h, const int* counters, unsigned long long* stats, int layer, float* y) {      \
        csr_down<ENC>(values, scale, bitmap, row_offsets, tile_offsets, D, idx, h, counters, stats, layer, y);        \
    }

INSTANTIATE(fp16, ENC_CSR_FP16)
INSTANTIATE(int8, ENC_CSR_INT8)

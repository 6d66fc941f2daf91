// Rotary embedding in place, Hugging Face rotate_half convention: for head h and i < hd/2,
//   x1 = x[h, i], x2 = x[h, i + hd/2] -> (x1 c - x2 s, x2 c + x1 s), c, s = cos/sin[pos, i].
// Scaling (linear, llama3) lives in the tables (edge_runtime/model/rope.py rope_tables). Numpy twin: CpuBackend.rope.
//   x (n_heads, hd) fp32, rotated in place; cos, sin (n_pos, hd/2) fp32; step: the position is step[STEP_POS]
//   (a position outside the table leaves x untouched). Grid (n_heads,), any block size.
#include "common.cuh"

extern "C" __global__ void rope(float* x, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                                const int* __restrict__ step, int n_pos, int hd) {
    const int pos = step[STEP_POS], half = hd / 2;
    if (pos < 0 || pos >= n_pos) return;
    float* xh = x + (size_t)blockIdx.x * hd;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        const float c = cos_t[(size_t)pos * half + i], s = sin_t[(size_t)pos * half + i];
        const float x1 = xh[i], x2 = xh[i + half];
        xh[i] = x1 * c - x2 * s;
        xh[i + half] = x2 * c + x1 * s;
    }
}

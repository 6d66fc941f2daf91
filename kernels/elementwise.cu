// Elementwise ops of the decode step. Numpy twins: the residual adds of the decoder, CpuBackend._activate.
//   add_f32:  x (n,) += y (n,)                                             grid (ceil(n / blockDim.x),)
//   act_mul:  h (n,) = act(g) * u, u (n,) | NULL (no up projection); act by kind: 0 SiLU g / (1 + e^-g),
//             1 ReLU max(g, 0), 2 FATReLU g if g >= threshold else 0. h may alias g or u.
//   advance_pos: step[STEP_POS] += 1, the last op of a decode step                 grid (1,), block (1,)
#include "common.cuh"

#define ACT_SILU 0
#define ACT_RELU 1
#define ACT_FATRELU 2

extern "C" __global__ void advance_pos(int* step) {
    if (threadIdx.x == 0 && blockIdx.x == 0) step[STEP_POS] += 1;
}

extern "C" __global__ void add_f32(float* x, const float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

extern "C" __global__ void act_mul(const float* g, const float* u, int n, int kind, float threshold, float* h) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = g[i];
    float a;
    if (kind == ACT_SILU) a = v / (1.f + expf(-v));
    else if (kind == ACT_RELU) a = fmaxf(v, 0.f);
    else a = v >= threshold ? v : 0.f;
    h[i] = u ? a * u[i] : a;
}

// Elementwise ops of the decode step. Numpy twins: the residual adds of the decoder, CpuBackend._activate.
//   add_f32:  x (n,) += y (n,)                                             grid (ceil(n / blockDim.x),)
//   act_mul:  h (n,) = act(g) * u, u (n,) | NULL (no up projection); act by kind: 0 SiLU g / (1 + e^-g),
//             1 ReLU max(g, 0), 2 FATReLU g if g >= threshold else 0, 3 tanh GELU (HF gelu_pytorch_tanh),
//             4 dReLU max(g, 0) * max(u, 0). h may alias g or u.
//   softcap_f32: x (n,) = cap * tanh(x / cap) (Gemma-2's final logits)     grid (ceil(n / blockDim.x),)
//   advance_pos: step[STEP_POS] += 1, the last op of a decode step                 grid (1,), block (1,)
#include "common.cuh"

#define ACT_SILU 0
#define ACT_RELU 1
#define ACT_FATRELU 2
#define ACT_GELU_TANH 3
#define ACT_DRELU 4

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
    else if (kind == ACT_RELU || kind == ACT_DRELU) a = fmaxf(v, 0.f);
    else if (kind == ACT_GELU_TANH) a = 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    else a = v >= threshold ? v : 0.f;
    h[i] = u ? a * (kind == ACT_DRELU ? fmaxf(u[i], 0.f) : u[i]) : a;
}

extern "C" __global__ void softcap_f32(float* x, int n, float cap) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = cap * tanhf(x[i] / cap);
}

// Embedding lookup of the step's token (or position, for learned positional tables), dequantised to fp32.
// Numpy twin: CpuBackend.embed_tokens (PackedTensor.dequantize of one row).
//   w (N, K) in ENC (fp16 | int8 + scale | int4 + group scales, rows of Kp); step (STEP_SIZE,) int32: the row is
//   step[slot] + offset (slot STEP_TOKEN for tokens; STEP_POS with offset pos_offset for OPT's positions);
//   accumulate: 0 -> out = scale * row, 1 -> out += scale * row (scale: Gemma's embedding scale, else 1).
//   out (K,) fp32 (a row outside [0, N) writes NaN: visible, no stray read). Grid (ceil(K / blockDim.x),).
#include "common.cuh"

template <int ENC>
__device__ __forceinline__ float dequant(const void* __restrict__ w, const __half* __restrict__ scale, int group,
                                         int Kp, int row, int i) {
    if (ENC == ENC_FP32) return static_cast<const float*>(w)[(size_t)row * Kp + i];
    if (ENC == ENC_FP16) return __half2float(static_cast<const __half*>(w)[(size_t)row * Kp + i]);
    if (ENC == ENC_INT8) return float(static_cast<const int8_t*>(w)[(size_t)row * Kp + i]) * __half2float(scale[row]);
    const uint8_t b = static_cast<const uint8_t*>(w)[(size_t)row * (Kp / 2) + i / 2];
    const int nib = (i & 1) ? (b >> 4) : (b & 0xF);
    return float(nib - 8) * __half2float(scale[(size_t)row * (Kp / group) + i / group]);
}

template <int ENC>
__device__ void embed(const void* __restrict__ w, const __half* __restrict__ scale, int group, int N, int K, int Kp,
                      const int* __restrict__ step, int slot, int offset, int accumulate, float out_scale,
                      float* __restrict__ out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= K) return;
    const int row = step[slot] + offset;
    const float v = (row >= 0 && row < N) ? dequant<ENC>(w, scale, group, Kp, row, i) * out_scale : nanf("");
    out[i] = accumulate ? out[i] + v : v;
}

#define INSTANTIATE(SUFFIX, ENC)                                                                                    \
    extern "C" __global__ void embed_##SUFFIX(const void* w, const __half* scale, int group, int N, int K, int Kp,   \
                                              const int* step, int slot, int offset, int accumulate,               \
                                              float out_scale, float* out) {                                       \
        embed<ENC>(w, scale, group, N, K, Kp, step, slot, offset, accumulate, out_scale, out);                      \
    }

INSTANTIATE(fp32, ENC_FP32)
INSTANTIATE(fp16, ENC_FP16)
INSTANTIATE(int8, ENC_INT8)
INSTANTIATE(int4, ENC_INT4)

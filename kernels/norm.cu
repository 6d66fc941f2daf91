// RMSNorm and LayerNorm, one block per row. Numpy twin: CpuBackend.norm.
// (Decode fuses the norm into the next kernel's x load: gemv.cu, sparse_ffn.cu ffn_prepare. This kernel is for the
// places where a normalised vector is needed on its own.)
//   x (rows, K) fp32; w (K,) fp32; b (K,) fp32 | NULL (RMSNorm) else LayerNorm; y (rows, K) fp32, may alias x.
#include "common.cuh"

extern "C" __global__ void norm_f32(const float* x, const float* __restrict__ w, const float* __restrict__ b, float eps,
                                    int K, float* y) {
    __shared__ float red[32];
    const float* xr = x + (size_t)blockIdx.x * K;
    float* yr = y + (size_t)blockIdx.x * K;
    float mu, inv;
    norm_stats(xr, b != nullptr, eps, K, red, &mu, &inv);
    for (int i = threadIdx.x; i < K; i += blockDim.x) yr[i] = norm_apply(xr[i], i, w, b, mu, inv);
}

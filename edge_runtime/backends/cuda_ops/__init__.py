"""CUDA launchers, one module per kernels/<op>.cu, sharing common.py (module loading, argument checks,
DeviceMatrix, the step-buffer layout). What a graph-captured decode backend calls, in step order:

  common.DeviceMatrix(packed)       upload a PackedTensor as stored (fp16, int8, int4, sparse-fp16/int8)
  embed.EmbedKernel                 out = table[step[TOKEN]] (+ table[step[POS] + offset] with accumulate, OPT)
  gemv.Gemv                         y = W norm(x) + bias + residual (o, LM head, OPT's fc1, one projection at a
                                    time where TEAL thresholds are set); stacked: q, k, v (or a dense FFN's gate
                                    and up) of one normed x in one launch
  kv_cache.KVAppendKernel           k rotated into the cache and v appended at step[POS] (fp32 or fp16 cache)
  attention.DecodeAttention         split-K attention over [0, step[POS]], GQA, q rotated as it is loaded (owns
                                    its workspace)
  sparse_ffn.SparseFFNKernels       prepare (norm, signs, y = residual + down bias) -> gate (predictor + gate + up)
                                    -> down (+ per-layer statistics); sparse_ffn.SparseFFN: one layer's buffers
  teal.TealGemv                     y (+)= W mask(x) + bias over W^T, threshold in device memory
  elementwise.Elementwise           add (residual), act_mul (SiLU / ReLU / FATReLU times up)
  norm.NormKernel                   stand-alone RMSNorm / LayerNorm (where no launch can take the norm)
  sampling.SampleKernel             next token into step[TOKEN], step[POS] += 1, step[RNG] += 1
                                    (sampling.param_arrays, sampling.device_uniform: host side and RNG twin)

Per-token values live in device memory (the int32 step buffer, alpha / theta / TEAL thresholds, sampling
parameters), so one captured graph serves every step; launchers allocate nothing per call and write into the
caller's buffers.
"""

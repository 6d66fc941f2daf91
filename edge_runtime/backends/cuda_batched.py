"""Batched (prefill and evaluation) ops of the cuda backend: eager CuPy on device arrays, matrices through
cuBLAS (cupy.matmul). Same arithmetic as the cpu backend's batched ops; weights are dequantised on the
device from their stored encoding into a workspace reused by every matrix of one call."""

from __future__ import annotations

import numpy as np

from edge_runtime.backends.base import PREFILL_QUERY_ROWS
from edge_runtime.backends.cuda_ops.common import DeviceMatrix, cupy


def dense_f32(m: DeviceMatrix, host, rows=None):
    """(n, K) float32 on the device for rows (a device int array) or all rows: fp32 as is, fp16 widened, int8 times row
    scales, int4 nibbles times group scales (K padded to the group, cropped); compressed rows are expanded
    on the host (`host`, the PackedTensor) and uploaded."""
    cp = cupy()
    k = m.shape[1]
    if m.sparse:
        return cp.asarray(host.dequantize(None if rows is None else cp.asnumpy(rows)))
    w = m.w if rows is None else m.w[rows]
    if m.encoding in ("fp32", "fp16"):
        return w.astype(cp.float32)
    scale = (m.scale if rows is None else m.scale[rows]).astype(cp.float32)
    if m.encoding == "int8":
        return w.astype(cp.float32) * scale[:, None]
    n = w.shape[0]
    q = cp.empty((n, m.kp), dtype=cp.float32)  # int4: low nibble = even column, value = nibble - 8
    q[:, 0::2] = (w & 0x0F).astype(cp.float32) - 8.0
    q[:, 1::2] = (w >> 4).astype(cp.float32) - 8.0
    q = q.reshape(n, scale.shape[1], m.group) * scale[:, :, None]
    return q.reshape(n, m.kp)[:, :k]


def rms_or_layer_norm(x, w, b, eps: float):
    """(T, d) -> (T, d) float32; LayerNorm when b is given."""
    cp = cupy()
    if b is None:
        return x * (1.0 / cp.sqrt(cp.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))) * w
    xc = x - x.mean(axis=-1, keepdims=True)
    return xc * (1.0 / cp.sqrt(cp.mean(xc * xc, axis=-1, keepdims=True) + np.float32(eps))) * w + b


def rope(x, cos, sin, positions, n_heads: int, head_dim: int):
    """(T, n_heads * head_dim) rotated in place at positions (T,) int32; HF rotate_half convention."""
    t, half = x.shape[0], head_dim // 2
    xv = x.reshape(t, n_heads, head_dim)
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    x1 = xv[..., :half].copy()
    x2 = xv[..., half:].copy()
    xv[..., :half] = x1 * c - x2 * s
    xv[..., half:] = x2 * c + x1 * s
    return x


def causal_attention(q, k, v, k_cache, v_cache, pos0: int, n_heads: int, head_dim: int, scale: float,
                     softcap: float = 0.0, window: int = 0):
    """Write k, v (T, KV*hd) into one layer's caches (KV, ctx, hd) at pos0.., attend causally with GQA (query at p
    sees keys p - window < t <= p; window 0: all t <= p), scores scale q k^T bent to softcap * tanh(s / softcap)
    when softcap > 0; q (T, H*hd) -> (T, H*hd) float32. A block of PREFILL_QUERY_ROWS queries at a time, each
    against the keys up to its own positions."""
    cp = cupy()
    t, nkv = q.shape[0], k_cache.shape[0]
    end = pos0 + t
    k_cache[:, pos0:end] = k.reshape(t, nkv, head_dim).transpose(1, 0, 2).astype(k_cache.dtype)
    v_cache[:, pos0:end] = v.reshape(t, nkv, head_dim).transpose(1, 0, 2).astype(v_cache.dtype)
    kc, vc = k_cache[:, :end].astype(cp.float32), v_cache[:, :end].astype(cp.float32)
    out = cp.empty((t, n_heads * head_dim), dtype=cp.float32)
    for c in range(0, t, PREFILL_QUERY_ROWS):
        r = min(t, c + PREFILL_QUERY_ROWS) - c
        out[c:c + r] = _attend_rows(q[c:c + r], kc, vc, pos0 + c, n_heads, head_dim, scale, softcap, window)
    return out


def _attend_rows(q, kc, vc, p0: int, n_heads: int, head_dim: int, scale: float, softcap: float, window: int):
    """Queries q (R, H*hd) at positions p0.. against fp32 keys and values (KV, >= p0 + R, hd)."""
    cp = cupy()
    t, nkv = q.shape[0], kc.shape[0]
    end = p0 + t
    group = n_heads // nkv
    qh = q.reshape(t, nkv, group, head_dim).transpose(1, 2, 0, 3).reshape(nkv, group * t, head_dim)
    scores = cp.matmul(qh, kc[:, :end].transpose(0, 2, 1)) * np.float32(scale)  # (KV, group*R, end)
    if softcap > 0:
        scores = np.float32(softcap) * cp.tanh(scores / np.float32(softcap))
    qpos = cp.tile(cp.arange(p0, end), group)
    keys = cp.arange(end)[None, :]
    hidden = keys > qpos[:, None]
    if window:
        hidden = hidden | (keys <= qpos[:, None] - window)
    scores = cp.where(hidden, np.float32(-np.inf), scores)
    scores = cp.exp(scores - scores.max(axis=-1, keepdims=True))
    scores = scores / scores.sum(axis=-1, keepdims=True)
    a = cp.matmul(scores.astype(cp.float32), vc[:, :end])
    return a.reshape(nkv, group, t, head_dim).transpose(2, 0, 1, 3).reshape(t, n_heads * head_dim)


def activate(g, activation: str, threshold: float):
    cp = cupy()
    if activation == "silu":
        return g / (1.0 + cp.exp(-g))
    if activation == "gelu_tanh":
        c = np.float32(np.sqrt(2.0 / np.pi))
        return np.float32(0.5) * g * (1.0 + cp.tanh(c * (g + np.float32(0.044715) * g * g * g)))
    if activation == "fatrelu":
        return cp.where(g >= np.float32(threshold), g, np.float32(0.0))
    return cp.maximum(g, np.float32(0.0))

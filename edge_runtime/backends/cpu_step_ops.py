"""Compiled small ops of the cpu backend: norms, RoPE, one-token attention, the FFN activation and the
TEAL input mask. They write into the caller's buffers (the decode step allocates nothing) and keep the
numpy semantics of backends/cpu.py's batched path, in float32.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from edge_runtime.backends.jit import exp_nonpositive, kernel

SILU, RELU, FATRELU, GELU_TANH, DRELU = 0, 1, 2, 3, 4
ACTIVATION_CODE = {"silu": SILU, "relu": RELU, "fatrelu": FATRELU, "gelu_tanh": GELU_TANH, "drelu": DRELU}
GELU_C = np.float32(np.sqrt(2.0 / np.pi))  # gelu_tanh(x) = x/2 (1 + tanh(GELU_C (x + 0.044715 x^3)))


@kernel()
def rms_norm(x, w, eps, out):
    """x (T, d) -> out (T, d) = x / sqrt(mean(x^2) + eps) * w; eps float32."""
    d = x.shape[1]
    for t in range(x.shape[0]):
        ss = np.float32(0.0)
        for i in range(d):
            ss += x[t, i] * x[t, i]
        inv = np.float32(1.0) / np.sqrt(ss / np.float32(d) + eps)
        for i in range(d):
            out[t, i] = x[t, i] * inv * w[i]


@kernel()
def layer_norm(x, w, b, eps, out):
    """x (T, d) -> out (T, d) = (x - mean) / sqrt(var + eps) * w + b; eps float32."""
    d = x.shape[1]
    for t in range(x.shape[0]):
        mean = np.float32(0.0)
        for i in range(d):
            mean += x[t, i]
        mean /= np.float32(d)
        var = np.float32(0.0)
        for i in range(d):
            var += (x[t, i] - mean) * (x[t, i] - mean)
        inv = np.float32(1.0) / np.sqrt(var / np.float32(d) + eps)
        for i in range(d):
            out[t, i] = (x[t, i] - mean) * inv * w[i] + b[i]


@kernel()
def rope(x, positions, cos, sin, n_heads):
    """x (T, n_heads * hd) rotated in place (HF rotate_half); cos, sin (ctx, hd/2) float32; positions (T,)."""
    half = cos.shape[1]
    for t in range(x.shape[0]):
        p = positions[t]
        for h in range(n_heads):
            o = h * 2 * half
            for i in range(half):
                x1, x2 = x[t, o + i], x[t, o + half + i]
                x[t, o + i] = x1 * cos[p, i] - x2 * sin[p, i]
                x[t, o + half + i] = x2 * cos[p, i] + x1 * sin[p, i]


# One token's attention reads short rows (head_dim floats) of a (KV, ctx, hd) cache. The helpers index the cache
# and buffers two-dimensionally (views would cost two atomic reference-count updates each), fold the scale and
# the maximum into the score pass and the normalisation into the output, so softmax is one vectorised pass:
# 8.1 -> 6.2 us for the default model's 6 heads at position 135.
@kernel(inline=True)
def _head_scores(q, kc, h, g, lo, end, scale, scores):
    """scores[h, t] = scale * (query head h of q (1, H*hd)) . kc[g, t] for lo <= t < end, four K rows per pass
    over the query; returns their maximum."""
    hd = kc.shape[2]
    qo = h * hd
    top = np.float32(-np.inf)
    t = lo
    while t + 4 <= end:
        a0 = a1 = a2 = a3 = np.float32(0.0)
        for c in range(hd):
            qc = q[0, qo + c]
            a0 += kc[g, t, c] * qc
            a1 += kc[g, t + 1, c] * qc
            a2 += kc[g, t + 2, c] * qc
            a3 += kc[g, t + 3, c] * qc
        a0, a1, a2, a3 = a0 * scale, a1 * scale, a2 * scale, a3 * scale
        scores[h, t], scores[h, t + 1], scores[h, t + 2], scores[h, t + 3] = a0, a1, a2, a3
        top = max(top, max(max(a0, a1), max(a2, a3)))
        t += 4
    for tt in range(t, end):
        a = np.float32(0.0)
        for c in range(hd):
            a += kc[g, tt, c] * q[0, qo + c]
        a *= scale
        scores[h, tt] = a
        top = max(top, a)
    return top


@kernel(inline=True)
def _cap_scores(scores, h, lo, end, softcap, top):
    """scores[h, lo:end] -> softcap * tanh(scores / softcap) (a pass of its own: a tanh keeps a loop scalar);
    returns the capped maximum (tanh is increasing, so it is the cap of the maximum)."""
    for t in range(lo, end):
        scores[h, t] = softcap * np.tanh(scores[h, t] / softcap)
    return softcap * np.tanh(top / softcap)


@kernel(inline=True)
def _exp_sum(scores, h, lo, end, top):
    """scores[h, lo:end] -> exp(scores - top); returns their sum."""
    total = np.float32(0.0)
    for t in range(lo, end):
        e = exp_nonpositive(scores[h, t] - top)
        scores[h, t] = e
        total += e
    return total


@kernel(inline=True)
def _head_values(vc, g, scores, h, lo, end, inv, out):
    """out[0, h*hd:(h+1)*hd] = inv * sum over lo <= t < end of scores[h, t] * vc[g, t], four V rows per pass."""
    hd = vc.shape[2]
    qo = h * hd
    for c in range(hd):
        out[0, qo + c] = 0.0
    t = lo
    while t + 4 <= end:
        e0, e1, e2, e3 = scores[h, t], scores[h, t + 1], scores[h, t + 2], scores[h, t + 3]
        for c in range(hd):
            out[0, qo + c] += e0 * vc[g, t, c] + e1 * vc[g, t + 1, c] + e2 * vc[g, t + 2, c] + e3 * vc[g, t + 3, c]
        t += 4
    for tt in range(t, end):
        e = scores[h, tt]
        for c in range(hd):
            out[0, qo + c] += e * vc[g, tt, c]
    for c in range(hd):
        out[0, qo + c] *= inv


@kernel(inline=True)
def _attend_head(q, kc, vc, h, g, lo, end, scale, softcap, scores, out):
    """Query head h of q (1, H*hd) over positions lo..end-1 of KV head g of kc, vc (KV, ctx, hd) -> out[0, h*hd:
    (h+1)*hd]; scores (H, ctx) scratch."""
    top = _head_scores(q, kc, h, g, lo, end, scale, scores)
    if softcap > 0:
        top = _cap_scores(scores, h, lo, end, softcap, top)
    total = _exp_sum(scores, h, lo, end, top)
    _head_values(vc, g, scores, h, lo, end, np.float32(1.0) / total, out)


@kernel(inline=True)
def _write_kv(k, v, kc, vc, pos):
    """k, v (1, KV*hd) into kc, vc (KV, ctx, hd) at pos."""
    nkv, _, hd = kc.shape
    for g in range(nkv):
        for i in range(hd):
            kc[g, pos, i] = k[0, g * hd + i]
            vc[g, pos, i] = v[0, g * hd + i]


@kernel(inline=True)
def _attention_start(q, k, v, kc, vc, pos, window):
    """k, v written into the cache at pos; returns (query heads, heads per KV head, first position seen)."""
    _write_kv(k, v, kc, vc, pos)
    nh = q.shape[1] // kc.shape[2]
    return nh, nh // kc.shape[0], max(0, pos + 1 - window) if window > 0 else 0


@kernel(parallel=True)
def attention_step(q, k, v, kc, vc, pos, scale, softcap, window, scores, out):
    """One token at position pos: k, v (1, KV*hd) written into kc, vc (KV, ctx, hd) at pos, then each of
    the H query heads in q (1, H*hd) attends over positions lo..pos of its KV head (GQA) -> out (1, H*hd),
    lo = max(0, pos - window + 1) for a sliding window (window 0: lo = 0). scores (H, ctx) float32 scratch;
    scale float32 (config.attn_scale); softcap float32: scores -> softcap * tanh(scores / softcap), 0 = off."""
    nh, group, lo = _attention_start(q, k, v, kc, vc, pos, window)
    for h in prange(nh):
        _attend_head(q, kc, vc, h, h // group, lo, pos + 1, scale, softcap, scores, out)


@kernel()
def attention_step_serial(q, k, v, kc, vc, pos, scale, softcap, window, scores, out):
    """attention_step on the calling thread (the fused decode step, cpu_fused.py)."""
    nh, group, lo = _attention_start(q, k, v, kc, vc, pos, window)
    for h in range(nh):
        _attend_head(q, kc, vc, h, h // group, lo, pos + 1, scale, softcap, scores, out)


@kernel()
def activate_mul(g, u, act, threshold, out):
    """out = act(g) * u (u of size 0: act(g) alone); act SILU | RELU | FATRELU | GELU_TANH | DRELU (relu(g) *
    relu(u)); threshold float32 (FATReLU)."""
    gated = u.shape[0] > 0
    for i in range(g.shape[0]):
        x = g[i]
        if act == SILU:
            a = x / (np.float32(1.0) + np.exp(-x))
        elif act == FATRELU:
            a = x if x >= threshold else np.float32(0.0)
        elif act == GELU_TANH:
            a = np.float32(0.5) * x * (np.float32(1.0) + np.tanh(GELU_C * (x + np.float32(0.044715) * x * x * x)))
        else:
            a = max(x, np.float32(0.0))
        if gated:
            out[i] = a * (max(u[i], np.float32(0.0)) if act == DRELU else u[i])
        else:
            out[i] = a


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """HF gelu_pytorch_tanh in float32 (batched twin of activate_mul's GELU_TANH)."""
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(GELU_C * (x + np.float32(0.044715) * x * x * x)))


@kernel()
def teal_mask(x, scale, threshold, out):
    """out = x where |x| * scale >= threshold, else 0 (TEAL with scale 1, WINA with the weight column norms:
    inputs under the threshold skip their weight column). x, scale, out (K,) float32."""
    for i in range(x.shape[0]):
        out[i] = x[i] if abs(x[i]) * scale[i] >= threshold else np.float32(0.0)


@kernel()
def teal_select(x, scale, threshold, idx, h):
    """The input channels TEAL keeps (|x| * scale >= threshold): idx[:n] their indices (int32), h[:n] their
    values; returns n. x, scale (K,) float32; idx, h (>= K,)."""
    n = 0
    for i in range(x.shape[0]):
        if abs(x[i]) * scale[i] >= threshold:
            idx[n] = i
            h[n] = x[i]
            n += 1
    return n

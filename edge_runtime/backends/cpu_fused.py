"""The cpu decode step as one compiled call per layer, for small models on one thread.

A model whose step reads a few MB of weights (the default model: 3.9 MB, cache-resident) spends most of a
token dispatching about 60 kernel calls from Python, each a few microseconds, not reading weights: the
per-op step ran at about 2,000 tokens/s dense and barely faster sparse. Here each layer is one call into a
compiled function that runs the same kernels (their serial twins, which do not open a parallel region) in
the order `Decoder._step` issues them, over the same buffers, state and counters. `CpuBackend.run_step` uses
it where `FusedStep.covers` says so (one thread, a Llama-style layer with RMSNorm and no post norms, dense
fp32/fp16/int8 matrices, dense mode or sparse mode with the FFN predictor and no attention thresholds, no
recall measurement) and runs the decoder's op-by-op step otherwise; tests compare the two token by token.
"""

from __future__ import annotations

import numpy as np

import edge_runtime.backends.cpu_predict as cpu_predict
import edge_runtime.backends.cpu_step_ops as cpu_step_ops
from edge_runtime.backends.base import PROJECTION, SPARSEINFER
from edge_runtime.backends.cpu_gemv import axpy_rows_serial, gemv_rows_serial
from edge_runtime.backends.jit import kernel
from edge_runtime.backends.weights import ATTENTION

NO_F32 = np.zeros(0, np.float32)
NO_U16 = np.zeros(0, np.uint16)


@kernel()
def _project(w, scale, bias, x, rows, n, out):
    """out[:n] = W[rows[:n]] . x[0] (+ bias): one (1, K) activation through a dense-encoded matrix."""
    gemv_rows_serial(w, scale, bias, x[0], rows, n, out)


@kernel()
def _ffn(x, ffn_w, ffn_s, ffn_b, down_b, has_up, act, act_threshold, up_relu, sparse, kind, alpha, theta,
         gate_signs, sign_bytes, row_bytes, theta_bytes, dense_bytes, all_rows, xs, table, z, g, u, h, idx, rows,
         y, counters, counter_rows, layer):
    """y[:d] = FFN(x[0]) as CpuBackend._ffn_dense / _ffn_sparse compute it; counters advanced when sparse."""
    wg, wu, wd = ffn_w
    sg, su, sd = ffn_s
    bg, bu = ffn_b
    n_rows = wg.shape[0]
    d = x.shape[1]
    if sparse and kind in (SPARSEINFER, PROJECTION):
        if kind == SPARSEINFER:
            n = cpu_predict.sparseinfer_serial(x[0], gate_signs, alpha, xs, idx)
        else:
            n = cpu_predict.projection_serial(x[0], sign_bytes, theta, table, z, idx)
        gemv_rows_serial(wg, sg, bg, x[0], idx, n, g)
        m = cpu_predict.keep_after_gate(g, idx, n, act_threshold, rows, h)
        m_up = m
        if has_up:
            gemv_rows_serial(wu, su, bu, x[0], rows, m, u)
            if up_relu:
                m = cpu_predict.keep_positive_up(u, rows, m, h)
            else:
                for j in range(m):
                    h[j] *= u[j]
        axpy_rows_serial(wd, sd, h, rows, m, y[:d])
        read = (row_bytes[0] + (theta_bytes if kind == PROJECTION else 0.0) + row_bytes[1] * n
                + row_bytes[2] * m_up + row_bytes[3] * m)
        cpu_predict.count_step(counters, counter_rows, layer, n, m, np.int64(read), dense_bytes, m_up - m)
    else:
        gemv_rows_serial(wg, sg, bg, x[0], all_rows, n_rows, g)
        if has_up:
            gemv_rows_serial(wu, su, bu, x[0], all_rows, n_rows, u)
            cpu_step_ops.activate_mul(g, u, act, act_threshold, h[:n_rows])
        else:
            cpu_step_ops.activate_mul(g, u[:0], act, act_threshold, h[:n_rows])
        axpy_rows_serial(wd, sd, h, all_rows, n_rows, y[:d])
    if down_b.shape[0] > 0:
        for c in range(d):
            y[c] += down_b[c]


@kernel()
def fused_layer(x, hb, q, k, v, a, y, attn_norm, ffn_norm, eps, attn_w, attn_s, attn_b, kc, vc, pos_arr, cos, sin,
                n_heads, n_kv, attn_scale, softcap, window, ctx_rows, scores, ffn_w, ffn_s, ffn_b, down_b, has_up, act,
                act_threshold, up_relu, sparse, predictor, alpha, theta_all, gate_signs, sign_bytes, row_bytes,
                theta_bytes, dense_bytes, attn_bytes, all_rows, xs, table, z, g, u, h, idx, rows, counters,
                counter_rows, attn_counter_rows, layer):
    """One decoder layer of a one-token step, in place on the residual x (1, d): attention block, then FFN.
    attn_w / attn_s / attn_b: (q, k, v, o) weights, fp16-bit scales, biases; ffn_w (gate, up, down^T)."""
    pos = pos_arr[0]
    d = x.shape[1]
    wq, wk, wv, wo = attn_w
    sq, sk, sv, so = attn_s
    bq, bk, bv, bo = attn_b
    cpu_step_ops.rms_norm(x, attn_norm, eps, hb)
    _project(wq, sq, bq, hb, all_rows, wq.shape[0], q[0])
    _project(wk, sk, bk, hb, all_rows, wk.shape[0], k[0])
    _project(wv, sv, bv, hb, all_rows, wv.shape[0], v[0])
    cpu_step_ops.rope(q, pos_arr, cos, sin, n_heads)
    cpu_step_ops.rope(k, pos_arr, cos, sin, n_kv)
    cpu_step_ops.attention_step_serial(q, k, v, kc, vc, pos, attn_scale, softcap, window, ctx_rows, scores, a)
    _project(wo, so, bo, a, all_rows, d, y)
    for c in range(d):
        x[0, c] += y[c]
    if sparse:  # the attention bytes a sparse step counts (no threshold here: all of them)
        counters[attn_counter_rows[0], layer] += attn_bytes
        counters[attn_counter_rows[1], layer] += attn_bytes
    cpu_step_ops.rms_norm(x, ffn_norm, eps, hb)
    _ffn(hb, ffn_w, ffn_s, ffn_b, down_b, has_up, act, act_threshold, up_relu, sparse, predictor[layer],
         np.float64(alpha[layer]), theta_all[layer], gate_signs, sign_bytes, row_bytes, theta_bytes, dense_bytes,
         all_rows, xs, table, z, g, u, h, idx, rows, y, counters, counter_rows, layer)
    for c in range(d):
        x[0, c] += y[c]


@kernel()
def fused_head(x, norm_w, eps, hb, w, scale, all_rows, logits):
    """logits (1, V) = LM head (final RMSNorm (x)), before any soft cap."""
    cpu_step_ops.rms_norm(x, norm_w, eps, hb)
    gemv_rows_serial(w, scale, NO_F32, hb[0], all_rows, w.shape[0], logits[0])


class FusedStep:
    """The per-layer argument lists of fused_layer, bound once to a CpuBackend's weights, buffers and state."""

    def __init__(self, backend, counter_rows: np.ndarray, attn_counter_rows: np.ndarray):
        self.b = be = backend
        cfg, st, buf, s = be.config, be.state, be.buffers, be.scratch
        ws = be.weights
        n_max = max(cfg.vocab_size, cfg.ffn_dim, cfg.dim, cfg.n_heads * cfg.head_dim)
        all_rows = np.arange(n_max, dtype=np.int32)
        f32 = np.float32
        self.layer_args = []  # per layer: (arguments before `sparse`, arguments after it)
        for i, lay in enumerate(ws.layers):
            attn = [be.kernels[id(getattr(lay, p).w)] for p in ATTENTION]
            attn_b = tuple(NO_F32 if getattr(lay, p).b is None else getattr(lay, p).b for p in ATTENTION)
            ffn = [be.kernels[id(lay.gate.w)], be.kernels[id((lay.up or lay.gate).w)], be.kernels[id(lay.down_t)]]
            ffn_b = tuple(NO_F32 if lin is None or lin.b is None else lin.b for lin in (lay.gate, lay.up))
            signs, gate_row, up_row, down_row, dense_bytes = be.ffn_bytes[i]
            before = (buf.x, buf.h, buf.q, buf.k, buf.v, buf.a, s.y, lay.attn_norm.w, lay.ffn_norm.w,
                      f32(lay.attn_norm.eps), tuple(m.w for m in attn), tuple(m.scale for m in attn), attn_b,
                      be.k_cache[i], be.v_cache[i], st.pos, be.cos, be.sin, cfg.n_heads, cfg.n_kv_heads,
                      be.attn_scale, be.attn_softcap, cfg.window(i), s.positions, s.scores,
                      tuple(m.w for m in ffn), tuple(m.scale for m in ffn), ffn_b,
                      NO_F32 if lay.down_b is None else lay.down_b, lay.up is not None, be.act, be.act_threshold,
                      bool(cfg.up_relu))
            after = (st.predictor, st.alpha, st.theta, lay.gate_signs, be.sign_bytes[i],
                     np.array([signs, gate_row, up_row, down_row], np.float64), float(st.theta[i].nbytes),
                     int(dense_bytes), int(lay.attn_dense_bytes()), all_rows, s.xs, s.table, s.z, s.g, s.u, s.h,
                     s.idx, s.rows, st.counters, counter_rows, attn_counter_rows, i)
            self.layer_args.append((before, after))
        head = be.kernels[id(ws.lm_head)]
        self.head_args = (buf.x, ws.final_norm.w, f32(ws.final_norm.eps), buf.h, head.w, head.scale, all_rows,
                          buf.logits)

    def covers(self, mode: str) -> bool:
        """Whether this step computes what the decoder's op-by-op step would in this mode and state."""
        st = self.b.state
        if mode not in ("dense", "sparse") or st.measure_recall:
            return False
        return mode == "dense" or not st.teal.any()  # attention column skipping: the op-by-op step

    @staticmethod
    def supports(backend) -> bool:
        """Whether the model and thread count are what fused_layer computes (any mode)."""
        cfg, ws = backend.config, backend.weights
        if backend.threads != 1 or cfg.arch != "llama" or ws.pos_embed is not None or ws.final_norm.b is not None:
            return False
        for lay in ws.layers:
            if lay.attn_post_norm is not None or lay.ffn_post_norm is not None or lay.attn_norm.b is not None:
                return False
            if lay.ffn_norm.b is not None or lay.attn_norm.eps != lay.ffn_norm.eps:
                return False
        mats = [ws.lm_head] + [m for lay in ws.layers for m in (lay.q.w, lay.k.w, lay.v.w, lay.o.w, lay.gate.w,
                                                                  lay.down_t) + ((lay.up.w,) if lay.up else ())]
        return all(backend.kernels[id(m)].kind == "dense" for m in mats)

    def run(self, mode: str) -> None:
        """One token: state.token at state.pos -> buffers.logits (soft cap applied), then sampled and advanced."""
        be = self.b
        sparse = mode == "sparse"
        be.embed_tokens(be.state.token, be.state.pos, out=be.buffers.x)
        for before, after in self.layer_args:
            fused_layer(*before, sparse, *after)
        fused_head(*self.head_args)
        be.soft_cap(be.buffers.logits)
        be.sample(be.buffers.logits)
        be.advance()

"""The cpu decode step as one compiled call per token.

A model whose step reads a few MB of weights (the default model: 3.9 MB, cache-resident) spent most of a token
dispatching about 60 kernel calls from Python, each a few microseconds, not reading weights: the per-op step
ran at about 2,000 tokens/s dense and barely faster sparse. Here the token is one call into a compiled
function (fused_step: embedding, every layer through fused_layer, final norm and LM head) that runs the same
kernels in the order `Decoder._step` issues them, over the same buffers, state and counters: their serial
twins (no parallel region to open) for matrices read on one thread, the parallel ones for those the backend
splits over its threads (jit.threads_for). The layers' own arrays reach it through a table of addresses
(jit.view_at) bound once, since numba unboxes every array argument on every call (about 70 ns each).
`CpuBackend.run_step` uses it where `FusedStep.supports` and `covers` say so (a Llama-style layer with RMSNorm
and no post norms; dense fp32, fp16 or int8 matrices of one dtype per role; dense mode, or sparse mode with the
FFN predictor and attention thresholds; no recall measurement) and runs the decoder's op-by-op step
otherwise; tests compare the two token by token.
"""

from __future__ import annotations

import numpy as np

import edge_runtime.backends.cpu_predict as cpu_predict
import edge_runtime.backends.cpu_step_ops as cpu_step_ops
from edge_runtime.backends.base import PROJECTION, SPARSEINFER
from edge_runtime.backends.cpu_gemv import (
    axpy_rows,
    axpy_rows_serial,
    dense_rows,
    gemv_rows,
    gemv_rows3,
    gemv_rows_serial,
)
from edge_runtime.backends.jit import kernel, per_thread, view_at
from edge_runtime.backends.weights import ATTENTION, TEAL_THRESHOLD_BYTES, column_layout

NO_F32 = np.zeros(0, np.float32)
NO_U16 = np.zeros(0, np.uint16)


@kernel()
def _gemv(w, scale, bias, x, idx, n, out, part):
    """gemv_rows over the threads where part (threads, >= K) has several rows, else on this thread."""
    if part.shape[0] > 1:
        gemv_rows(w, scale, bias, x, idx, n, out)
    else:
        gemv_rows_serial(w, scale, bias, x, idx, n, out)


@kernel()
def _axpy(w, scale, h, idx, n, out, part):
    """axpy_rows over the threads (part their partial sums) where part has several rows, else on this one."""
    if part.shape[0] > 1:
        axpy_rows(w, scale, h, idx, n, part, out)
    else:
        axpy_rows_serial(w, scale, h, idx, n, out)


@kernel()
def _predict(x, kind, alpha, theta, gate_signs, sign_bytes, xs, table, z, mask, idx, part):
    """The predicted rows into idx; returns their count (over the threads where part has several rows)."""
    if part.shape[0] > 1:
        if kind == SPARSEINFER:
            cpu_predict._sparseinfer_mask(x, gate_signs, alpha, xs, mask)
            return cpu_predict._compact(mask, idx)
        cpu_predict.projection_z(x, sign_bytes, table, z)
        return cpu_predict.rows_at_least(z, theta, idx)
    if kind == SPARSEINFER:
        return cpu_predict.sparseinfer_serial(x, gate_signs, alpha, xs, idx)
    return cpu_predict.projection_serial(x, sign_bytes, theta, table, z, idx)


@kernel()
def _attn_project(w, scale, bias, wt, colscale, x, threshold, channel_scale, layout, all_rows, col_idx, col_h,
                  out, part):
    """out[:N] = W x[0] (+ bias) for one of q, k, v, o; returns the weight bytes read. With a TEAL threshold
    (> 0) only the input channels with |x| * channel_scale >= threshold count, read as rows of W^T (wt (K, N),
    int8's row scales colscale (N,) applied after the sum), as ColumnKernels.gemv does; layout (3,) float64:
    bytes per kept channel, fixed bytes per product (with its threshold), every stored byte."""
    n = w.shape[0]
    if threshold > 0 and wt.shape[0] > 0:
        m = cpu_step_ops.teal_select(x[0], channel_scale, threshold, col_idx, col_h)
        _axpy(wt, NO_U16, col_h, col_idx, m, out[:n], part)
        if colscale.shape[0] > 0:
            for j in range(n):
                out[j] *= colscale[j]
        if bias.shape[0] > 0:
            for j in range(n):
                out[j] += bias[j]
        return m * layout[0] + layout[1]
    _gemv(w, scale, bias, x[0], all_rows, n, out, part)
    return layout[2]


@kernel()
def _ffn(x, ffn_w, ffn_s, ffn_b, down_b, has_up, act, act_threshold, up_relu, sparse, kind, alpha, theta,
         gate_signs, sign_bytes, row_bytes, theta_bytes, dense_bytes, all_rows, xs, table, z, mask, g, u, h, idx,
         rows, y, counters, counter_rows, layer, part):
    """y[:d] = FFN(x[0]) as CpuBackend._ffn_dense / _ffn_sparse compute it; counters advanced when sparse."""
    wg, wu, wd = ffn_w
    sg, su, sd = ffn_s
    bg, bu = ffn_b
    n_rows = wg.shape[0]
    d = x.shape[1]
    if sparse and kind in (SPARSEINFER, PROJECTION):
        n = _predict(x[0], kind, alpha, theta, gate_signs, sign_bytes, xs, table, z, mask, idx, part)
        _gemv(wg, sg, bg, x[0], idx, n, g, part)
        m = cpu_predict.keep_after_gate(g, idx, n, act_threshold, rows, h)
        m_up = m
        if has_up:
            _gemv(wu, su, bu, x[0], rows, m, u, part)
            if up_relu:
                m = cpu_predict.keep_positive_up(u, rows, m, h)
            else:
                for j in range(m):
                    h[j] *= u[j]
        _axpy(wd, sd, h, rows, m, y[:d], part)
        read = (row_bytes[0] + (theta_bytes if kind == PROJECTION else 0.0) + row_bytes[1] * n
                + row_bytes[2] * m_up + row_bytes[3] * m)
        cpu_predict.count_step(counters, counter_rows, layer, n, m, np.int64(read), dense_bytes, m_up - m)
    else:
        if has_up and part.shape[0] > 1:  # gate and up in one parallel region
            gemv_rows3(wg, sg, bg, g, wu, su, bu, u, wu[:0], su[:0], bu[:0], u[:0], x[0], all_rows)
        else:
            _gemv(wg, sg, bg, x[0], all_rows, n_rows, g, part)
            if has_up:
                _gemv(wu, su, bu, x[0], all_rows, n_rows, u, part)
        if has_up:
            cpu_step_ops.activate_mul(g, u, act, act_threshold, h[:n_rows])
        else:
            cpu_step_ops.activate_mul(g, u[:0], act, act_threshold, h[:n_rows])
        _axpy(wd, sd, h, all_rows, n_rows, y[:d], part)
    if down_b.shape[0] > 0:
        for c in range(d):
            y[c] += down_b[c]


@kernel()
def fused_layer(x, hb, q, k, v, a, y, attn_norm, ffn_norm, eps, attn_w, attn_s, attn_b, attn_wt, attn_colscale,
                attn_layout, kc, vc, pos_arr, cos, sin, n_heads, n_kv, attn_scale, softcap, window, scores,
                ffn_w, ffn_s, ffn_b, down_b, has_up, act, act_threshold, up_relu, sparse, teal, teal_scale, predictor,
                alpha, theta_all, gate_signs, sign_bytes, row_bytes, theta_bytes, dense_bytes, all_rows, col_idx,
                col_h, xs, table, z, mask, g, u, h, idx, rows, counters, counter_rows, attn_counter_rows, layer,
                attn_part, ffn_part):
    """One decoder layer of a one-token step, in place on the residual x (1, d): attention block, then FFN.
    attn_w / attn_s / attn_b / attn_wt / attn_colscale: (q, k, v, o) weights, fp16-bit scales, biases, W^T of
    those with TEAL thresholds ((0, 0) otherwise) and int8 column scales; attn_layout (4, 3) their byte figures
    (_attn_project); ffn_w (gate, up, down^T). Sparse mode: the layer's q, k, v, o thresholds in teal (L, 7)
    (PROJECTIONS order, q k v o first) skip input channels, and the FFN runs on the predictor. attn_part /
    ffn_part (threads, >= K) float32: the partial sums of products run over several threads; (1, 0): this one."""
    pos = pos_arr[0]
    d = x.shape[1]
    wq, wk, wv, wo = attn_w
    sq, sk, sv, so = attn_s
    bq, bk, bv, bo = attn_b
    tq, tk, tv, to = attn_wt
    cq, ck, cv, co = attn_colscale
    t = teal[layer]
    ts = teal_scale[layer]
    zero = np.float32(0.0)
    tq_, tk_, tv_, to_ = (t[0], t[1], t[2], t[3]) if sparse else (zero, zero, zero, zero)
    cpu_step_ops.rms_norm(x, attn_norm, eps, hb)
    if attn_part.shape[0] > 1 and tq_ <= 0 and tk_ <= 0 and tv_ <= 0:  # q, k, v in one parallel region
        gemv_rows3(wq, sq, bq, q[0], wk, sk, bk, k[0], wv, sv, bv, v[0], hb[0], all_rows)
        read = attn_layout[0, 2] + attn_layout[1, 2] + attn_layout[2, 2]
    else:
        read = _attn_project(wq, sq, bq, tq, cq, hb, tq_, ts[0, :d], attn_layout[0], all_rows, col_idx, col_h,
                             q[0], attn_part)
        read += _attn_project(wk, sk, bk, tk, ck, hb, tk_, ts[1, :d], attn_layout[1], all_rows, col_idx, col_h,
                              k[0], attn_part)
        read += _attn_project(wv, sv, bv, tv, cv, hb, tv_, ts[2, :d], attn_layout[2], all_rows, col_idx, col_h,
                              v[0], attn_part)
    cpu_step_ops.rope(q, pos_arr, cos, sin, n_heads)
    cpu_step_ops.rope(k, pos_arr, cos, sin, n_kv)
    if attn_part.shape[0] > 1:
        cpu_step_ops.attention_step(q, k, v, kc, vc, pos, attn_scale, softcap, window, scores, a)
    else:
        cpu_step_ops.attention_step_serial(q, k, v, kc, vc, pos, attn_scale, softcap, window, scores, a)
    read += _attn_project(wo, so, bo, to, co, a, to_, ts[3, :a.shape[1]], attn_layout[3], all_rows, col_idx, col_h,
                          y, attn_part)
    for c in range(d):
        x[0, c] += y[c]
    if sparse:  # the attention bytes a sparse step counts
        counters[attn_counter_rows[0], layer] += np.int64(read)
        dense = np.float64(0.0)
        for p in range(4):
            dense += attn_layout[p, 2]
        counters[attn_counter_rows[1], layer] += np.int64(dense)
    cpu_step_ops.rms_norm(x, ffn_norm, eps, hb)
    _ffn(hb, ffn_w, ffn_s, ffn_b, down_b, has_up, act, act_threshold, up_relu, sparse, predictor[layer],
         np.float64(alpha[layer]), theta_all[layer], gate_signs, sign_bytes, row_bytes, theta_bytes, dense_bytes,
         all_rows, xs, table, z, mask, g, u, h, idx, rows, y, counters, counter_rows, layer, ffn_part)
    for c in range(d):
        x[0, c] += y[c]


# Slots of the per-layer address table (FusedStep.bind): each a C-contiguous array of the layer.
(ATTN_NORM, FFN_NORM, WQ, WK, WV, WO, SQ, SK, SV, SO, BQ, BK, BV, BO, TQ, TK, TV, TO, CQ, CK, CV, CO,
 W_GATE, W_UP, W_DOWN, S_GATE, S_UP, S_DOWN, B_GATE, B_UP, B_DOWN, SIGNS, SIGN_BYTES) = range(33)
MATRIX_SLOTS = (WQ, WK, WV, WO, TQ, TK, TV, TO, W_GATE, W_UP, W_DOWN, SIGNS, SIGN_BYTES)
# the dtype fused_step reads each vector slot and the sign planes as (the weight slots: layer 0's, one per role)
SLOT_DTYPE = {**dict.fromkeys((ATTN_NORM, FFN_NORM, BQ, BK, BV, BO, CQ, CK, CV, CO, B_GATE, B_UP, B_DOWN),
                              np.dtype(np.float32)),
              **dict.fromkeys((SQ, SK, SV, SO, S_GATE, S_UP, S_DOWN), np.dtype(np.uint16)),
              SIGNS: np.dtype(np.uint32), SIGN_BYTES: np.dtype(np.uint8)}


@kernel(inline=True)
def _vec(addr, shape, layer, slot, like):
    """The 1-D array in `slot` of `layer` (addr (L, 33) int64 addresses, shape (L, 33, 2) int64)."""
    return view_at(addr[layer, slot], (shape[layer, slot, 0],), like)


@kernel(inline=True)
def _mat(addr, shape, layer, slot, like):
    """The 2-D array in `slot` of `layer`."""
    return view_at(addr[layer, slot], (shape[layer, slot, 0], shape[layer, slot, 1]), like)


@kernel()
def fused_step(addr, shape, like, layouts, row_bytes, theta_bytes, dense_bytes, windows, parallel, has_up, sparse,
               embed_w, embed_s, embed_scale, norm_w, eps, head_w, head_s, head_parallel, token, x, hb, q, k, v, a,
               y, kc, vc, pos_arr, cos, sin, n_heads, n_kv, attn_scale, softcap, scores, act,
               act_threshold, up_relu, teal, teal_scale, predictor, alpha, theta_all, all_rows, col_idx, col_h, xs,
               table, z, mask, g, u, h, idx, rows, counters, counter_rows, attn_counter_rows, part, serial, logits):
    """One token, state.token at state.pos -> logits (1, V) before any soft cap: the embedding row, every layer
    (fused_layer), the final RMSNorm and the LM head, in one call. The layers' own arrays come from the address
    table: like = (q, k, v, o, their W^T, gate, up, down^T) zero-size arrays of each matrix's dtype; per layer
    layouts (L, 4, 3) / row_bytes (L, 4) float64 byte figures, theta_bytes (L,) float64, dense_bytes (L,) int64,
    windows (L,) int64, parallel (L, 2) bool (attention, FFN products over the threads), has_up (L,) bool."""
    dense_rows(embed_w, embed_s, token, x)
    if embed_scale != 1:
        for c in range(x.shape[1]):
            x[0, c] *= embed_scale
    lq, lk, lv, lo, ltq, ltk, ltv, lto, lg, lu, ld = like
    f32 = np.float32
    for i in range(addr.shape[0]):
        attn_w = (_mat(addr, shape, i, WQ, lq), _mat(addr, shape, i, WK, lk), _mat(addr, shape, i, WV, lv),
                  _mat(addr, shape, i, WO, lo))
        attn_s = (_vec(addr, shape, i, SQ, np.uint16), _vec(addr, shape, i, SK, np.uint16),
                  _vec(addr, shape, i, SV, np.uint16), _vec(addr, shape, i, SO, np.uint16))
        attn_b = (_vec(addr, shape, i, BQ, f32), _vec(addr, shape, i, BK, f32), _vec(addr, shape, i, BV, f32),
                  _vec(addr, shape, i, BO, f32))
        attn_wt = (_mat(addr, shape, i, TQ, ltq), _mat(addr, shape, i, TK, ltk), _mat(addr, shape, i, TV, ltv),
                   _mat(addr, shape, i, TO, lto))
        attn_cs = (_vec(addr, shape, i, CQ, f32), _vec(addr, shape, i, CK, f32), _vec(addr, shape, i, CV, f32),
                   _vec(addr, shape, i, CO, f32))
        ffn_w = (_mat(addr, shape, i, W_GATE, lg), _mat(addr, shape, i, W_UP, lu), _mat(addr, shape, i, W_DOWN, ld))
        ffn_s = (_vec(addr, shape, i, S_GATE, np.uint16), _vec(addr, shape, i, S_UP, np.uint16),
                 _vec(addr, shape, i, S_DOWN, np.uint16))
        ffn_b = (_vec(addr, shape, i, B_GATE, f32), _vec(addr, shape, i, B_UP, f32))
        attn_part = part if parallel[i, 0] else serial
        ffn_part = part if parallel[i, 1] else serial
        fused_layer(x, hb, q, k, v, a, y, _vec(addr, shape, i, ATTN_NORM, f32), _vec(addr, shape, i, FFN_NORM, f32),
                    eps, attn_w, attn_s, attn_b, attn_wt, attn_cs, layouts[i], kc[i], vc[i], pos_arr, cos, sin,
                    n_heads, n_kv, attn_scale, softcap, windows[i], scores, ffn_w, ffn_s, ffn_b,
                    _vec(addr, shape, i, B_DOWN, f32), has_up[i], act, act_threshold, up_relu, sparse, teal,
                    teal_scale, predictor, alpha, theta_all, _mat(addr, shape, i, SIGNS, np.uint32),
                    _mat(addr, shape, i, SIGN_BYTES, np.uint8), row_bytes[i], theta_bytes[i], dense_bytes[i],
                    all_rows, col_idx, col_h, xs, table, z, mask, g, u, h, idx, rows, counters, counter_rows,
                    attn_counter_rows, i, attn_part, ffn_part)
    cpu_step_ops.rms_norm(x, norm_w, eps, hb)
    head_part = part if head_parallel else serial
    _gemv(head_w, head_s, NO_F32, hb[0], all_rows, head_w.shape[0], logits[0], head_part)


class FusedStep:
    """fused_step's arguments, bound to a CpuBackend's weights, buffers and state (again by `bind` when the
    backend makes column-major copies for attention thresholds). The layers' arrays go through one table of
    addresses: a default-model token passed about 260 arrays to the compiled code when each layer was its own
    call, 5.4 us of unboxing per layer."""

    def __init__(self, backend, counter_rows: np.ndarray, attn_counter_rows: np.ndarray):
        self.b = backend
        self.counter_rows, self.attn_counter_rows = counter_rows, attn_counter_rows
        cfg = backend.config
        n_max = max(cfg.vocab_size, cfg.ffn_dim, cfg.dim, cfg.n_heads * cfg.head_dim)
        self.all_rows = np.arange(n_max, dtype=np.int32)
        k_max = max(cfg.dim, cfg.n_heads * cfg.head_dim)
        self.col_idx, self.col_h = np.zeros(k_max, np.int32), np.zeros(k_max, np.float32)  # kept channels
        # per-thread partial sums of accumulations (down, attention columns) run over several threads, and the
        # marker of products run on this thread
        self.part = per_thread(backend.threads, k_max)
        self.serial = np.zeros((1, 0), np.float32)
        self.bind()

    def _columns(self, lin) -> tuple[np.ndarray, np.ndarray]:
        """(W^T as the column kernels read it, int8 column scales) of a projection, or empty arrays."""
        cols = self.b.columns.get(id(lin.w))
        if cols is None:
            return np.zeros((0, 0), self.b.kernels[id(lin.w)].w.dtype), NO_F32
        return cols.wt, cols.colscale

    @staticmethod
    def _layout(lin) -> np.ndarray:
        """(3,) float64: bytes per kept input channel, fixed bytes of a thresholded product, all stored bytes."""
        per, fixed = column_layout(lin.w) or (0, 0)
        return np.array([per, fixed + TEAL_THRESHOLD_BYTES, lin.w.nbytes], np.float64)

    def _layer_arrays(self, i: int) -> list[np.ndarray]:
        """Layer i's arrays in slot order (ATTN_NORM ... SIGN_BYTES)."""
        be = self.b
        lay = be.weights.layers[i]
        lins = [getattr(lay, p) for p in ATTENTION]
        attn = [be.kernels[id(lin.w)] for lin in lins]
        cols = [self._columns(lin) for lin in lins]
        ffn = [be.kernels[id(lay.gate.w)], be.kernels[id((lay.up or lay.gate).w)], be.kernels[id(lay.down_t)]]
        bias = [NO_F32 if lin is None or lin.b is None else lin.b for lin in (*lins, lay.gate, lay.up)]
        return [lay.attn_norm.w, lay.ffn_norm.w, *(m.w for m in attn), *(m.scale for m in attn), *bias[:4],
                *(c[0] for c in cols), *(c[1] for c in cols), *(m.w for m in ffn), *(m.scale for m in ffn),
                *bias[4:], NO_F32 if lay.down_b is None else lay.down_b, lay.gate_signs, be.sign_bytes[i]]

    @staticmethod
    def _slot_arrays(arrays: list[np.ndarray], first: list[np.ndarray]) -> list[np.ndarray]:
        """A layer's arrays as the table holds them: C-contiguous and aligned (copied where not), each of the
        rank and dtype fused_step reads its slot as (weights: those of layer 0's, `first`); else ValueError
        rather than a table that reinterprets bytes."""
        out = []
        for slot, arr in enumerate(arrays):
            dtype = SLOT_DTYPE.get(slot, first[slot].dtype)
            ndim = 2 if slot in MATRIX_SLOTS else 1
            if arr.dtype != dtype or arr.ndim != ndim:
                raise ValueError(f"fused step slot {slot}: a {arr.ndim}-D {arr.dtype} array where {ndim}-D {dtype} "
                                 f"is read")
            out.append(np.require(arr, requirements="CA"))
        return out

    def bind(self) -> None:
        be = self.b
        cfg, st, buf, s, ws = be.config, be.state, be.buffers, be.scratch, be.weights
        n = cfg.n_layers
        raw = [self._layer_arrays(i) for i in range(n)]
        layers = [self._slot_arrays(arrays, raw[0]) for arrays in raw]
        addr = np.array([[arr.ctypes.data for arr in lay] for lay in layers], np.int64)
        shape = np.array([[(arr.shape + (1, 1))[:2] for arr in lay] for lay in layers], np.int64)
        like = tuple(np.zeros((0, 0), arr.dtype) for arr in layers[0][WQ:WO + 1] + layers[0][TQ:TO + 1]
                     + layers[0][W_GATE:W_DOWN + 1])
        lins = [[getattr(lay, p) for p in ATTENTION] for lay in ws.layers]
        layouts = np.array([[self._layout(lin) for lin in ls] for ls in lins], np.float64)
        byte_rows = [be.ffn_bytes[i] for i in range(n)]  # (signs, gate row, up row, down row, dense)
        row_bytes = np.array([r[:4] for r in byte_rows], np.float64)
        dense_bytes = np.array([r[4] for r in byte_rows], np.int64)
        theta_bytes = np.array([float(st.theta[i].nbytes) for i in range(n)], np.float64)
        windows = np.array([cfg.window(i) for i in range(n)], np.int64)
        parallel = np.array([[be.kernels[id(lay.q.w)].threads > 1, be.kernels[id(lay.gate.w)].threads > 1]
                             for lay in ws.layers], bool)
        has_up = np.array([lay.up is not None for lay in ws.layers], bool)
        embed, head = be.kernels[id(ws.embed)], be.kernels[id(ws.lm_head)]
        f32 = np.float32
        before = (addr, shape, like, layouts, row_bytes, theta_bytes, dense_bytes, windows, parallel, has_up)
        after = (embed.w, embed.scale, f32(cfg.embed_scale), ws.final_norm.w, f32(ws.final_norm.eps),
                 head.w, head.scale, head.threads > 1, st.token, buf.x, buf.h, buf.q, buf.k,
                 buf.v, buf.a, s.y, be.k_cache, be.v_cache, st.pos, be.cos, be.sin, cfg.n_heads,
                 cfg.n_kv_heads, be.attn_scale, be.attn_softcap, s.scores, be.act,
                 be.act_threshold, bool(cfg.up_relu), st.teal, st.teal_scale, st.predictor, st.alpha, st.theta,
                 self.all_rows, self.col_idx, self.col_h, s.xs, s.table, s.z, s.mask, s.g, s.u, s.h, s.idx,
                 s.rows, st.counters, self.counter_rows, self.attn_counter_rows, self.part, self.serial,
                 buf.logits)
        # one assignment: the table and the arrays it points into (kept alive with it) change together
        self.keep, self.before, self.after = layers, before, after

    def covers(self, mode: str) -> bool:
        """Whether this step computes what the decoder's op-by-op step would in this mode and state."""
        return mode in ("dense", "sparse") and not self.b.state.measure_recall

    @staticmethod
    def supports(backend) -> bool:
        """Whether the model and thread count are what fused_step computes (any mode): a Llama-style layer
        with RMSNorm, dense-stored matrices of one dtype per role in every layer."""
        cfg, ws = backend.config, backend.weights
        if cfg.arch != "llama" or ws.pos_embed is not None or ws.final_norm.b is not None:
            return False
        for lay in ws.layers:
            if lay.attn_post_norm is not None or lay.ffn_post_norm is not None or lay.attn_norm.b is not None:
                return False
            if lay.ffn_norm.b is not None or {lay.attn_norm.eps, lay.ffn_norm.eps} != {ws.final_norm.eps}:
                return False
        roles = [[lay.q.w, lay.k.w, lay.v.w, lay.o.w, lay.gate.w, (lay.up or lay.gate).w, lay.down_t]
                 for lay in ws.layers]
        kernels = [[backend.kernels[id(m)] for m in ms] for ms in roles]
        heads = [backend.kernels[id(ws.lm_head)], backend.kernels[id(ws.embed)]]
        if not all(k.kind == "dense" for k in heads + [k for ks in kernels for k in ks]):
            return False
        return all([k.w.dtype for k in ks] == [k.w.dtype for k in kernels[0]] for ks in kernels)

    def run(self, mode: str) -> None:
        """One token: state.token at state.pos -> buffers.logits (soft cap applied), then sampled and advanced."""
        be = self.b
        fused_step(*self.before, mode == "sparse", *self.after)
        be.soft_cap(be.buffers.logits)
        be.sample(be.buffers.logits)
        be.advance()

"""The cpu backend: every op of the contract (backends/base.py) on numpy arrays, with compiled (numba)
kernels for one token and numpy/BLAS for several.

Activations are float32 row-major (T, features). Weights stay in their packed encoding (mmapped). A
decode step reads them as stored through compiled GEMV kernels (cpu_dispatch.MatrixKernels, chosen once
per matrix by its encoding), writes into `buffers` and preallocated scratch, and advances `state` like a
device would: nothing is allocated per token. Batched passes (prefill, evaluation) are dense BLAS over
fp32 rows dequantised a block at a time; small models (KEEP_F32_BYTES) keep one fp32 copy for them.
The numpy reference semantics of each kernel (PackedTensor.dequantize, sparsity/predictor.py) are what
the kernel tests compare against.
"""

from __future__ import annotations

import mmap
import threading
import warnings
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import numpy as np

import edge_runtime.backends.cpu_predict as cpu_predict
import edge_runtime.backends.cpu_step_ops as cpu_step_ops
from edge_runtime.backends.base import (
    PREFILL_QUERY_ROWS,
    PROJECTION,
    SPARSEINFER,
    DecodeState,
    knob_arrays,
    layer_rule,
    teal_array,
    teal_scale_array,
)
from edge_runtime.backends.blas_threads import blas_threads
from edge_runtime.backends.cpu_dispatch import ColumnKernels, MatrixKernels
from edge_runtime.backends.cpu_fused import FusedStep
from edge_runtime.backends.jit import default_threads, threads_for, use_threads
from edge_runtime.backends.room import require_room
from edge_runtime.backends.weights import (
    ATTENTION,
    PROJECTIONS,
    Layer,
    Linear,
    Norm,
    column_layout,
    linear_read_bytes,
    weights_of,
)
from edge_runtime.blas_spin import EFFECTIVE as BLAS_SPIN_SET
from edge_runtime.devices.planner import available_memory_bytes
from edge_runtime.devices.sizes import KEEP_F32_BYTES  # small models: an fp32 copy for the batched path
from edge_runtime.model.rope import rope_tables
from edge_runtime.model.sampling import NO_TOKEN, Sampler, SamplingParams
from edge_runtime.pack.loader import PackedModel
from edge_runtime.sparsity.predictor import Rule, keep_after_gate
from edge_runtime.sparsity.stats import FIELDS, FFNStats

C = {name: j for j, name in enumerate(FIELDS)}  # counter rows
TEAL_SLOT = {p: j for j, p in enumerate(PROJECTIONS)}
STEP_COUNTERS = np.array([C[f] for f in ("steps", "predicted", "kept", "bytes_read", "bytes_dense", "up_dropped")],
                         np.int64)
ATTN_COUNTERS = np.array([C["attn_bytes_read"], C["attn_bytes_dense"]], np.int64)


def lazy_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """Zeros in an anonymous mapping of 4 KB pages, each made resident by its first write. np.zeros asks for
    transparent huge pages on large arrays, and the cache's (layer, head) blocks are a few hundred KB apart:
    a 13-token context then faulted in every 2 MB page, the whole cache (137 MB of a 110M model's 151 MB at
    2,048 positions)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    m = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # even where the kernel backs anonymous memory with huge pages always
        m.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(m, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


class CpuBackend:
    name = "cpu"

    def __init__(self, model: PackedModel, max_context: int, threads: int | None = None):
        cfg = self.config = model.config
        if sum(4 * m.shape[0] * m.shape[1] for m in model.matrices.values()) <= KEEP_F32_BYTES:
            for m in model.matrices.values():
                m.keep_f32()
        # compiled kernels' threads (set per decode step); a small model's step runs on one
        self.threads = threads or default_threads(sum(m.nbytes for m in model.matrices.values()))
        use_threads(self.threads)
        if self.threads > 1 and not BLAS_SPIN_SET:
            warnings.warn("numpy was imported before edge_runtime, so OpenBLAS's workers spin for about 0.1 s after "
                          "each prefill and slow a multi-thread decode; import edge_runtime first or set "
                          "OPENBLAS_THREAD_TIMEOUT=20 (edge_runtime/blas_spin.py)", RuntimeWarning, stacklevel=3)
        self.kernels = {id(m): MatrixKernels(m, self.threads) for m in model.matrices.values()}
        self.columns: dict[int, ColumnKernels] = {}  # id(W) -> W^T for TEAL column skipping (made by set_knobs)
        self.max_context = max_context
        self.weights = weights_of(model)
        # the weights by name, for tests and tools that compare against other engines
        self.embed, self.layers, self.final_norm = self.weights.embed, self.weights.layers, self.weights.final_norm
        self.cos, self.sin = rope_tables(cfg, max_context)  # (ctx, head_dim/2) float32
        # KV cache (layer, kv_head, position, head_dim) float32, its pages arriving as positions are written
        shape = (cfg.n_layers, cfg.n_kv_heads, max_context, cfg.head_dim)
        self.k_cache = lazy_zeros(shape, np.float32)
        self.v_cache = lazy_zeros(shape, np.float32)
        self.state = DecodeState.allocate(np, cfg)
        d, hq, hkv = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        f32 = np.float32
        self.buffers = SimpleNamespace(x=np.zeros((1, d), f32), h=np.zeros((1, d), f32), q=np.zeros((1, hq), f32),
                                       k=np.zeros((1, hkv), f32), v=np.zeros((1, hkv), f32),
                                       a=np.zeros((1, hq), f32), logits=np.zeros((1, cfg.vocab_size), f32))
        n, w = cfg.ffn_dim, -(-d // 32)  # FFN rows; uint32 words of a sign-plane row
        kmax = max(d, hq, n)
        # decode-step scratch (not part of the contract): FFN rows and values, predictor tables, attention
        self.scratch = SimpleNamespace(
            y=np.zeros(kmax, f32),  # (max(d, H*hd, N),) a projection's output before it is added
            xin=np.zeros(kmax, f32),  # TEAL-masked input
            xn=np.zeros((1, d), f32),  # the FFN's normed input (ffn_step with norm)
            g=np.zeros(n, f32), u=np.zeros(n, f32), h=np.zeros(n, f32),  # (N,) gate, up, hidden
            g_all=np.zeros(n, f32),  # (N,) dense gate (recall measurement)
            idx=np.zeros(n, np.int32), rows=np.zeros(n, np.int32),  # (N,) predicted rows, kept rows
            mask=np.zeros(n, np.uint8), z=np.zeros(n, f32),  # (N,) predictor mask, projection scores
            xs=np.zeros(w, np.uint32), table=np.zeros((4 * w, 256), f32),  # sign words of x, byte sums
            scores=np.zeros((cfg.n_heads, max_context), f32),  # (H, ctx) attention weights
            pos_ids=np.zeros(1, np.int32))  # learned-position row of the token (OPT)
        self.sign_bytes = [np.ascontiguousarray(lay.gate_signs).view(np.uint8) for lay in self.weights.layers]
        # per layer, the bytes a sparse step reads: sign plane, one gate row, one up row, one down row; and dense
        self.ffn_bytes = [(*lay.ffn_row_bytes(), lay.ffn_dense_bytes()) for lay in self.weights.layers]
        self.predictor_threads = threads_for(8 * self.weights.layers[0].gate_signs.nbytes, self.threads)
        self.act = cpu_step_ops.ACTIVATION_CODE.get(cfg.activation, cpu_step_ops.RELU)
        self.act_threshold = np.float32(cfg.act_threshold)
        self.attn_scale = np.float32(cfg.attn_scale)
        self.attn_softcap = np.float32(cfg.attn_softcap)
        self._sampler = Sampler(SamplingParams())
        self._teal_criterion = "teal"  # what state.teal_scale holds (allocated as ones)
        self.stats_reads = 0  # how often the counters were copied out (tests: never per token)
        # Held through a decode step and while knobs change: the kernels run without the GIL, so a knob written by
        # another thread (the power-mode watcher) would otherwise land inside a token, some layers seeing the old
        # setting and some the new, and the fused step's address table could be rebuilt under a running step.
        self._between_steps = threading.RLock()
        # the token in one compiled call, where it covers the model (None: the decoder's op-by-op step)
        self.fused = FusedStep(self, STEP_COUNTERS, ATTN_COUNTERS) if FusedStep.supports(self) else None

    def free(self) -> None:
        """Drop the weights' kernels, the KV cache and the fused step, which points back at this backend: left as a
        cycle, a closed runtime's memory waited for the garbage collector."""
        self.fused = None
        self.kernels.clear()
        self.columns.clear()
        self.weights = self.embed = self.layers = self.final_norm = None
        self.k_cache = self.v_cache = None

    # ---- ops shared by prefill and the decode step ----------------------------------------------------
    def embed_tokens(self, ids: np.ndarray, positions: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty((len(ids), self.config.dim), np.float32) if out is None else out
        self.kernels[id(self.weights.embed)].rows(ids, out)
        if self.config.embed_scale != 1.0:
            out *= np.float32(self.config.embed_scale)
        if self.weights.pos_embed is not None:
            if len(ids) == 1:
                pos = np.add(positions, self.config.pos_offset, out=self.scratch.pos_ids)
                y = self.scratch.y[:out.shape[1]].reshape(1, -1)
                self.kernels[id(self.weights.pos_embed)].rows(pos, y)
                out += y
            else:
                out += self.weights.pos_embed.dequantize(positions + self.config.pos_offset)
        return out

    def norm(self, x: np.ndarray, n: Norm, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty_like(x) if out is None else out
        if n.b is None:
            cpu_step_ops.rms_norm(x, n.w, np.float32(n.eps), out)
        else:
            cpu_step_ops.layer_norm(x, n.w, n.b, np.float32(n.eps), out)
        return out

    def _teal_threshold(self, teal: tuple[int, str] | None) -> np.float32:
        return np.float32(0.0) if teal is None else self.state.teal[teal[0], TEAL_SLOT[teal[1]]]

    def _teal_scale(self, teal: tuple[int, str], k: int) -> np.ndarray:
        """(k,) float32 channel factors of the TEAL criterion (ones, or WINA's column norms)."""
        return self.state.teal_scale[teal[0], TEAL_SLOT[teal[1]], :k]

    def _teal_mask(self, x: np.ndarray, teal: tuple[int, str] | None) -> np.ndarray:
        """TEAL: input channels with |x| * s under the layer's threshold are zero, i.e. skipped weight columns."""
        t = self._teal_threshold(teal)
        if t <= 0:
            return x
        return np.where(np.abs(x) * self._teal_scale(teal, x.shape[-1]) >= t, x, np.float32(0.0))

    def _gemv_input(self, xv: np.ndarray, teal: tuple[int, str] | None) -> np.ndarray:
        """One token's input (K,), TEAL-masked into scratch when a threshold is set."""
        t = self._teal_threshold(teal)
        if t <= 0:
            return xv
        xin = self.scratch.xin[:xv.shape[0]]
        cpu_step_ops.teal_mask(xv, self._teal_scale(teal, xv.shape[0]), t, xin)
        return xin

    def linear(self, x: np.ndarray, lin: Linear, out: np.ndarray | None = None, teal: tuple[int, str] | None = None,
               add_to: np.ndarray | None = None) -> np.ndarray:
        """(T, K) @ W^T (+ b) -> (T, N). One token: the compiled GEMV on the stored encoding, or with a TEAL
        threshold set, the column-skipping product over W^T (only kept channels' columns read)."""
        k = self.kernels[id(lin.w)]
        if x.shape[0] == 1:
            n = lin.w.shape[0]
            if add_to is not None:
                y = self.scratch.y[:n]
            else:
                out = np.empty((1, n), np.float32) if out is None else out
                y = out[0]
            t = self._teal_threshold(teal)
            cols = self.columns.get(id(lin.w)) if t > 0 else None
            if cols is not None:
                kept = cols.gemv(x[0], self._teal_scale(teal, x.shape[1]), t, y, bias=lin.b)
            else:
                k.gemv(self._gemv_input(x[0], teal), y, bias=lin.b)
                kept = None
            if teal is not None and teal[1] in ATTENTION:  # the step's attention bytes (FFN: ffn_step)
                c = self.state.counters
                c[C["attn_bytes_read"], teal[0]] += int(linear_read_bytes(lin.w, kept))
                c[C["attn_bytes_dense"], teal[0]] += lin.w.nbytes
            if add_to is None:
                return out
            add_to[0] += y
            return add_to
        y = k.matmul(self._teal_mask(x, teal))
        if lin.b is not None:
            y += lin.b
        if add_to is not None:
            add_to += y
            return add_to
        if out is not None:
            out[...] = y
            return out
        return y

    def rope(self, x: np.ndarray, positions: np.ndarray, n_heads: int) -> np.ndarray:
        """(T, n_heads * head_dim) rotated in place per head; HF rotate_half convention."""
        cpu_step_ops.rope(x, positions, self.cos, self.sin, n_heads)
        return x

    def attention_inputs(self, i: int, x: np.ndarray, layer: Layer, teal: bool) -> tuple:
        b = self.buffers
        h = self.norm(x, layer.attn_norm, out=b.h)
        return tuple(self.linear(h, getattr(layer, p), out=getattr(b, p), teal=(i, p) if teal else None)
                     for p in ("q", "k", "v"))

    def attention(self, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, positions: np.ndarray,
                  out: np.ndarray | None = None, rope: bool = False) -> np.ndarray:
        """Write k, v (T, n_kv*hd) at positions (consecutive), attend causally; q (T, n_heads*hd) -> same.
        rope: q and k rotated in place first."""
        cfg = self.config
        if rope:
            self.rope(q, positions, cfg.n_heads)
            self.rope(k, positions, cfg.n_kv_heads)
        t, hd, nkv = q.shape[0], cfg.head_dim, cfg.n_kv_heads
        pos0 = int(positions[0])
        kc, vc = self.k_cache[layer], self.v_cache[layer]  # (n_kv, ctx, hd)
        window = cfg.window(layer)
        if t == 1:
            out = np.empty_like(q) if out is None else out
            step = cpu_step_ops.attention_step if self.threads > 1 else cpu_step_ops.attention_step_serial
            step(q, k, v, kc, vc, pos0, self.attn_scale, self.attn_softcap, window, self.scratch.scores, out)
            return out
        end = pos0 + t
        kc[:, pos0:end] = k.reshape(t, nkv, hd).transpose(1, 0, 2)
        vc[:, pos0:end] = v.reshape(t, nkv, hd).transpose(1, 0, 2)
        out = np.empty_like(q) if out is None else out
        for c in range(0, t, PREFILL_QUERY_ROWS):  # (heads, rows, keys) scores a block of rows at a time
            rows = slice(c, min(t, c + PREFILL_QUERY_ROWS))
            out[rows] = self._attend_rows(q[rows], kc, vc, pos0 + c, window)
        return out

    def _attend_rows(self, q: np.ndarray, kc: np.ndarray, vc: np.ndarray, p0: int, window: int) -> np.ndarray:
        """Queries q (R, n_heads*hd) at positions p0.. against the cached keys up to their own (causal)."""
        cfg = self.config
        t, hd, nkv = q.shape[0], cfg.head_dim, cfg.n_kv_heads
        end = p0 + t
        group = cfg.n_heads // nkv
        qh = q.reshape(t, nkv, group, hd).transpose(1, 2, 0, 3).reshape(nkv, group * t, hd)
        with blas_threads(self.threads):
            scores = qh @ kc[:, :end].transpose(0, 2, 1)  # (n_kv, group*R, end)
        scores *= self.attn_scale
        if self.attn_softcap > 0:
            scores = self.attn_softcap * np.tanh(scores / self.attn_softcap)
        qpos = np.tile(np.arange(p0, end), group)
        hidden = np.arange(end)[None, :] > qpos[:, None]  # the future
        if window:  # and keys at or before p - window
            hidden |= np.arange(end)[None, :] <= qpos[:, None] - window
        scores = np.where(hidden, -np.inf, scores).astype(np.float32)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
        with blas_threads(self.threads):
            return (scores @ vc[:, :end]).reshape(nkv, group, t, hd).transpose(2, 0, 1, 3).reshape(t, cfg.n_heads * hd)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x += y

    def logits(self, x: np.ndarray, out: np.ndarray | None = None, norm: Norm | None = None) -> np.ndarray:
        if norm is not None:  # one token: into buffers.h, free at the step's end
            x = self.norm(x, norm, out=self.buffers.h if x.shape[0] == 1 else None)
        k = self.kernels[id(self.weights.lm_head)]
        if x.shape[0] == 1:
            out = np.empty((1, self.config.vocab_size), np.float32) if out is None else out
            k.gemv(x[0], out[0])
        else:
            y = k.matmul(x)
            if out is None:
                out = y
            else:
                out[...] = y
        self.soft_cap(out)
        return out

    def soft_cap(self, logits: np.ndarray) -> None:
        """logits = c * tanh(logits / c) in place, c the config's logit soft cap (0: unchanged)."""
        cap = np.float32(self.config.logit_softcap)
        if cap > 0:
            np.multiply(np.tanh(np.divide(logits, cap, out=logits), out=logits), cap, out=logits)

    # ---- prefill and evaluation ---------------------------------------------------------------------
    def _activate(self, g: np.ndarray) -> np.ndarray:
        act = self.config.activation
        if act == "silu":
            return g / (1.0 + np.exp(-g))
        if act == "gelu_tanh":
            return cpu_step_ops.gelu_tanh(g)
        if act == "fatrelu":
            return np.where(g >= self.config.act_threshold, g, np.float32(0.0))
        return np.maximum(g, np.float32(0.0))

    def _up(self, x: np.ndarray, layer: Layer, teal: tuple[int, str] | None = None) -> np.ndarray:
        """(T, d) -> (T, N): the up projection, through a ReLU for dReLU."""
        u = self.linear(x, layer.up, teal=teal)
        return np.maximum(u, np.float32(0.0)) if self.config.up_relu else u

    def ffn_parts(self, x: np.ndarray, layer: Layer, teal_layer: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """(T, d) -> (act, hidden) (T, N); with teal_layer, that layer's TEAL thresholds mask the inputs."""
        slot = (lambda p: None) if teal_layer is None else (lambda p: (teal_layer, p))
        act = self._activate(self.linear(x, layer.gate, teal=slot("gate")))
        hidden = act * self._up(x, layer, slot("up")) if layer.up is not None else act
        return act, hidden

    def ffn_down(self, hidden: np.ndarray, layer: Layer, bias: bool = True) -> np.ndarray:
        """(T, N) -> (T, d) over the rows of W_down^T (one token: the compiled accumulation)."""
        k = self.kernels[id(layer.down_t)]
        if hidden.shape[0] == 1:
            y = np.empty((1, self.config.dim), np.float32)
            k.axpy(np.ascontiguousarray(hidden[0]), y[0])
        else:
            y = k.matmul_t(hidden)
        return y + layer.down_b if (bias and layer.down_b is not None) else y

    def _ffn_teal(self, i: int, x: np.ndarray, layer: Layer) -> np.ndarray:
        _, hidden = self.ffn_parts(x, layer, teal_layer=i)
        return self.ffn_down(self._teal_mask(hidden, (i, "down")), layer)

    def ffn_masked(self, i: int, x: np.ndarray, layer: Layer) -> np.ndarray:
        """(T, d) -> (T, d): every token's FFN with its own predicted mask (and TEAL thresholds), dense
        arithmetic masked. Same function as ffn_step token by token; for evaluation, not a fast path."""
        st = self.state
        rule = layer_rule(int(st.predictor[i]), st.alpha[i], st.theta[i])
        if rule is None and st.teal[i, TEAL_SLOT["gate"]:].any():  # TEAL mode (a predictor takes precedence)
            return self._ffn_teal(i, x, layer)
        if rule is None:
            return self.ffn_down(self.ffn_parts(x, layer)[1], layer)
        active = rule.active(x, layer.gate_signs)  # (T, N) bool
        g = self.linear(x, layer.gate)
        h = np.where(active & keep_after_gate(g, self.config.act_threshold), g, np.float32(0.0))
        if layer.up is not None:
            h = h * self._up(x, layer)
        return self.ffn_down(h, layer)

    def write_kv(self, layer: int, k: np.ndarray, v: np.ndarray, pos0: int) -> None:
        t = k.shape[1]
        self.k_cache[layer][:, pos0:pos0 + t] = k
        self.v_cache[layer][:, pos0:pos0 + t] = v

    # ---- decode step ---------------------------------------------------------------------------------
    def ffn_step(self, i: int, x: np.ndarray, layer: Layer, add_to: np.ndarray, mode: str,
                 accumulate: bool = True, norm: bool = False) -> None:
        if norm:
            x = self.norm(x, layer.ffn_norm, out=self.scratch.xn)
        kind = int(self.state.predictor[i]) if mode == "sparse" else 0
        if kind in (SPARSEINFER, PROJECTION):
            self._ffn_sparse(i, x[0], layer, kind)
        else:
            self._ffn_dense(i, x[0], layer, teal=mode == "teal")
        if accumulate:
            add_to[0] += self.scratch.y[:self.config.dim]
        else:
            add_to[0] = self.scratch.y[:self.config.dim]

    def _ffn_dense(self, i: int, xv: np.ndarray, layer: Layer, teal: bool) -> None:
        """x (d,) -> scratch.y[:d]: every row of gate, up and W_down^T (TEAL-masked inputs when teal)."""
        s, n = self.scratch, self.config.ffn_dim
        self.kernels[id(layer.gate.w)].gemv(self._gemv_input(xv, (i, "gate") if teal else None), s.g,
                                            bias=layer.gate.b)
        u = s.u[:0]
        if layer.up is not None:
            u = s.u
            self.kernels[id(layer.up.w)].gemv(self._gemv_input(xv, (i, "up") if teal else None), u,
                                              bias=layer.up.b)
        cpu_step_ops.activate_mul(s.g, u, self.act, self.act_threshold, s.h)
        h = self._gemv_input(s.h, (i, "down") if teal else None)
        self._down(layer, h, None, n)

    def _down(self, layer: Layer, h: np.ndarray, rows: np.ndarray | None, n: int) -> None:
        y = self.scratch.y[:self.config.dim]
        self.kernels[id(layer.down_t)].axpy(h, y, rows, n)
        if layer.down_b is not None:
            y += layer.down_b

    def _ffn_sparse(self, i: int, xv: np.ndarray, layer: Layer, kind: int) -> None:
        """x (d,) -> scratch.y[:d]. Predict from the sign plane, gate over predicted rows, drop rows whose
        gate does not survive the activation, then up over the survivors (dReLU: dropping those whose up is not
        positive) and down over what is left; counters advanced."""
        s, st = self.scratch, self.state
        use_threads(self.predictor_threads)
        if kind == SPARSEINFER:
            n = cpu_predict.sparseinfer(xv, layer.gate_signs, float(st.alpha[i]), s.xs, s.mask, s.idx)
        else:
            n = cpu_predict.projection(xv, self.sign_bytes[i], st.theta[i], s.table, s.z, s.mask, s.idx)
        self.kernels[id(layer.gate.w)].gemv(xv, s.g, s.idx, n, bias=layer.gate.b)
        m = cpu_predict.keep_after_gate(s.g, s.idx, n, self.act_threshold, s.rows, s.h)
        m_up = m  # rows whose up row is read
        if layer.up is not None:
            self.kernels[id(layer.up.w)].gemv(xv, s.u, s.rows, m, bias=layer.up.b)
            if self.config.up_relu:
                m = cpu_predict.keep_positive_up(s.u, s.rows, m, s.h)
            else:
                np.multiply(s.h[:m], s.u[:m], out=s.h[:m])
        self._down(layer, s.h, s.rows, m)
        signs, gate_row, up_row, down_row, dense_bytes = self.ffn_bytes[i]
        read = (signs + (st.theta[i].nbytes if kind == PROJECTION else 0) + gate_row * n + up_row * m_up
                + down_row * m)
        cpu_predict.count_step(st.counters, STEP_COUNTERS, i, n, m, int(read), dense_bytes, m_up - m)
        c = st.counters
        if st.measure_recall:  # evaluation only: the dense gate, on the host
            self.kernels[id(layer.gate.w)].gemv(xv, s.g_all, bias=layer.gate.b)
            truth = keep_after_gate(s.g_all, self.config.act_threshold)
            c[C["true_active"], i] += int(truth.sum())
            c[C["hits"], i] += int((truth & s.mask.astype(bool)).sum())
            c[C["recall_steps"], i] += 1

    def sample(self, logits: np.ndarray) -> None:
        p = self._sampler.p
        row = logits[0]
        if not np.isfinite(row).all():  # (vocab,) checked every token: about 2 us at 4,096
            self.state.token[0] = NO_TOKEN
            return
        greedy = p.temperature == 0 and p.repetition_penalty == 1.0  # the sampler's argmax, without its copy
        # the history the repetition penalty needs is the state's `seen` set (prompt and sampled ids)
        tok = int(np.argmax(row)) if greedy else self._sampler(row, np.flatnonzero(self.state.seen))
        self.state.token[0] = tok
        self.state.seen[tok] = 1

    def advance(self) -> None:
        self.state.pos[0] += 1

    def run_step(self, body: Callable[[], None], mode: str) -> None:
        """One token: the fused step (cpu_fused.py) where it covers the model and mode, else body's ops."""
        use_threads(self.threads)  # numba's thread count is per calling thread (serve runs steps elsewhere)
        with self._between_steps:
            if self.fused is not None and self.fused.covers(mode):
                self.fused.run(mode)
            else:
                body()

    # ---- host interface ------------------------------------------------------------------------------
    def from_host(self, a, dtype) -> np.ndarray:
        return np.asarray(a, dtype=dtype)

    def to_host(self, a: np.ndarray) -> np.ndarray:
        return a

    def release_scratch(self) -> None:
        pass  # numpy returns a batch's temporaries to the allocator as they go

    def begin(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        self.state.pos[0] = 0
        self.state.seen[:] = 0
        self.state.seen[np.asarray(prompt_ids, dtype=np.int64)] = 1
        self._sampler = Sampler(sampling)

    def set_position(self, pos: int) -> None:
        self.state.pos[0] = pos

    def set_token(self, token: int) -> None:
        self.state.token[0] = token

    def read_token(self) -> int:
        return int(self.state.token[0])

    def read_logits(self) -> np.ndarray:
        return self.buffers.logits.copy()

    def set_knobs(self, rules: Sequence[Rule] | None, teal: Sequence[dict[str, float]] | None,
                  measure_recall: bool = False, teal_criterion: str = "teal") -> None:
        with self._between_steps:  # the power watcher's thread: never inside a token the kernels are running
            self._set_knobs(rules, teal, measure_recall, teal_criterion)

    def _set_knobs(self, rules: Sequence[Rule] | None, teal: Sequence[dict[str, float]] | None,
                   measure_recall: bool, teal_criterion: str) -> None:
        cfg = self.config
        thresholds = teal_array(teal, cfg.n_layers)
        self._make_columns(thresholds)  # first: a setting whose copies do not fit changes nothing
        self.state.predictor[:], self.state.alpha[:], self.state.theta[:] = knob_arrays(rules, cfg.n_layers,
                                                                                        cfg.ffn_dim)
        self.state.teal[:] = thresholds
        if teal is not None and teal_criterion != self._teal_criterion:
            self.state.teal_scale[:] = teal_scale_array(self.weights, teal_criterion, cfg)
            self._teal_criterion = teal_criterion
        self.state.measure_recall = measure_recall

    def _make_columns(self, thresholds: np.ndarray) -> None:
        """W^T for the column skipping of every projection a threshold in `thresholds` (L, 7) turns on and
        that has none yet: made now, never in a step, after checking that the copies fit the memory free."""
        todo = [lin.w for i, layer in enumerate(self.weights.layers) for p in ATTENTION
                if thresholds[i, TEAL_SLOT[p]] > 0 and column_layout((lin := getattr(layer, p)).w) is not None
                and id(lin.w) not in self.columns]
        require_room(sum(w.arrays["q" if w.encoding == "int8" else "w"].nbytes for w in todo),
                     available_memory_bytes(),
                     f"transposed copies of {len(todo)} attention weights for TEAL column skipping")
        for w in todo:
            self.columns[id(w)] = ColumnKernels(w, self.threads)
        if todo and self.fused is not None:
            self.fused.bind()

    def read_stats(self) -> FFNStats:
        self.stats_reads += 1
        return FFNStats(self.config.n_layers, self.config.ffn_dim, counts=self.state.counters.copy())

    def reset_stats(self) -> None:
        self.state.counters[:] = 0

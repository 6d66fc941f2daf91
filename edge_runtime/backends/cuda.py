"""The cuda backend: the contract of backends/base.py on an NVIDIA GPU through CuPy RawKernels.

Weights are uploaded once in their stored encodings; the KV cache lives on the device. Prefill runs eager
CuPy (matrices through cuBLAS). A decode step is the decoder's `_step`: the first of each (mode, per-layer
predictor kinds, TEAL products) runs eagerly, so that modules compile and load outside any capture; the
second is captured as a CUDA graph, which is then replayed every token. The token id and position live in
the step buffer, the knobs (alpha, thresholds, TEAL) in device arrays the graph reads, the FFN statistics in
device counters. Per token the host copies back 4 bytes (the sampled id).

All of the backend's work is issued on its own stream (every public method runs inside `with self.stream`).
The stream is a blocking one, so it is also ordered with anything a caller issues on CuPy's default stream.
Every read to the host waits for the stream first: a copy CuPy makes on another stream would not see the
step. Under the CPU emulator everything runs at issue time, so none of this ordering can be tested there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import numpy as np

import edge_runtime.backends.cuda_batched as eager
from edge_runtime.backends.base import (
    DENSE,
    PROJECTION,
    DecodeState,
    input_width_max,
    knob_arrays,
    layer_rule,
    teal_array,
    teal_scale_array,
)
from edge_runtime.backends.cuda_ops.attention import DecodeAttention
from edge_runtime.backends.cuda_ops.common import STEP_POS, STEP_RNG, STEP_SIZE, STEP_TOKEN, capture_graph, cupy
from edge_runtime.backends.cuda_ops.elementwise import Elementwise
from edge_runtime.backends.cuda_ops.embed import EmbedKernel
from edge_runtime.backends.cuda_ops.gemv import Gemv, compatible
from edge_runtime.backends.cuda_ops.kv_cache import KVAppendKernel
from edge_runtime.backends.cuda_ops.norm import NormKernel
from edge_runtime.backends.cuda_ops.sampling import SampleKernel, param_arrays
from edge_runtime.backends.cuda_ops.sparse_ffn import SparseFFNKernels
from edge_runtime.backends.cuda_ops.teal import TealGemv
from edge_runtime.backends.cuda_weights import DeviceWeights
from edge_runtime.backends.room import require_room
from edge_runtime.backends.weights import ATTENTION, PROJECTIONS, Layer, Linear, Norm, linear_read_bytes, weights_of
from edge_runtime.devices.planner import available_memory_bytes
from edge_runtime.model.rope import rope_tables
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.pack.loader import PackedModel
from edge_runtime.sparsity.predictor import Rule, keep_after_gate
from edge_runtime.sparsity.stats import FIELDS, FFNStats

TEAL_SLOT = {p: j for j, p in enumerate(PROJECTIONS)}
QKV = ("q", "k", "v")
KIND_NAME = {1: "sparseinfer", 2: "projection"}
SCRATCH_KEEP = 64 << 20  # pool bytes a prefill may leave cached for the next one (a cudaMalloc saved)


def _on_own_stream(cls):
    """Wrap every public method so that the work it issues goes to the instance's stream."""
    def wrap(fn):
        @functools.wraps(fn)
        def on_stream(self, *args, **kwargs):
            with self.stream:
                return fn(self, *args, **kwargs)
        return on_stream

    for name, fn in list(vars(cls).items()):
        if callable(fn) and not name.startswith("_"):
            setattr(cls, name, wrap(fn))
    return cls


@_on_own_stream
class CudaBackend:
    name = "cuda"

    def __init__(self, model: PackedModel, max_context: int, kv_dtype: str = "auto", use_graphs: bool = True):
        cp = self.cp = cupy()
        cfg = self.config = model.config
        self.max_context = max_context
        self.use_graphs = use_graphs  # False: every step eager (debugging, and the graph-equivalence test)
        self.dense_skips_zero_rows = True  # dense ReLU-family steps skip up/down rows whose gate is an exact zero
        self.weights = weights_of(model)
        self.dev = DeviceWeights(self.weights)
        self._index = {id(layer): i for i, layer in enumerate(self.weights.layers)}  # host Layer -> device twin
        # blocking: ordered with CuPy's legacy default stream, which a caller (or CuPy itself) may copy on
        self.stream = cp.cuda.Stream(non_blocking=False)
        self.k = SimpleNamespace(gemv=Gemv(), ffn=SparseFFNKernels(), norm=NormKernel(),
                                 kv=KVAppendKernel(), embed=EmbedKernel(), ew=Elementwise(), sample=SampleKernel(),
                                 teal=TealGemv(),
                                 attn=DecodeAttention(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, max_context,
                                                      scale=cfg.attn_scale, softcap=cfg.attn_softcap))
        cos, sin = rope_tables(cfg, max_context)  # (ctx, head_dim/2) float32
        self.cos, self.sin = cp.asarray(cos), cp.asarray(sin)
        if kv_dtype == "auto":  # fp16 halves the cache on a Jetson; fp32 models are exact references
            kv_dtype = "fp32" if model.manifest.get("encoding") == "fp32" else "fp16"
        kv = cp.float32 if kv_dtype == "fp32" else cp.float16
        shape = (cfg.n_layers, cfg.n_kv_heads, max_context, cfg.head_dim)  # (layer, kv_head, position, head_dim)
        self.k_cache, self.v_cache = cp.zeros(shape, dtype=kv), cp.zeros(shape, dtype=kv)
        n, d, v = cfg.ffn_dim, cfg.dim, cfg.vocab_size
        self.step = cp.zeros(STEP_SIZE, dtype=cp.int32)  # [token, pos, rng counter, spare]
        self.state = DecodeState(
            token=self.step[STEP_TOKEN:STEP_TOKEN + 1], pos=self.step[STEP_POS:STEP_POS + 1],
            predictor=np.zeros(cfg.n_layers, dtype=np.int32),  # host: the kernels a graph holds depend on it
            alpha=cp.ones(cfg.n_layers, dtype=cp.float32), theta=cp.zeros((cfg.n_layers, n), dtype=cp.float32),
            teal=cp.zeros((cfg.n_layers, len(PROJECTIONS)), dtype=cp.float32),
            teal_scale=cp.ones((cfg.n_layers, len(PROJECTIONS), input_width_max(cfg)), dtype=cp.float32),
            counters=np.zeros((len(FIELDS), cfg.n_layers), dtype=np.int64),  # host, filled by read_stats
            seen=cp.zeros(v, dtype=cp.uint8))
        f32 = cp.float32
        hq, hkv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.buffers = SimpleNamespace(x=cp.zeros((1, d), f32), h=cp.zeros((1, d), f32), q=cp.zeros((1, hq), f32),
                                       k=cp.zeros((1, hkv), f32), v=cp.zeros((1, hkv), f32), a=cp.zeros((1, hq), f32),
                                       logits=cp.zeros((1, v), f32))
        # FFN scratch shared by every layer (one layer runs at a time)
        self.f = SimpleNamespace(xn=cp.zeros(d, f32), x_signs=cp.zeros(-(-d // 32), cp.uint32),
                                 x_sum=cp.zeros(1, f32), counters=cp.zeros(2, cp.int32), idx=cp.zeros(n, cp.int32),
                                 h=cp.zeros(n, f32), g=cp.zeros(n, f32), u=cp.zeros(n, f32),
                                 zero=cp.zeros(1, f32), every_row=cp.full(1, np.inf, f32))
        self.ffn_stats = cp.zeros((cfg.n_layers, 2), dtype=cp.uint64)  # {predicted, kept} per layer, sparse steps
        self.dense_counts = cp.zeros((cfg.n_layers, 2), dtype=cp.uint64)  # the same from dense steps: not reported
        self.up_dropped = cp.zeros((2, cfg.n_layers), dtype=cp.uint64)  # dReLU rows dropped for up <= 0: sparse, dense
        self.ffn_steps = np.zeros((cfg.n_layers, 3), dtype=np.int64)  # host: sparse steps per kind (dense, si, proj)
        # TEAL on q, k, v, o: which thresholds are set (host: the kernels a graph holds depend on it), the input
        # channels kept (device, counted by the kernel) and the steps run with the threshold set or not (host)
        self.teal_on = np.zeros((cfg.n_layers, len(PROJECTIONS)), dtype=bool)
        self.attn_kept = cp.zeros((cfg.n_layers, len(ATTENTION)), dtype=cp.uint64)
        self.attn_steps = np.zeros((cfg.n_layers, len(ATTENTION), 2), dtype=np.int64)  # [..., 0 dense / 1 TEAL]
        self.sampling = SimpleNamespace(params=cp.zeros(4, f32), iparams=cp.zeros(4, cp.int32),
                                        work=cp.zeros(v, f32), ids=cp.zeros(max_context, cp.int32))
        self._graphs: dict[tuple, object] = {}
        self._ran_eagerly: set[tuple] = set()  # step keys whose first step ran eagerly: the next one is captured
        self._in_step = False
        self.stats_reads = 0
        self._teal_criterion = "teal"  # what state.teal_scale holds (allocated as ones)

    # ---- ops: a decode step (out given, kernels) or a batch (out None, eager CuPy) ------------------------
    def embed_tokens(self, ids, positions, out=None):
        if out is None:
            dw = self.dev
            x = eager.dense_f32(dw.embed, dw.embed_host, ids)
            if self.config.embed_scale != 1.0:
                x *= np.float32(self.config.embed_scale)
            if dw.pos_embed is not None:
                x += eager.dense_f32(dw.pos_embed, dw.pos_embed_host, positions + self.config.pos_offset)
            return x
        y = out.reshape(-1)
        self.k.embed(self.dev.embed, self.step, y, slot=STEP_TOKEN, scale=self.config.embed_scale)
        if self.dev.pos_embed is not None:  # OPT: learned positions, read at step[POS] + offset
            self.k.embed(self.dev.pos_embed, self.step, y, slot=STEP_POS, offset=self.config.pos_offset,
                         accumulate=True)
        return out

    def norm(self, x, n: Norm, out=None):
        dn = self.dev.of(n)
        if out is None:
            return eager.rms_or_layer_norm(x, dn.w, dn.b, dn.eps)
        self.k.norm(x.reshape(-1), dn.w, dn.b, dn.eps, out.reshape(-1))
        return out

    def _fused_norm(self, n: Norm | None) -> tuple:
        """(norm_w, norm_b, eps) for a kernel that norms x as it loads it; (None, None, 0.0): no norm."""
        if n is None:
            return None, None, 0.0
        dn = self.dev.of(n)
        return dn.w, dn.b, dn.eps

    def _teal_set(self, i: int, projections) -> bool:
        """Whether layer i has a TEAL threshold on any of these projections: those need W^T column kernels, so
        they cannot share a fused row-kernel launch."""
        return bool(self.teal_on[i, [TEAL_SLOT[p] for p in projections]].any())

    def _teal_threshold(self, teal: tuple[int, str]):
        i, p = teal
        return self.state.teal[i, TEAL_SLOT[p]:TEAL_SLOT[p] + 1]  # (1,) device view

    def _teal_scale(self, teal: tuple[int, str], k: int):
        """(k,) device view: the criterion's channel factors (ones: TEAL, column norms: WINA)."""
        return self.state.teal_scale[teal[0], TEAL_SLOT[teal[1]], :k]

    def linear(self, x, lin: Linear, out=None, teal: tuple[int, str] | None = None, add_to=None):
        dl = self.dev.of(lin)
        if (out is None and add_to is None) or x.shape[0] > 1:  # a batch: eager CuPy, cuBLAS
            if teal is not None:
                t = self._teal_threshold(teal)
                x = self.cp.where(self.cp.abs(x) * self._teal_scale(teal, x.shape[1]) >= t, x, np.float32(0.0))
            y = self.cp.matmul(x, eager.dense_f32(dl.m, dl.host).T)
            if dl.b is not None:
                y += dl.b
            if add_to is not None:
                add_to += y
                return add_to
            return y
        xv = x.reshape(-1)
        if teal is not None and self.teal_on[teal[0], TEAL_SLOT[teal[1]]]:  # skipped channels: skipped rows of W^T
            y = add_to if add_to is not None else out
            i, p = teal
            kept = self.attn_kept[i, ATTENTION.index(p):ATTENTION.index(p) + 1] if p in ATTENTION else None
            self.k.teal(dl.transposed(), xv, self._teal_scale(teal, xv.shape[0]), self._teal_threshold(teal),
                        y.reshape(-1), bias=dl.b, accumulate=add_to is not None, kept=kept)
            return y
        if add_to is not None:
            self.k.gemv(dl.m, xv, add_to.reshape(-1), bias=dl.b, residual=add_to.reshape(-1))
            return add_to
        self.k.gemv(dl.m, xv, out.reshape(-1), bias=dl.b)
        return out

    def attention_inputs(self, i: int, x, layer: Layer, teal: bool) -> tuple:
        b = self.buffers
        lins = tuple(getattr(layer, p) for p in QKV)
        devs = tuple(self.dev.of(lin) for lin in lins)
        if not (teal and self._teal_set(i, QKV)) and compatible(tuple(d.m for d in devs)):
            # normed as each block loads x: one launch for the norm and all three
            self.k.gemv.stacked(tuple(d.m for d in devs), x.reshape(-1), (b.q.reshape(-1), b.k.reshape(-1),
                                b.v.reshape(-1)), tuple(d.b for d in devs), *self._fused_norm(layer.attn_norm))
            return b.q, b.k, b.v
        h = self.norm(x, layer.attn_norm, out=b.h)  # a TEAL threshold set, or mixed encodings: one at a time
        return tuple(self.linear(h, lin, out=getattr(b, p), teal=(i, p) if teal else None)
                     for p, lin in zip(QKV, lins, strict=True))

    def attention(self, layer: int, q, k, v, positions, out=None, rope: bool = False):
        cfg = self.config
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        if out is None:
            if rope:
                eager.rope(q, self.cos, self.sin, positions, cfg.n_heads, cfg.head_dim)
                eager.rope(k, self.cos, self.sin, positions, cfg.n_kv_heads, cfg.head_dim)
            pos0 = int(self._host(positions[:1])[0])
            return eager.causal_attention(q, k, v, kc, vc, pos0, cfg.n_heads, cfg.head_dim, cfg.attn_scale,
                                          cfg.attn_softcap, cfg.window(layer))
        # rope: k rotated as it is appended, q as the attention loads it (no launch of their own; q stays as it is)
        cos, sin = (self.cos, self.sin) if rope else (None, None)
        self.k.kv(k.reshape(-1), v.reshape(-1), cos, sin, self.step, kc, vc)
        self.k.attn(q.reshape(-1), kc, vc, self.step, out.reshape(-1), window=cfg.window(layer), cos=cos, sin=sin)
        return out

    def add(self, x, y) -> None:
        if x.shape[0] > 1 or not self._in_step:
            x += y
            return
        self.k.ew.add(x.reshape(-1), y.reshape(-1))

    def logits(self, x, out=None, norm: Norm | None = None):
        dw, cap = self.dev, self.config.logit_softcap
        # a prompt's last token takes the GEMV on the stored head; the batch path below widens all of it to fp32
        # (vocab x d: 0.5 GB at 7B shapes), for several rows only
        if out is None and x.shape[0] == 1:
            out = self.cp.empty((1, self.config.vocab_size), dtype=self.cp.float32)
        if out is None:
            if norm is not None:
                x = self.norm(x, norm)
            y = self.cp.matmul(x, eager.dense_f32(dw.lm_head, dw.lm_head_host).T)
            return np.float32(cap) * self.cp.tanh(y / np.float32(cap)) if cap > 0 else y
        w, b, eps = self._fused_norm(norm)  # the final norm fused into the head's x load
        self.k.gemv(dw.lm_head, x.reshape(-1), out.reshape(-1), norm_w=w, norm_b=b, eps=eps)
        if cap > 0:
            self.k.ew.softcap(out.reshape(-1), cap)
        return out

    # ---- prefill and evaluation (eager) ----------------------------------------------------------------
    def _activate(self, g):
        return eager.activate(g, self.config.activation, self.config.act_threshold)

    def ffn_parts(self, x, layer: Layer, teal_layer: int | None = None):
        slot = (lambda p: None) if teal_layer is None else (lambda p: (teal_layer, p))
        act = self._activate(self.linear(x, layer.gate, teal=slot("gate")))
        hidden = act * self._up(x, layer, slot("up")) if layer.up is not None else act
        return act, hidden

    def _up(self, x, layer: Layer, teal: tuple[int, str] | None = None):
        """(T, d) -> (T, N): the up projection, through a ReLU for dReLU."""
        u = self.linear(x, layer.up, teal=teal)
        return self.cp.maximum(u, np.float32(0.0)) if self.config.up_relu else u

    def ffn_down(self, hidden, layer: Layer, bias: bool = True):
        dl = self.dev.layers[self._index[id(layer)]]
        y = self.cp.matmul(hidden, eager.dense_f32(dl.down_t, dl.down_host))
        return y + dl.down_b if (bias and dl.down_b is not None) else y

    def ffn_masked(self, i: int, x, layer: Layer):
        """Evaluation path: the predicted masks are computed by the numpy predictor on the host (one copy of
        x per layer), the FFN on the device."""
        cp = self.cp
        st = self.state
        rule = layer_rule(int(st.predictor[i]), self._host(st.alpha[i]), self._host(st.theta[i]))
        if rule is None and self.teal_on[i, TEAL_SLOT["gate"]:].any():  # TEAL mode (a predictor takes precedence)
            _, hidden = self.ffn_parts(x, layer, teal_layer=i)
            t, s = self._teal_threshold((i, "down")), self._teal_scale((i, "down"), hidden.shape[1])
            return self.ffn_down(cp.where(cp.abs(hidden) * s >= t, hidden, np.float32(0.0)), layer)
        if rule is None:
            return self.ffn_down(self.ffn_parts(x, layer)[1], layer)
        active = cp.asarray(rule.active(self._host(x), layer.gate_signs))
        g = self.linear(x, layer.gate)
        h = cp.where(active & keep_after_gate(g, self.config.act_threshold), g, np.float32(0.0))
        if layer.up is not None:
            h = h * self._up(x, layer)
        return self.ffn_down(h, layer)

    def write_kv(self, layer: int, k, v, pos0: int) -> None:
        t = k.shape[1]
        self.k_cache[layer][:, pos0:pos0 + t] = k.astype(self.k_cache.dtype)
        self.v_cache[layer][:, pos0:pos0 + t] = v.astype(self.v_cache.dtype)

    # ---- decode step -------------------------------------------------------------------------------------
    def ffn_step(self, i: int, x, layer: Layer, add_to, mode: str, accumulate: bool = True,
                 norm: bool = False) -> None:
        dl, f, cfg = self.dev.layers[i], self.f, self.config
        xv, y = x.reshape(-1), add_to.reshape(-1)
        residual = y if accumulate else None
        kind = int(self.state.predictor[i]) if mode == "sparse" else DENSE
        norm_w, norm_b, eps = self._fused_norm(layer.ffn_norm if norm else None)
        if kind != DENSE or (mode == "dense" and cfg.relu_family and self.dense_skips_zero_rows):
            # A dense ReLU-family FFN is the sparse one with every row predicted: rows whose gate does not
            # survive the activation are exact zeros, so up and down still skip them (dense_skips_zero_rows False:
            # every weight read, the GEMV baseline a sparse decode is measured against).
            gate_b, up_b = dl.gate.b, (dl.up.b if dl.up else None)
            knob = (f.every_row if kind == DENSE else self.state.alpha[i:i + 1] if kind != PROJECTION
                    else self.state.theta[i])
            self.k.ffn.prepare(xv, norm_w, norm_b, eps, residual, dl.down_b, f.xn, f.x_signs, f.x_sum, f.counters,
                               y)  # the FFN norm (norm=True) fused here
            self.k.ffn.gate(KIND_NAME.get(kind, "sparseinfer"), dl.gate.m, dl.up.m if dl.up else None, gate_b, up_b,
                            f.xn, f.x_signs, f.x_sum, dl.gate_signs, knob, cfg.act_threshold, f.idx, f.h, f.counters,
                            up_relu=cfg.up_relu, up_dropped=self.up_dropped[int(kind == DENSE), i:i + 1])
            self.k.ffn.down(dl.down_t, f.idx, f.h, f.counters, self.ffn_stats if kind != DENSE else self.dense_counts,
                            i, y)
            return
        teal = mode == "teal"
        g, u = f.g, f.u
        teal_in = teal and self._teal_set(i, ("gate", "up"))
        if not teal_in and dl.up is None:  # OPT's fc1, the norm fused into its x load
            self.k.gemv(dl.gate.m, xv, g, bias=dl.gate.b, norm_w=norm_w, norm_b=norm_b, eps=eps)
        elif not teal_in and compatible((dl.gate.m, dl.up.m)):  # gate and up in one launch, the norm fused
            self.k.gemv.stacked((dl.gate.m, dl.up.m), xv, (g, u), (dl.gate.b, dl.up.b), norm_w, norm_b, eps)
        else:  # TEAL thresholds on gate or up (or mixed encodings): the norm, then one projection at a time
            if norm:
                x = self.norm(x, layer.ffn_norm, out=f.xn[None])
            self.linear(x, layer.gate, out=g[None], teal=(i, "gate") if teal else None)
            if layer.up is not None:
                self.linear(x, layer.up, out=u[None], teal=(i, "up") if teal else None)
        self.k.ew.act_mul(g, u if layer.up is not None else None, f.h, cfg.activation, cfg.act_threshold)
        thr = self._teal_threshold((i, "down")) if teal else f.zero
        xs = self._teal_scale((i, "down"), cfg.ffn_dim)
        self.k.teal(dl.down_t, f.h, xs, thr, y, bias=dl.down_b, accumulate=accumulate)  # W_down^T: a row per neuron

    def sample(self, logits) -> None:
        s = self.sampling
        self.k.sample(logits.reshape(-1), s.params, s.iparams, self.state.seen, s.work, self.step, s.ids)

    def advance(self) -> None:
        self.k.ew.advance(self.step)

    def run_step(self, body: Callable[[], None], mode: str) -> None:
        kinds = tuple(int(k) for k in self.state.predictor) if mode == "sparse" else ()
        for i, kind in enumerate(kinds):
            self.ffn_steps[i, kind] += 1
        teal_on = self.teal_on if mode != "dense" else np.zeros_like(self.teal_on)
        if mode != "dense":
            on = teal_on[:, :len(ATTENTION)].astype(np.int64)
            self.attn_steps[:, :, 1] += on
            self.attn_steps[:, :, 0] += 1 - on
        if not self.use_graphs:  # (on self.stream: every public method is, see _on_own_stream)
            self._issue(body)
            return
        key = (mode, kinds, teal_on.tobytes(), self.dense_skips_zero_rows)  # what the step holds; knobs: memory
        graph = self._graphs.get(key)
        if graph is None and key not in self._ran_eagerly:
            self._ran_eagerly.add(key)  # compiles, module loads and attributes happen here, not in a capture
            self._issue(body)
            return
        if graph is None:
            graph = self._graphs[key] = capture_graph(self.stream, lambda: self._issue(body))
        graph.launch(self.stream)

    def _issue(self, body: Callable[[], None]) -> None:
        self._in_step = True
        try:
            body()
        finally:
            self._in_step = False

    def _host(self, a) -> np.ndarray:
        """a device array copied to the host after the stream's work is done."""
        self.stream.synchronize()
        return self.cp.asnumpy(a)

    # ---- host interface ----------------------------------------------------------------------------------
    def from_host(self, a, dtype):
        return self.cp.asarray(np.asarray(a, dtype=dtype))

    def to_host(self, a) -> np.ndarray:
        return self._host(a)

    def release_scratch(self) -> None:
        """A prompt's working copies (fp32 weights for cuBLAS: 180 MB for a 7B FFN matrix; its attention scores)
        stay in CuPy's pool after it, held from the rest of the board on a Jetson's shared memory and not in the
        load plan: past SCRATCH_KEEP they go back. Never inside a captured step, which allocates nothing."""
        pool = self.cp.get_default_memory_pool()
        if pool.free_bytes() > SCRATCH_KEEP:
            pool.free_all_blocks()

    def begin(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        cp = self.cp
        seed = sampling.seed if sampling.seed is not None else int(np.random.default_rng().integers(1 << 62))
        params, iparams = param_arrays(sampling, seed)
        self.sampling.params[...] = cp.asarray(params)
        self.sampling.iparams[...] = cp.asarray(iparams)
        seen = np.zeros(self.config.vocab_size, dtype=np.uint8)
        seen[np.asarray(prompt_ids, dtype=np.int64)] = 1
        self.state.seen[...] = cp.asarray(seen)
        self.step[STEP_RNG:STEP_RNG + 1] = cp.asarray(np.zeros(1, np.int32))
        self.set_position(0)

    def set_position(self, pos: int) -> None:
        self.step[STEP_POS:STEP_POS + 1] = self.cp.asarray(np.array([pos], np.int32))

    def set_token(self, token: int) -> None:
        self.step[STEP_TOKEN:STEP_TOKEN + 1] = self.cp.asarray(np.array([token], np.int32))

    def read_token(self) -> int:
        return int(self._host(self.step[STEP_TOKEN:STEP_TOKEN + 1])[0])  # the step's one 4-byte copy

    def read_logits(self) -> np.ndarray:
        return self._host(self.buffers.logits)

    def set_knobs(self, rules: Sequence[Rule] | None, teal: Sequence[dict[str, float]] | None,
                  measure_recall: bool = False, teal_criterion: str = "teal") -> None:
        """Device knobs written in place (a captured graph reads them at its next replay). Recall needs the dense
        gate and is counted by the cpu backend only."""
        cfg, cp = self.config, self.cp
        thresholds = teal_array(teal, cfg.n_layers)
        self._make_transposed(thresholds)  # first: a setting whose copies do not fit changes nothing
        kind, alpha, theta = knob_arrays(rules, cfg.n_layers, cfg.ffn_dim)
        self.state.predictor[:] = kind
        self.state.alpha[...] = cp.asarray(alpha)
        self.state.theta[...] = cp.asarray(theta)
        self.state.teal[...] = cp.asarray(thresholds)
        self.teal_on[...] = thresholds > 0
        if teal is not None and teal_criterion != self._teal_criterion:
            self.state.teal_scale[...] = cp.asarray(teal_scale_array(self.weights, teal_criterion, cfg))
            self._teal_criterion = teal_criterion
        self.state.measure_recall = measure_recall

    def _make_transposed(self, thresholds: np.ndarray) -> None:
        """W^T of every projection a threshold in `thresholds` (L, 7) turns on and that has none yet: made now,
        never inside a captured step, after checking that the copies fit the device memory free (on a Jetson
        the board's memory: an int4 weight's copy is fp16, four times its size)."""
        todo = [d for i, layer in enumerate(self.weights.layers) for p in PROJECTIONS[:6]
                if (lin := getattr(layer, p)) is not None and thresholds[i, TEAL_SLOT[p]] > 0
                and (d := self.dev.of(lin)).t is None]
        require_room(sum(d.transposed_bytes() for d in todo), self._free_bytes(),
                     f"transposed copies of {len(todo)} weights for TEAL column skipping")
        for d in todo:
            d.transposed()

    def _free_bytes(self) -> int:
        """Device memory a new allocation can have: the pool's free blocks plus what the device has free. An
        integrated GPU (Jetson) allocates from the board's memory, where cudaMemGetInfo leaves out the page cache
        the OS would hand back (the mmap'd weight files fill it), so the OS's `available` is asked there."""
        cp = self.cp
        if cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["integrated"]:
            free = available_memory_bytes()
        else:
            free = cp.cuda.runtime.memGetInfo()[0]
        return int(free) + cp.get_default_memory_pool().free_bytes()

    def read_stats(self) -> FFNStats:
        """Counters from the device ({predicted, kept} per layer) and the host's step counts per predictor kind;
        bytes follow from them and the weights' row sizes."""
        self.stats_reads += 1
        cfg = self.config
        dev = self._host(self.ffn_stats).astype(np.int64)  # (L, 2)
        up_dropped = self._host(self.up_dropped[0]).astype(np.int64)  # (L,) sparse steps only
        s = FFNStats(cfg.n_layers, cfg.ffn_dim)
        for i, layer in enumerate(self.weights.layers):
            steps = int(self.ffn_steps[i, 1:].sum())
            s.steps[i], s.predicted[i], s.kept[i], s.up_dropped[i] = steps, dev[i, 0], dev[i, 1], up_dropped[i]
            s.bytes_read[i] = int(layer.ffn_read_bytes(steps, dev[i, 0], dev[i, 1], self.ffn_steps[i, PROJECTION],
                                                       up_dropped[i]))
            s.bytes_dense[i] = steps * layer.ffn_dense_bytes()
        kept = self._host(self.attn_kept).astype(np.int64)  # (L, 4)
        for i, layer in enumerate(self.weights.layers):
            for j, p in enumerate(ATTENTION):
                w = getattr(layer, p).w
                dense, on = self.attn_steps[i, j]
                s.attn_bytes_read[i] += int(linear_read_bytes(w, None, dense) + linear_read_bytes(w, kept[i, j], on))
                s.attn_bytes_dense[i] += int((dense + on) * w.nbytes)
        self.state.counters[...] = s.counts
        return s

    def reset_stats(self) -> None:
        self.ffn_stats.fill(0)
        self.up_dropped.fill(0)
        self.ffn_steps[...] = 0
        self.attn_kept.fill(0)
        self.attn_steps[...] = 0

    def free(self) -> None:
        """Release device memory (weights, cache, graphs) to the device, not only to CuPy's pool, where the next
        model, or transformers in a benchmark, could not have it. The stream is drained first: a replayed step
        still running must not have its buffers handed on."""
        self.stream.synchronize()
        self._graphs.clear()
        self.dev.free()
        self.k.attn.free()
        self.k_cache = self.v_cache = None
        self.cp.get_default_memory_pool().free_all_blocks()

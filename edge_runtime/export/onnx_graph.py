"""The dense forward of a packed model as one ONNX graph, built from the packed weights (no torch).

Graph interface (batch 1; T = new tokens, P = past length, S = P + T; all float tensors float32):
  inputs   input_ids          (1, T)              int64
           start_pos          (1,)                int64   position of input_ids[0]; equals P
           past_key_{i}       (1, n_kv, P, hd)    K after RoPE, the numpy backend's k_cache[i][:, :P]
           past_value_{i}     (1, n_kv, P, hd)
  outputs  logits             (1, T, vocab)       or (1, 1, vocab) with logits="last"
           present_key_{i}    (1, n_kv, S, hd)    past followed by this call's K
           present_value_{i}  (1, n_kv, S, hd)
Inside, activations are (T, features): batch 1 is dropped at the input and restored at the outputs.
Semantics follow backends/cpu.py op for op (RMSNorm / LayerNorm, rotate_half RoPE from rope.py's
tables, GQA causal attention, act(gate x) * (up x) then down, OPT's learned positions and biases).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from onnx import TensorProto

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.export.onnx_builder import GraphBuilder
from edge_runtime.export.onnx_weights import EXPORT_DTYPES, float_vector, float_weight
from edge_runtime.model.rope import rope_tables
from edge_runtime.pack.loader import PackedModel

EXPORTER_VERSION = 1  # bump when the graph changes: cached exports carry it in their key
LOGITS = ("all", "last")
FLOAT = TensorProto.FLOAT


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "fp32"  # one of EXPORT_DTYPES: how matrices are stored (see onnx_weights)
    max_context: int | None = None  # RoPE table rows (OPT keeps its learned table); None = max_positions
    logits: str = "all"  # "all" positions, or the "last" one only (prefill needs no more)

    def __post_init__(self) -> None:
        if self.dtype not in EXPORT_DTYPES:
            raise EdgeRuntimeError(f"unknown ONNX export dtype {self.dtype!r}; choose {', '.join(EXPORT_DTYPES)}")
        if self.logits not in LOGITS:
            raise EdgeRuntimeError(f"unknown logits option {self.logits!r}; choose {', '.join(LOGITS)}")
        if self.max_context is not None and self.max_context < 1:
            raise EdgeRuntimeError(f"--max-context must be >= 1, got {self.max_context}")

    @property
    def opset(self) -> int:
        """17 (TensorRT 8.6 on JetPack 5/6.0 parses up to 17); blocked DequantizeLinear needs 21."""
        return 21 if self.dtype == "packed" else 17

    def as_dict(self) -> dict:
        return {**asdict(self), "opset": self.opset, "exporter_version": EXPORTER_VERSION}


class _Net:
    """Graph state shared by the blocks: builder, model, options, and per-call tensors."""

    def __init__(self, g: GraphBuilder, model: PackedModel, opts: ExportOptions):
        self.g, self.model, self.cfg, self.opts = g, model, model.config, opts
        self.embed_table: str | None = None  # (vocab, d) float32, set by embed(); a tied head reuses it

    def weight(self, name: str, transpose: bool = True) -> str:
        return float_weight(self.g, name, self.model.matrices[name], self.opts.dtype, transpose)

    def vector(self, name: str) -> str | None:
        v = self.model.vectors.get(name)
        return None if v is None else float_vector(self.g, name, v)


def linear(n: _Net, x: str, name: str) -> str:
    """x (T, K) -> x W^T + b (T, N); W is the packed (N, K) matrix `name`, b the vector `name`_bias."""
    y = n.g.op("MatMul", x, n.weight(name))
    b = n.vector(name + "_bias")
    return y if b is None else n.g.op("Add", y, b)


def norm(n: _Net, x: str, prefix: str) -> str:
    """(T, d) -> (T, d): LayerNorm when the model stores a bias (OPT), else RMSNorm, eps from config."""
    g, eps = n.g, n.cfg.norm_eps
    w, b = n.vector(prefix + ".weight"), n.vector(prefix + ".bias")
    if b is not None:
        return g.op("LayerNormalization", x, w, b, axis=-1, epsilon=eps)
    ms = g.reduce_mean_last(g.op("Mul", x, x))  # (T, 1)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, g.const(eps, np.float32))))
    return g.op("Mul", g.op("Mul", x, inv), w)


def embed(n: _Net, ids: str, positions: str) -> str:
    """ids, positions (T,) int64 -> (T, d): token rows, plus OPT's learned positions at pos + offset."""
    g = n.g
    n.embed_table = n.weight("embed", transpose=False)
    x = g.op("Gather", n.embed_table, ids, axis=0)
    if "pos_embed" in n.model.matrices:
        pos = g.op("Add", positions, g.const(n.cfg.pos_offset))
        x = g.op("Add", x, g.op("Gather", n.weight("pos_embed", transpose=False), pos, axis=0))
    return x


def rope(n: _Net, x: str, cos: str, sin: str) -> str:
    """x (heads, T, hd), cos/sin (T, hd/2) -> rotated (heads, T, hd): HF rotate_half over the halves."""
    g, half = n.g, n.cfg.head_dim // 2
    axis = g.const([2])
    x1 = g.op("Slice", x, g.const([0]), g.const([half]), axis)
    x2 = g.op("Slice", x, g.const([half]), g.const([2 * half]), axis)
    lo = g.op("Sub", g.op("Mul", x1, cos), g.op("Mul", x2, sin))
    hi = g.op("Add", g.op("Mul", x2, cos), g.op("Mul", x1, sin))
    return g.op("Concat", lo, hi, axis=-1)


def heads(n: _Net, x: str, count: int) -> str:
    """(T, count * hd) -> (count, T, hd)."""
    g = n.g
    return g.op("Transpose", g.op("Reshape", x, g.const([-1, count, n.cfg.head_dim])), perm=[1, 0, 2])


def attention(n: _Net, i: int, h: str, positions: str, cos: str | None, sin: str | None,
              past_k: str, past_v: str) -> tuple[str, str, str]:
    """Layer i's attention on the normed h (T, d). Returns (o-projected output (T, d), present K,
    present V (1, n_kv, S, hd)). Causal over S = P + T keys: query at position p sees keys 0..p."""
    g, cfg = n.g, n.cfg
    nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    p = f"layers.{i}.attn."
    q = heads(n, linear(n, h, p + "q"), nh)  # (H, T, hd)
    k = heads(n, linear(n, h, p + "k"), nkv)  # (n_kv, T, hd)
    v = heads(n, linear(n, h, p + "v"), nkv)
    if cos is not None:
        q, k = rope(n, q, cos, sin), rope(n, k, cos, sin)
    axis0 = g.const([0])
    k_all = g.op("Concat", g.op("Squeeze", past_k, axis0), k, axis=1)  # (n_kv, S, hd)
    v_all = g.op("Concat", g.op("Squeeze", past_v, axis0), v, axis=1)
    present_k = g.op("Unsqueeze", k_all, axis0, name=f"present_key_{i}")
    present_v = g.op("Unsqueeze", v_all, axis0, name=f"present_value_{i}")
    # GQA: the heads sharing kv head j are rows j*group .. j*group+group-1 of q, so a reshape groups
    # them: (H, T, hd) -> (n_kv, group*T, hd), row r of a group block is query token r % T.
    qg = g.op("Reshape", q, g.const([nkv, -1, hd]))
    scores = g.op("MatMul", qg, g.op("Transpose", k_all, perm=[0, 2, 1]))  # (n_kv, group*T, S)
    scores = g.op("Mul", scores, g.const(1.0 / np.sqrt(hd), np.float32))
    # mask (group*T, S): key position > query position; the query positions tiled over the group
    n_keys = g.op("Gather", g.op("Shape", k_all), g.const(1), axis=0)  # scalar S
    key_pos = g.op("Range", g.const(0), n_keys, g.const(1))  # (S,)
    q_pos = g.op("Tile", positions, g.const([nh // nkv]))  # (group*T,)
    future = g.op("Greater", g.op("Unsqueeze", key_pos, axis0), g.op("Unsqueeze", q_pos, g.const([1])))
    scores = g.op("Where", future, g.const(-np.inf, np.float32), scores)
    probs = g.op("Softmax", scores, axis=-1)
    out = g.op("MatMul", probs, v_all)  # (n_kv, group*T, hd)
    out = g.op("Transpose", g.op("Reshape", out, g.const([nh, -1, hd])), perm=[1, 0, 2])  # (T, H, hd)
    out = g.op("Reshape", out, g.const([-1, nh * hd]))
    return linear(n, out, p + "o"), present_k, present_v


def ffn(n: _Net, i: int, h: str) -> str:
    """(T, d) -> (T, d): act(gate h) [* (up h)] then down; down_t (ffn_dim, d) is already W_down^T."""
    g, cfg = n.g, n.cfg
    p = f"layers.{i}.ffn."
    gate = linear(n, h, p + "gate")  # (T, ffn_dim)
    if cfg.activation == "silu":
        a = g.op("Mul", gate, g.op("Sigmoid", gate))
    elif cfg.activation == "fatrelu":
        keep = g.op("GreaterOrEqual", gate, g.const(cfg.act_threshold, np.float32))
        a = g.op("Where", keep, gate, g.const(0.0, np.float32))
    else:
        a = g.op("Relu", gate)
    if cfg.gated:
        a = g.op("Mul", a, linear(n, h, p + "up"))
    y = g.op("MatMul", a, n.weight(p + "down_t", transpose=False))
    b = n.vector(p + "down_bias")
    return y if b is None else g.op("Add", y, b)


def head(n: _Net, x: str) -> str:
    """Final norm and LM head: x (T, d) -> logits (1, T, vocab), or (1, 1, vocab) for the last token.
    Gemm with transB reads the stored (vocab, d) table, so tied embeddings share the Gather's copy."""
    g = n.g
    if n.opts.logits == "last":
        x = g.op("Slice", x, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([0]))  # (1, d)
    x = norm(n, x, "final_norm")
    w = n.embed_table if n.cfg.tie_embeddings else n.weight("lm_head", transpose=False)  # (vocab, d)
    return g.op("Unsqueeze", g.op("Gemm", x, w, transB=1), g.const([0]), name="logits")


def build(g: GraphBuilder, model: PackedModel, opts: ExportOptions) -> None:
    """Every node, initialiser, input and output of the graph into g."""
    cfg = model.config
    if cfg.extra_features():
        raise EdgeRuntimeError(f"ONNX export does not build {', '.join(cfg.extra_features())} yet; decode this model "
                               f"with the cpu or cuda backend")
    context = opts.max_context or cfg.max_positions
    if context > cfg.max_positions:
        raise EdgeRuntimeError(f"--max-context {context} exceeds the model's {cfg.max_positions} positions")
    n = _Net(g, model, opts)
    ids2 = g.add_input("input_ids", TensorProto.INT64, [1, "T"])
    start = g.add_input("start_pos", TensorProto.INT64, [1])
    ids = g.op("Squeeze", ids2, g.const([0]))  # (T,)
    n_new = g.op("Gather", g.op("Shape", ids), g.const(0), axis=0)  # scalar T
    positions = g.op("Add", g.op("Range", g.const(0), n_new, g.const(1)), start)  # (T,) int64
    x = embed(n, ids, positions)  # (T, d)
    cos = sin = None
    if cfg.arch == "llama":
        c, s = rope_tables(cfg, context)  # (context, hd/2) float32, the numpy backend's tables
        cos = g.op("Gather", g.initializer("rope.cos", c), positions, axis=0)  # (T, hd/2)
        sin = g.op("Gather", g.initializer("rope.sin", s), positions, axis=0)
    kv_shape = [1, cfg.n_kv_heads, "P", cfg.head_dim]
    present = []
    for i in range(cfg.n_layers):
        past_k = g.add_input(f"past_key_{i}", FLOAT, kv_shape)
        past_v = g.add_input(f"past_value_{i}", FLOAT, kv_shape)
        a, pk, pv = attention(n, i, norm(n, x, f"layers.{i}.attn_norm"), positions, cos, sin, past_k, past_v)
        x = g.op("Add", x, a)
        x = g.op("Add", x, ffn(n, i, norm(n, x, f"layers.{i}.ffn_norm")))
        present.append((pk, pv))
    head(n, x)
    g.add_output("logits", FLOAT, [1, "T" if opts.logits == "all" else 1, cfg.vocab_size])
    for pk, pv in present:
        g.add_output(pk, FLOAT, [1, cfg.n_kv_heads, "S", cfg.head_dim])
        g.add_output(pv, FLOAT, [1, cfg.n_kv_heads, "S", cfg.head_dim])

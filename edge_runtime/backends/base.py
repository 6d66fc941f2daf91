"""The backend contract: the op set the decoder is written against, and the decode state a backend owns.

Two kinds of call:
- Prefill and evaluation run T tokens eagerly ("batched"): ops take host-known shapes, may allocate, and
  may be called with out=None.
- A decode step is one token with fixed shapes: every op writes into the backend's preallocated
  `buffers` (out=...), and everything that changes from token to token (the token id, the position,
  the per-layer knobs, the statistic counters, the sampler's state) is read from and advanced in
  `state`, device memory on a GPU. Nothing host-side enters a step, so a backend may capture one step
  as a CUDA graph and replay it every token (`run_step`).

Arrays: activations are float32 row-major (T, features); `xp` arrays are numpy on the cpu backend and
device arrays on the cuda backend. `positions` is an int32 array (T,) of absolute positions; in a decode
step it is `state.pos` itself, so the position is read where the kernels run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edge_runtime.backends.weights import PROJECTIONS, Layer, Linear, Norm, Weights
from edge_runtime.config import ModelConfig
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.sparsity.predictor import Rule
from edge_runtime.sparsity.stats import FIELDS, FFNStats
from edge_runtime.sparsity.wina import check_criterion

# Both backends score a prompt's attention a block of query rows at a time: (heads, rows, keys) fp32 per block,
# 32 MiB for a 7B model's 32 heads at 2,048 keys, where the whole prompt at once took heads x T x T (1.6 GB).
PREFILL_QUERY_ROWS = 128

# Per-layer FFN predictor kinds, as stored in DecodeState.predictor.
DENSE, SPARSEINFER, PROJECTION = 0, 1, 2
PREDICTOR_CODE = {"sparseinfer": SPARSEINFER, "projection": PROJECTION}


@dataclass
class DecodeState:
    """What a decode step reads and advances. Allocated once per backend with its array module."""

    token: Any  # (1,) int32: input id of the next step; the step overwrites it with the sampled id
    pos: Any  # (1,) int32: position of `token` = KV length before the step; the step adds 1
    predictor: Any  # (L,) int32: DENSE | SPARSEINFER | PROJECTION per layer
    alpha: Any  # (L,) float32: SparseInfer alpha per layer
    theta: Any  # (L, ffn_dim) float32: projection-predictor thresholds per neuron
    teal: Any  # (L, 7) float32: TEAL thresholds per projection input (PROJECTIONS order), 0 = off; a sparse
    #            step reads the q, k, v, o ones (column skipping beside the FFN predictor), a TEAL step all seven
    # (L, 7, K_max) float32: per input channel factor s of the criterion |x| * s >= threshold, the first K of
    # each row used (K = the projection's input width): ones for TEAL, the weight column norms for WINA
    teal_scale: Any
    counters: Any  # (len(FIELDS), L) int64: FFN statistic accumulators, read only when asked
    seen: Any  # (vocab,) uint8: 1 for ids in the prompt or generated so far (repetition penalty)
    measure_recall: bool = False  # also run the dense gate to count recall (evaluation only)

    @classmethod
    def allocate(cls, xp, cfg: ModelConfig) -> DecodeState:
        n = cfg.n_layers
        return cls(token=xp.zeros(1, dtype=xp.int32), pos=xp.zeros(1, dtype=xp.int32),
                   predictor=xp.zeros(n, dtype=xp.int32), alpha=xp.ones(n, dtype=xp.float32),
                   theta=xp.zeros((n, cfg.ffn_dim), dtype=xp.float32),
                   teal=xp.zeros((n, len(PROJECTIONS)), dtype=xp.float32),
                   teal_scale=xp.ones((n, len(PROJECTIONS), input_width_max(cfg)), dtype=xp.float32),
                   counters=xp.zeros((len(FIELDS), n), dtype=xp.int64), seen=xp.zeros(cfg.vocab_size, dtype=xp.uint8))


def knob_arrays(rules: Sequence[Rule] | None, n_layers: int, ffn_dim: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host arrays (predictor (L,) int32, alpha (L,) float32, theta (L, N) float32) for per-layer rules."""
    kind = np.zeros(n_layers, dtype=np.int32)
    alpha = np.ones(n_layers, dtype=np.float32)
    theta = np.zeros((n_layers, ffn_dim), dtype=np.float32)
    for i, r in enumerate(rules or ()):
        kind[i] = PREDICTOR_CODE[r.kind]
        alpha[i] = r.alpha
        if r.theta is not None:
            theta[i] = r.theta
    return kind, alpha, theta


def layer_rule(kind: int, alpha: float, theta: np.ndarray) -> Rule | None:
    """The Rule a layer's knobs in a DecodeState stand for (host values); None for a dense layer."""
    if kind == SPARSEINFER:
        return Rule("sparseinfer", alpha=float(alpha))
    if kind == PROJECTION:
        return Rule("projection", theta=theta)
    return None


def input_width_max(cfg: ModelConfig) -> int:
    """The widest projection input: d (q, k, v, gate, up), n_heads * head_dim (o) or ffn_dim (down)."""
    return max(cfg.dim, cfg.n_heads * cfg.head_dim, cfg.ffn_dim)


def teal_scale_array(weights: Weights, criterion: str, cfg: ModelConfig) -> np.ndarray:
    """(L, 7, K_max) float32 for DecodeState.teal_scale: ones (TEAL) or each projection's column norms (WINA)."""
    out = np.ones((cfg.n_layers, len(PROJECTIONS), input_width_max(cfg)), dtype=np.float32)
    if check_criterion(criterion) == "wina":
        for i, layer in enumerate(weights.layers):
            for j, p in enumerate(PROJECTIONS):
                norms = layer.column_norm(p)
                if norms is not None:
                    out[i, j, :len(norms)] = norms
    return out


def teal_array(thresholds: Sequence[dict[str, float]] | None, n_layers: int) -> np.ndarray:
    """(L, 7) float32 from per-layer {projection: threshold}; missing projections are 0 (off)."""
    out = np.zeros((n_layers, len(PROJECTIONS)), dtype=np.float32)
    for i, layer in enumerate(thresholds or ()):
        for p, t in layer.items():
            out[i, PROJECTIONS.index(p)] = t
    return out


class Backend(Protocol):
    """The op set. Batched ops take (T, features) float32 and return the same; with out= they write it."""

    name: str
    config: ModelConfig
    max_context: int
    weights: Weights  # host-side view of the packed weights (sizes, sign planes, encodings)
    state: DecodeState
    buffers: Any  # preallocated one-token activations: x, h (1, d); q, a (1, H*hd); k, v (1, KV*hd); logits (1, V)

    # ---- ops shared by prefill and the decode step --------------------------------------------------
    def embed_tokens(self, ids, positions, out=None):
        """ids (T,) int32, positions (T,) int32 -> (T, d): token embedding times config.embed_scale
        (+ learned position, OPT)."""

    def norm(self, x, n: Norm, out=None):
        """(T, d) -> (T, d): RMSNorm (n.b is None) or LayerNorm, eps n.eps, in float32."""

    def linear(self, x, lin: Linear, out=None, teal: tuple[int, str] | None = None, add_to=None):
        """(T, K) -> (T, N) = x W^T + b. teal=(layer, projection): input channels whose |x| * s (s from
        `state.teal_scale`) is under that projection's threshold in `state.teal` are skipped (one token:
        their weight columns are not read, from a W^T made by set_knobs; the bytes of q, k, v, o products are
        counted in `state.counters`). add_to: accumulate into it (residual) instead of out."""

    def attention(self, layer: int, q, k, v, positions, out=None, rope: bool = False):
        """Write k, v (T, KV*hd) into the cache at `positions`, attend causally (GQA) up to each
        position; q (T, H*hd) -> (T, H*hd). The config's attn_scale, attn_softcap and the layer's sliding
        window (config.window(layer)) apply. rope: q and k arrive unrotated and are rotated per head at
        `positions` first (RoPE, HF rotate_half), k entering the cache rotated; q, k themselves may or may not
        be rotated afterwards (a GPU rotates while appending and attending: no launch of its own)."""

    def add(self, x, y) -> None:
        """x (T, d) += y (a residual add the decoder makes itself: Gemma-2's normed block outputs)."""

    def logits(self, x, out=None, norm: Norm | None = None):
        """(T, d) final hidden, already normed (norm given: normed by it first, fused on a GPU; one token:
        buffers.h may hold the normed x on the way, so x must not be buffers.h) -> (T, vocab) float32,
        soft-capped when the config says."""

    # ---- prefill and evaluation only (T tokens, dense arithmetic) -----------------------------------
    def ffn_parts(self, x, layer: Layer) -> tuple:
        """(T, d) -> (act (T, N), hidden (T, N)): act = activation(gate x + b), hidden = act * (up x + b)
        (act itself without an up projection). The decoder's observation points "ffn_act" and
        "ffn_hidden"."""

    def ffn_down(self, hidden, layer: Layer, bias: bool = True):
        """(T, N) -> (T, d): hidden @ W_down^T (+ b)."""

    def ffn_masked(self, i: int, x, layer: Layer):
        """(T, d) -> (T, d): each token's FFN with its own predicted mask from `state`'s knobs for layer i,
        computed densely and masked: token-by-token sparse decode in one pass (evaluation, calibration)."""

    def write_kv(self, layer: int, k, v, pos0: int) -> None:
        """Place k, v (KV, T, hd) float32 computed elsewhere (ONNX prefill) into the cache at pos0."""

    # ---- decode step (one token, `buffers` and `state` only) ----------------------------------------
    def attention_inputs(self, i: int, x, layer: Layer, teal: bool):
        """x (1, d), the residual stream -> (q, k, v) in buffers.q, .k, .v: layer i's q, k, v projections of
        layer.attn_norm(x), unrotated (teal: each with its TEAL threshold, as linear's teal=(i, p)). buffers.h
        may be used on the way. One launch on a GPU where the three share an encoding and no threshold is set."""

    def ffn_step(self, i: int, x, layer: Layer, add_to, mode: str, accumulate: bool = True,
                 norm: bool = False) -> None:
        """x (1, d) -> add_to (1, d) += FFN(x) (accumulate=False: add_to = FFN(x); add_to may be x then).
        norm: x is the residual stream and the FFN's input is layer.ffn_norm(x) (x unchanged; fused on a GPU).
        mode "dense", "sparse" (predict from the sign plane with layer i's knobs, gate over predicted rows,
        up/down over the survivors, dReLU also dropping rows whose up is not positive before down, counters
        advanced) or "teal" (dense FFN with layer i's TEAL input thresholds)."""

    def sample(self, logits) -> None:
        """logits (1, vocab) -> state.token (sampled with the parameters given to begin), state.seen marked; any
        logit NaN or infinite -> state.token = NO_TOKEN (model/sampling.py), nothing marked."""

    def advance(self) -> None:
        """state.pos += 1 (the last op of a step)."""

    def run_step(self, body: Callable[[], None], mode: str) -> None:
        """Run one decode step: `body` issues the step's ops. A GPU backend captures it once per mode
        into a graph and replays the graph; the cpu backend calls it."""

    # ---- host interface (between steps, never inside one) ------------------------------------------
    def from_host(self, a, dtype):
        """A host array (or list) as this backend's array of dtype (prefill inputs)."""

    def to_host(self, a) -> np.ndarray:
        """This backend's array as a host numpy array."""

    def release_scratch(self) -> None:
        """After a batch (prefill): working memory it left cached beyond what the next batch should reuse goes
        back to the device (a GPU backend's memory pool); nothing on the cpu backend."""

    def begin(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        """A new sequence: pos 0, `seen` from the prompt, the sampler reset (seeded)."""

    def set_position(self, pos: int) -> None:
        """state.pos = pos (after a prefill of pos tokens)."""

    def set_token(self, token: int) -> None:
        """state.token = token (teacher forcing in evaluation)."""

    def read_token(self) -> int:
        """state.token to the host: the one device-to-host copy of a generation step."""

    def read_logits(self):
        """buffers.logits (1, vocab) to the host as float32 numpy."""

    def set_knobs(self, rules: Sequence[Rule] | None, teal: Sequence[dict[str, float]] | None,
                  measure_recall: bool = False, teal_criterion: str = "teal") -> None:
        """Write per-layer predictor rules, TEAL thresholds and the TEAL criterion's channel factors
        ("teal": |x| >= t, "wina": |x| * column norm >= t; sparsity/wina.py) into `state` (no recapture)."""

    def read_stats(self) -> FFNStats:
        """The counters so far, copied to the host (counted in `stats_reads`)."""

    def reset_stats(self) -> None:
        """Zero the counters."""

    def free(self) -> None:
        """Release the weights, the KV cache and any device memory; the backend is unusable after (Runtime.close)."""

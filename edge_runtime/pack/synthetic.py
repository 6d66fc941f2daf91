"""A random Llama of given shapes, packed in memory: for benchmarks and profile generation, which need the
backends' real weight layout at a model's sizes but no trained weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.config import ModelConfig
from edge_runtime.pack.loader import PackedModel
from edge_runtime.pack.quant import quantize
from edge_runtime.pack.signbits import pack_signs


def random_llama(cfg: ModelConfig, encoding: str, seed: int = 0, gate_bias: float = -0.5,
                 distinct_layers: int | None = None) -> PackedModel:
    """Weights N(0, 1 / fan_in), packed as `encoding`, norms all ones. The gate bias (in units of the gate's
    standard deviation, which is about 1 here) makes the ReLU keep fewer rows, as trained ReLU models do.
    distinct_layers: layer i shares the host arrays of layer i % distinct_layers (a 32-layer 7B shape built from
    4 random layers in a quarter of the time and host memory). A backend still gives every layer its own copy,
    so a step reads as many bytes as with 32 distinct layers, and each layer is far larger than any L2."""
    if distinct_layers is not None and distinct_layers < 1:
        raise ValueError(f"distinct_layers must be at least 1, got {distinct_layers}")
    rng = np.random.default_rng(seed)
    d, hd = cfg.dim, cfg.head_dim

    def mat(n: int, k: int) -> np.ndarray:  # (n, k) float32
        return (rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k)).astype(np.float32)

    matrices, vectors, planes = {"embed": quantize(mat(cfg.vocab_size, d), "fp16")}, {}, {}
    vectors["final_norm.weight"] = np.ones(d, np.float32)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        if distinct_layers is not None and i >= distinct_layers:
            src = f"layers.{i % distinct_layers}."
            for store in (matrices, vectors, planes):
                store.update({p + k[len(src):]: v for k, v in list(store.items()) if k.startswith(src)})
            continue
        for name, (n, k) in {"attn.q": (cfg.n_heads * hd, d), "attn.k": (cfg.n_kv_heads * hd, d),
                             "attn.v": (cfg.n_kv_heads * hd, d), "attn.o": (d, cfg.n_heads * hd),
                             "ffn.up": (cfg.ffn_dim, d), "ffn.down_t": (cfg.ffn_dim, d)}.items():
            matrices[p + name] = quantize(mat(n, k), encoding)
        gate = mat(cfg.ffn_dim, d)
        matrices[p + "ffn.gate"] = quantize(gate, encoding)
        planes[p + "ffn.gate_signs"] = pack_signs(gate)
        vectors[p + "ffn.gate_bias"] = np.full(cfg.ffn_dim, gate_bias, np.float32)
        vectors[p + "attn_norm.weight"] = np.ones(d, np.float32)
        vectors[p + "ffn_norm.weight"] = np.ones(d, np.float32)
    manifest = {"model": cfg.to_dict(), "encoding": encoding}
    return PackedModel(Path("synthetic"), cfg, manifest, matrices, vectors, planes)

"""Input-activation norms for Wanda pruning: ||X_j||_2 over calibration tokens for every input channel
of every attention and FFN projection, from a dense fp32 run of the unpruned model."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edge_runtime.errors import EdgeRuntimeError


def input_norms(hf_dir: Path, text: str, max_tokens: int = 2048, window: int = 256) -> dict[str, np.ndarray]:
    """{packed matrix name: (K,) float32}; down_t's entry is over the FFN neurons (the input of W_down)."""
    from edge_runtime.pack.convert import convert
    from edge_runtime.runtime import load

    with tempfile.TemporaryDirectory() as tmp:
        convert(hf_dir, Path(tmp) / "fp32", "fp32", progress=False)
        rt = load(Path(tmp) / "fp32", profile=None, backend="cpu", max_context=window + 1)
        ids = rt.encode(text)[: max_tokens]
        if len(ids) < 2:
            raise EdgeRuntimeError("the Wanda calibration text is too short")
        sums: dict[tuple[int, str], np.ndarray] = {}

        def observe(i: int, point: str, x: np.ndarray) -> None:
            sq = (x.astype(np.float64) ** 2).sum(axis=0)
            sums[(i, point)] = sums.get((i, point), 0) + sq
            if point == "ffn_in":  # the down projection's input, h = act(gate x) * (up x)
                layer = rt.backend.layers[i]
                h = rt.backend._activate(rt.backend.linear(x, layer.gate))
                if layer.up is not None:
                    h = h * rt.backend.linear(x, layer.up)
                sums[(i, "ffn_hidden")] = sums.get((i, "ffn_hidden"), 0) + (h.astype(np.float64) ** 2).sum(axis=0)

        rt.decoder.observer = observe
        for s in range(0, len(ids), window):
            rt.decoder.reset()
            rt.decoder.forward(ids[s:s + window])
        rt.decoder.observer = None
        out = {}
        for i in range(rt.config.n_layers):
            norms = {p: np.sqrt(sums[(i, p)]).astype(np.float32)
                     for p in ("attn_in", "attn_out", "ffn_in", "ffn_hidden")}
            for name, point in (("attn.q", "attn_in"), ("attn.k", "attn_in"), ("attn.v", "attn_in"),
                                ("attn.o", "attn_out"), ("ffn.gate", "ffn_in"), ("ffn.up", "ffn_in"),
                                ("ffn.down_t", "ffn_hidden")):
                out[f"layers.{i}.{name}"] = norms[point]
        rt.close()
        return out

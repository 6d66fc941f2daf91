"""Input-activation norms for Wanda pruning: ||X_j||_2 over calibration tokens for every input channel
of every attention and FFN projection, from a dense run of the unpruned checkpoint (held in memory as
fp16, never written out), read at the decoder's observation points."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.errors import EdgeRuntimeError

INPUT_OF = (("attn.q", "attn_in"), ("attn.k", "attn_in"), ("attn.v", "attn_in"), ("attn.o", "attn_out"),
            ("ffn.gate", "ffn_in"), ("ffn.up", "ffn_in"), ("ffn.down_t", "ffn_hidden"))


def input_norms(hf_dir: Path, text: str, max_tokens: int = 2048, window: int = 256) -> dict[str, np.ndarray]:
    """{packed matrix name: (K,) float32}; down_t's entry is over the FFN neurons (the input of W_down)."""
    from edge_runtime.pack.convert import checkpoint_model
    from edge_runtime.runtime import Runtime

    model = checkpoint_model(hf_dir)
    rt = Runtime(model, backend="cpu", max_context=min(window + 1, model.config.max_positions))
    try:
        ids = rt.encode(text)[: max_tokens]
        if len(ids) < 2:
            raise EdgeRuntimeError("the Wanda calibration text is too short")
        sums: dict[tuple[int, str], np.ndarray] = {}

        def observe(i: int, point: str, x: np.ndarray) -> None:
            sums[(i, point)] = sums.get((i, point), 0) + (x.astype(np.float64) ** 2).sum(axis=0)

        rt.decoder.observer = observe
        for s in range(0, len(ids), window):
            rt.decoder.reset()
            rt.decoder.forward(ids[s:s + window])
        rt.decoder.observer = None
        return {f"layers.{i}.{name}": np.sqrt(sums[(i, point)]).astype(np.float32)
                for i in range(rt.config.n_layers) for name, point in INPUT_OF}
    finally:
        rt.close()

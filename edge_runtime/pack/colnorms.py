"""Column norms of the weight matrices, stored at conversion for WINA (sparsity/wina.py): per layer matrix, the
L2 norm of each input column ||W[:, i]||_2, one float32 per input channel (`<projection>_colnorm` vectors)."""

from __future__ import annotations

import numpy as np

from edge_runtime.pack.quant import PackedTensor

# TEAL projection name -> the packed tensor whose input channels it masks, and its column-norm vector's name
# (down_proj is stored transposed as ffn.down_t; its input channels are the FFN neurons).
PACKED_NAME = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o", "gate": "ffn.gate", "up": "ffn.up",
               "down": "ffn.down_t"}
COLNORM_NAME = {p: ("ffn.down" if p == "down" else name) + "_colnorm" for p, name in PACKED_NAME.items()}
COLNORM_OF = {PACKED_NAME[p]: COLNORM_NAME[p] for p in PACKED_NAME}  # packed matrix leaf -> its norms' leaf
_ROW_BLOCK = 1024  # rows dequantised at a time: bounded memory on large matrices


def column_norms(w: np.ndarray) -> np.ndarray:
    """(N, K) weights in Hugging Face orientation (out, in) -> (K,) float32 L2 norm of each input column."""
    w = np.asarray(w, dtype=np.float32)
    return np.sqrt(np.einsum("nk,nk->k", w, w, dtype=np.float64)).astype(np.float32)


def packed_column_norms(t: PackedTensor, transposed: bool) -> np.ndarray:
    """The same from a packed tensor as stored (dequantised a block of rows at a time). transposed: t holds
    W^T (one row per input channel, as ffn.down_t), so the norms are its row norms."""
    n = t.shape[0]
    if transposed:
        out = np.empty(n, dtype=np.float32)
        for r in range(0, n, _ROW_BLOCK):
            block = t.dequantize(slice(r, min(n, r + _ROW_BLOCK))).astype(np.float64)
            out[r:r + len(block)] = np.sqrt(np.einsum("nk,nk->n", block, block))
        return out
    acc = np.zeros(t.shape[1], dtype=np.float64)
    for r in range(0, n, _ROW_BLOCK):
        block = t.dequantize(slice(r, min(n, r + _ROW_BLOCK))).astype(np.float64)
        acc += np.einsum("nk,nk->k", block, block)
    return np.sqrt(acc).astype(np.float32)

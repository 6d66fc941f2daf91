"""Bytes of a model in a given encoding, from its config alone (for planning before anything is loaded).
Matches what convert writes: matrices in the encoding, embeddings fp16 (fp32 for fp32), one sign plane
per gate, norms and biases fp16 (Gemma's folded norms fp32: a few kB, not counted); the KV cache in fp16 on the
device."""

from __future__ import annotations

from edge_runtime.config import ModelConfig
from edge_runtime.pack.quant import DEFAULT_INT4_GROUP

# KV-cache length the planner and the policy assume when no context is given: a typical chat turn.
DEFAULT_KV_TOKENS = 512


def matrix_bytes(n: int, k: int, encoding: str, group: int = DEFAULT_INT4_GROUP, weight_sparsity: float = 0.0) -> int:
    """Stored bytes of an (N, K) matrix; with weight_sparsity, the compressed row format (fp16 or int8
    values, bitmap, row offsets, int8 row scales)."""
    if weight_sparsity:
        kept = int(round(n * k * (1 - weight_sparsity)))
        value_bytes = 2 if encoding == "fp16" else 1
        return kept * value_bytes + n * (-(-k // 8)) + 8 * (n + 1) + (2 * n if encoding == "int8" else 0)
    if encoding == "fp32":
        return 4 * n * k
    if encoding == "fp16":
        return 2 * n * k
    if encoding == "int8":
        return n * k + 2 * n  # values + one fp16 scale per row
    if encoding == "int4":
        groups = -(-k // group)
        return n * groups * group // 2 + 2 * n * groups
    raise ValueError(f"unknown encoding {encoding!r}")


def model_bytes(cfg: ModelConfig, encoding: str, group: int = DEFAULT_INT4_GROUP, weight_sparsity: float = 0.0
                ) -> dict[str, int]:
    """weight_sparsity applies to the attention and FFN projections, as convert prunes them."""
    d, hd, n, s = cfg.dim, cfg.head_dim, cfg.ffn_dim, weight_sparsity
    attn = (matrix_bytes(cfg.n_heads * hd, d, encoding, group, s) * 2  # q and o (o is (d, n_heads*hd))
            + matrix_bytes(cfg.n_kv_heads * hd, d, encoding, group, s) * 2)
    ffn = matrix_bytes(n, d, encoding, group, s) * (3 if cfg.gated else 2)
    emb_bytes = 4 if encoding == "fp32" else 2
    out = {
        "attention": attn * cfg.n_layers,
        "ffn": ffn * cfg.n_layers,
        "sign_planes": n * (-(-d // 32)) * 4 * cfg.n_layers,
        "embedding": cfg.vocab_size * d * emb_bytes,
        "lm_head": 0 if cfg.tie_embeddings else matrix_bytes(cfg.vocab_size, d, encoding, group),
        "norms": (2 * cfg.n_layers + 1) * d * emb_bytes,
    }
    out["total"] = sum(out.values())
    return out


# Models whose matrices take at most this much as fp32 keep one fp32 copy for the cpu backend's batched (BLAS)
# path, which otherwise dequantises a block of rows per call. Decode never reads it.
KEEP_F32_BYTES = 64 << 20


def cpu_f32_copy_bytes(cfg: ModelConfig, encoding: str) -> int:
    """What those copies take beside a model stored in `encoding` (0 past KEEP_F32_BYTES, or when stored fp32)."""
    f32 = model_bytes(cfg, "fp32")
    matrices = f32["attention"] + f32["ffn"] + f32["embedding"] + f32["lm_head"]
    return matrices if matrices <= KEEP_F32_BYTES and not encoding.startswith("fp32") else 0


def kv_cache_bytes(cfg: ModelConfig, tokens: int, dtype_bytes: int = 2) -> int:
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * tokens * dtype_bytes


def decode_bytes_per_token(cfg: ModelConfig, encoding: str, ffn_fraction: float = 1.0,
                           kv_tokens: int = DEFAULT_KV_TOKENS, attn_fraction: float = 1.0) -> float:
    """Bytes one decode step reads: attention weights (times the fraction TEAL column skipping leaves), the
    FFN (times the fraction the predictor leaves, sign planes included in the fraction), the output head,
    one embedding row and the KV cache so far."""
    b = model_bytes(cfg, encoding)
    head = b["lm_head"] or b["embedding"]
    row = b["embedding"] / cfg.vocab_size
    return (attn_fraction * b["attention"] + ffn_fraction * b["ffn"] + head + row + b["norms"]
            + kv_cache_bytes(cfg, kv_tokens))

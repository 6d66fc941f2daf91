"""Well-known model shapes, for planning and synthetic benchmarks (no weights)."""

from __future__ import annotations

from edge_runtime.config import ModelConfig

SHAPES = {
    # ProSparse-Llama-2-7B / Llama-2-7B: 32 layers, d 4096, FFN 11008, 32 heads, vocab 32000
    "llama2-7b": ModelConfig(arch="llama", vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                             head_dim=128, ffn_dim=11008, activation="relu", max_positions=4096,
                             bos_token_id=1, eos_token_ids=(2,)),
    "llama2-13b": ModelConfig(arch="llama", vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                              head_dim=128, ffn_dim=13824, activation="relu", max_positions=4096,
                              bos_token_id=1, eos_token_ids=(2,)),
}

"""Rotary position tables, Hugging Face Llama convention (rotate_half over the two halves of a head)."""

from __future__ import annotations

import math

import numpy as np

from edge_runtime.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """(head_dim/2,) float64, with "linear" or "llama3" scaling applied as transformers does."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    sc = cfg.rope_scaling
    if not sc:
        return inv
    factor = float(sc["factor"])
    if sc["rope_type"] == "linear":
        return inv / factor
    # llama3: long wavelengths divided by factor, short kept, a smooth blend between.
    low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_len = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, blended, scaled)


def rope_tables(cfg: ModelConfig, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin: (n_positions, head_dim/2) float32."""
    angles = np.outer(np.arange(n_positions, dtype=np.float64), inverse_frequencies(cfg))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

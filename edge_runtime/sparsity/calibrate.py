"""Offline calibration of the sign-bit predictor for one model on calibration text.

1. A dense pass records every layer's FFN input for every token.
2. Per layer and per alpha on the grid: recall (truly active rows predicted active), predicted density,
   kept density (rows that survive), and the error the layer's mistakes add to its FFN output
   (relative L2 over all tokens, upstream inputs dense).
3. A greedy path from the most conservative setting (every layer at the largest alpha) to the most
   aggressive: each step lowers one layer's alpha by one grid step, the one that saves the most FFN
   bytes per unit of added error. Per-layer selection is a point on this path.
4. Held-out-style measurement: perplexity of the calibration windows at every path point and at every
   uniform alpha, with the predictor applied per token (batched_sparse forward).
The result is written to calibration.yaml in the model directory (atomically).
"""

from __future__ import annotations

import datetime
import os
import tempfile
from pathlib import Path

import numpy as np
import yaml

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.pack.signbits import count_negative_products, pack_signs
from edge_runtime.sparsity.predictor import keep_after_gate

ALPHA_GRID = (0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3, 1.5, 2.0)
CALIBRATION_FILE = "calibration.yaml"
CALIBRATION_VERSION = 1


def _nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(targets)), targets].sum())


def windowed(ids: list[int], window: int, max_tokens: int) -> list[np.ndarray]:
    arr = np.asarray(ids[: max_tokens + 1], dtype=np.int64)
    return [arr[s:s + window + 1] for s in range(0, len(arr) - 1, window) if len(arr[s:s + window + 1]) > 1]


def perplexity(rt, wins: list[np.ndarray], alphas: list[float] | None) -> float:
    """Perplexity over the windows; with alphas, each token's FFN uses its own predicted mask."""
    dec = rt.decoder
    saved = dec.alphas
    dec.set_sparsity(alphas)
    nll, n = 0.0, 0
    try:
        for w in wins:
            dec.reset(clear_stats=False)
            nll += _nll_sum(dec.forward(w[:-1], batched_sparse=True), w[1:])
            n += len(w) - 1
    finally:
        dec.set_sparsity(saved)
    return float(np.exp(nll / n))


def _layer_tables(rt, inputs: list[np.ndarray], grid: tuple[float, ...]) -> list[dict]:
    be, cfg = rt.backend, rt.config
    tables = []
    for i, layer in enumerate(be.layers):
        x = np.concatenate(inputs[i])  # (T, d) FFN inputs of layer i
        d = x.shape[1]
        n_neg = np.stack([count_negative_products(row, layer.gate_signs) for row in pack_signs(x)])  # (T, N)
        g = be.linear(x, layer.gate)
        truth = keep_after_gate(g, cfg.act_threshold)  # (T, N) truly active
        h = np.where(truth, g, 0.0)
        if layer.up is not None:
            h = h * be.linear(x, layer.up)
        down = layer.down_t.dequantize()  # (N, d)
        y_norm = float(np.linalg.norm(h @ down)) or 1.0
        rows = []
        for alpha in grid:
            pred = n_neg <= alpha * (d - n_neg)
            missed = np.where(pred, 0.0, h)
            rows.append({
                "alpha": float(alpha),
                "recall": float((pred & truth).sum() / max(int(truth.sum()), 1)),
                "predicted_density": float(pred.mean()),
                "kept_density": float((pred & truth).mean()),
                "error": float(np.linalg.norm(missed @ down) / y_norm),
            })
        tables.append({"layer": i, "true_density": float(truth.mean()), "table": rows})
    return tables


def ffn_bytes(rt, layer_index: int, row: dict) -> float:
    """FFN weight bytes per token at a table row: sign plane + predicted gate rows + kept up/down rows."""
    L = rt.backend.layers[layer_index]
    n = rt.config.ffn_dim
    up = L.up.w.row_bytes() if L.up is not None else 0.0
    return (L.gate_signs.nbytes + row["predicted_density"] * n * L.gate.w.row_bytes()
            + row["kept_density"] * n * (up + L.down_t.row_bytes()))


def greedy_path(tables: list[dict], bytes_of) -> list[list[int]]:
    """Grid indices per layer, from all-most-conservative to all-most-aggressive, one step at a time.
    `bytes_of(layer, row)` gives a table row's FFN bytes per token."""
    state = [len(t["table"]) - 1 for t in tables]
    path = [list(state)]
    while any(s > 0 for s in state):
        best, best_score = None, -np.inf
        for i, t in enumerate(tables):
            if state[i] == 0:
                continue
            cur, nxt = t["table"][state[i]], t["table"][state[i] - 1]
            saved = bytes_of(i, cur) - bytes_of(i, nxt)
            added = max(nxt["error"] - cur["error"], 0.0)
            score = saved / (added + 1e-9)
            if score > best_score:
                best, best_score = i, score
        state[best] -= 1
        path.append(list(state))
    return path


def calibrate(rt, text: str, source: str = "", window: int = 256, max_tokens: int = 2048,
              grid: tuple[float, ...] = ALPHA_GRID, progress=None) -> dict:
    cfg = rt.config
    if not cfg.relu_family:
        raise EdgeRuntimeError(f"the sign-bit predictor needs a ReLU-family FFN; this model's is {cfg.activation}")
    ids = rt.encode(text)
    wins = windowed(ids, min(window, rt.decoder.max_context - 1), max_tokens)
    if not wins:
        raise EdgeRuntimeError("the calibration text is too short")
    inputs: list[list[np.ndarray]] = [[] for _ in range(cfg.n_layers)]
    dec = rt.decoder
    dec.set_sparsity(None)
    dec.ffn_observer = lambda i, h: inputs[i].append(h)
    nll, n = 0.0, 0
    try:
        for w in wins:
            dec.reset()
            nll += _nll_sum(dec.forward(w[:-1]), w[1:])
            n += len(w) - 1
    finally:
        dec.ffn_observer = None
    ppl_dense = float(np.exp(nll / n))
    tables = _layer_tables(rt, inputs, grid)
    dense_bytes = sum(L.ffn_dense_bytes() for L in rt.backend.layers)

    def point(alphas_idx: list[int]) -> dict:
        alphas = [grid[k] for k in alphas_idx]
        ppl = perplexity(rt, wins, alphas)
        b = sum(ffn_bytes(rt, i, tables[i]["table"][k]) for i, k in enumerate(alphas_idx))
        return {"alphas": alphas, "ppl": ppl, "ppl_increase_pct": 100 * (ppl / ppl_dense - 1),
                "ffn_bytes_fraction": b / dense_bytes}

    path_idx = greedy_path(tables, lambda i, row: ffn_bytes(rt, i, row))
    steps = len(path_idx) + len(grid)
    path = []
    for k, idx in enumerate(path_idx):
        path.append(point(idx))
        if progress:
            progress(k + 1, steps)
    uniform = []
    for k in range(len(grid)):
        p = point([k] * cfg.n_layers)
        uniform.append({"alpha": grid[k], **{key: p[key] for key in ("ppl", "ppl_increase_pct", "ffn_bytes_fraction")}})
        if progress:
            progress(len(path_idx) + k + 1, steps)
    return {
        "calibration_version": CALIBRATION_VERSION, "predictor": "sparseinfer", "created": datetime.datetime.now(
            datetime.timezone.utc).isoformat(timespec="seconds"), "text": {"source": source, "tokens": n},
        "alpha_grid": [float(a) for a in grid], "ppl_dense": ppl_dense, "dense_ffn_bytes": dense_bytes,
        "layers": tables, "path": path, "uniform": uniform,
    }


def write_calibration(model_dir: Path, calib: dict) -> Path:
    """Atomic: a temporary file in the same directory, then rename."""
    model_dir = Path(model_dir)
    fd, tmp = tempfile.mkstemp(prefix=".calibration.", suffix=".yaml", dir=model_dir)
    try:
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(calib, f, sort_keys=False, width=110)
        os.replace(tmp, model_dir / CALIBRATION_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return model_dir / CALIBRATION_FILE


def read_calibration(model_dir: Path) -> dict | None:
    path = Path(model_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        calib = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise EdgeRuntimeError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    for key in ("calibration_version", "alpha_grid", "layers", "path", "ppl_dense"):
        if not isinstance(calib, dict) or key not in calib:
            raise EdgeRuntimeError(f"{path} is missing '{key}'; run 'edge-runtime calibrate' again")
    if calib["calibration_version"] != CALIBRATION_VERSION:
        raise EdgeRuntimeError(f"{path} has calibration_version {calib['calibration_version']}; this runtime reads "
                               f"{CALIBRATION_VERSION}: run 'edge-runtime calibrate' again")
    return calib

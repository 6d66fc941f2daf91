"""Offline calibration of both sign-plane predictors for one model on calibration text.

1. A dense pass records every layer's FFN input for every token.
2. Per layer and per knob on the predictor's grid (alpha for SparseInfer, q for the projection
   predictor, whose per-neuron thresholds are computed here): recall (truly active rows predicted
   active), predicted density, kept density (rows that survive) and the error the layer's misses add to
   its FFN output (relative L2 over all tokens, upstream inputs dense).
3. A greedy path from the most conservative setting (every layer at its most conservative knob, attention
   dense) to the most aggressive. A move is one layer's predictor knob one grid step, or one projection's
   TEAL sparsity (q, k, v or o of one layer) one level: the skipped input channels are skipped weight
   columns. q, k and v read the same input but get a threshold each: they do not tolerate the same
   sparsity (default model, all layers at 30 %: q costs nothing measurable, k and v about +0.3 % each).
   Each step takes the move that costs the least perplexity per weight byte saved, measured end to end
   on the calibration windows with the predictor and thresholds applied per token (batched_sparse
   forward, equal to token-by-token sparse decode). Candidates are re-measured lazily: the one whose last
   measured cost is lowest is measured again in the current state and taken if it is still the cheapest
   (costs rise as the path advances, so the others' older measurements stand for them).
   Per-layer selection is a point on this path.
4. Perplexity at every uniform knob (FFN only, attention dense), for comparison.
Tables and thresholds come from the even calibration windows, every perplexity from the odd ones.
Written to calibration.yaml (tables) and predictor_thresholds.safetensors (projection thresholds).
"""

from __future__ import annotations

import datetime
import warnings
from collections.abc import Callable

import numpy as np

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.scoring import windowed
from edge_runtime.sparsity.calibration_files import CALIBRATION_VERSION, THRESHOLDS_FILE
from edge_runtime.sparsity.perplexity import perplexity
from edge_runtime.sparsity.predictor import Rule, negative_counts_batch, projection_scores
from edge_runtime.sparsity.wina import check_criterion

ALPHA_GRID = (0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3)  # aggressive -> conservative; 1.3 is already lossless
Q_GRID = (0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005)  # aggressive -> conservative
GRIDS = {"sparseinfer": ("alpha", ALPHA_GRID), "projection": ("q", Q_GRID)}
# TEAL sparsity levels of a layer's attention inputs (fraction of input channels skipped), conservative first.
ATTN_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
# One threshold and level per group. Earlier calibrations had q, k, v in one group ("qkv"): a calibration's
# attention section names its groups, and reading follows it.
ATTN_GROUPS = {"q": ("q",), "k": ("k",), "v": ("v",), "o": ("o",)}
MIN_TOKENS = 128  # fewer calibration tokens than this fit thresholds to noise (and leave windows to judge them)


def attention_input(group: tuple[str, ...]) -> str:
    """The decoder's observation point of a group's input: o reads the attention output, q, k, v its input."""
    return "attn_out" if group == ("o",) else "attn_in"


def attention_thresholds(inputs: dict[str, np.ndarray], levels: tuple[float, ...],
                         groups: dict[str, tuple[str, ...]] = ATTN_GROUPS, layer=None,
                         criterion: str = "teal") -> dict[str, list[float]]:
    """One layer's thresholds per group and level: the level-quantile of the criterion's channel score,
    |input| (TEAL) or |input| * the projection's weight column norm (WINA, `layer` gives the norms; one
    projection a group); 0 at level 0 (dense)."""
    out = {}
    for g, ps in groups.items():
        score = np.abs(inputs[attention_input(ps)])
        if check_criterion(criterion) == "wina":
            if len(ps) != 1:
                raise EdgeRuntimeError(f"WINA scores each projection's columns: group {g!r} has {len(ps)}")
            score = score * layer.column_norm(ps[0])
        out[g] = [float(np.quantile(score, s)) if s > 0 else 0.0 for s in levels]
    return out


def section_groups(section: dict | None) -> dict[str, tuple[str, ...]]:
    """The projection groups of a calibration's attention section (the current ones where it names none)."""
    groups = (section or {}).get("groups")
    return {g: tuple(ps) for g, ps in groups.items()} if groups else ATTN_GROUPS


def attention_criterion(section: dict | None) -> str:
    """How a calibration's attention thresholds keep channels: "teal" (|x| >= t; every calibration before
    WINA) or "wina" (|x| * column norm >= t)."""
    return (section or {}).get("criterion", "teal")


def attention_teal(section: dict | None, levels: list[list[float]] | None) -> list[dict[str, float]] | None:
    """Per-layer TEAL thresholds {projection: t} of a path point's attention levels (one per group of the
    section, per layer); None when the point (or the calibration) has no attention sparsity."""
    if not section or not levels or not any(any(lv) for lv in levels):
        return None
    grid, groups = section["levels"], section_groups(section)
    out = []
    for i, lv in enumerate(levels):
        th = section["thresholds"][i]
        out.append({p: th[g][grid.index(s)] for g, s in zip(groups, lv, strict=True) if s > 0
                    for p in groups[g]})
    return out


def attention_bytes(layer, levels: list[float], groups: dict[str, tuple[str, ...]] = ATTN_GROUPS) -> float:
    """One step's q, k, v, o weight bytes at the groups' TEAL sparsity levels (kept channels = 1 - level)."""
    kept = {}
    for g, s in zip(groups, levels, strict=True):
        for p in groups[g]:
            kept[p] = None if s <= 0 else (1 - s) * getattr(layer, p).w.shape[1]
    return layer.attn_read_bytes(kept)


class LayerData:
    """One layer's calibration tokens from the dense pass: FFN input x (T, d), truth (T, N) (neurons that
    fired), the hidden activations h (T, N) (the input of down) and the norm of the FFN output."""

    def __init__(self, rt, i: int, x: np.ndarray, act: np.ndarray, h: np.ndarray):
        self.backend, self.layer = rt.backend, rt.backend.weights.layers[i]
        self.x = x
        self.truth = act > 0  # the activation let the neuron through: g > 0 and, for FATReLU, g >= threshold
        self.h = h
        # dReLU: of those, the rows whose relu(up) is 0 are dropped before down (up read, down not)
        self.up_zero = (h == 0) & self.truth if rt.config.up_relu else np.zeros_like(self.truth)
        self.y_norm = float(np.linalg.norm(self.down(h))) or 1.0

    def down(self, h: np.ndarray) -> np.ndarray:
        return self.backend.ffn_down(h, self.layer, bias=False)

    def row(self, knob: float, pred: np.ndarray) -> dict:
        truth = self.truth
        return {"knob": float(knob), "recall": float((pred & truth).sum() / max(int(truth.sum()), 1)),
                "predicted_density": float(pred.mean()), "kept_density": float((pred & truth).mean()),
                "up_dropped_density": float((pred & self.up_zero).mean()),
                "error": float(np.linalg.norm(self.down(np.where(pred, np.float32(0.0), self.h))) / self.y_norm)}


def projection_thresholds(z: np.ndarray, truth: np.ndarray, q: float) -> np.ndarray:
    """Per neuron: the q-quantile of z over tokens where it was active. A neuron never active in the
    calibration text gets the largest z seen for it, so it is predicted active only beyond that."""
    masked = np.where(truth, z, np.nan)
    with warnings.catch_warnings():  # columns of never-active neurons are all NaN: handled below
        warnings.simplefilter("ignore", RuntimeWarning)
        theta = np.nanquantile(masked, q, axis=0)
    never = ~truth.any(axis=0)
    theta[never] = z.max(axis=0)[never] + 1e-6
    return theta.astype(np.float32)


def ffn_bytes(layer, row: dict, predictor: str, n: int) -> float:
    """FFN weight bytes per token: sign plane (+ thresholds) + predicted gate rows + kept up rows + the down rows
    of those whose up survives too (all of them but dReLU's up-dropped)."""
    dropped = row.get("up_dropped_density", 0.0)
    return layer.ffn_read_bytes(1, row["predicted_density"] * n, (row["kept_density"] - dropped) * n,
                                int(predictor == "projection"), dropped * n)


def greedy_path(tables: list[dict], bytes_of: Callable[[int, dict], float]) -> list[list[int]]:
    """Grid indices per layer, from all-most-conservative (last index) to all-most-aggressive (0), from
    the tables alone (single-layer error per byte saved): for configurations that cannot be run, such
    as the 7B-shaped planning tests. Calibration of a real model measures its path instead."""
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


def rules_for(predictor: str, grid: tuple[float, ...], thresholds: dict | None, idx: list[int]) -> list[Rule]:
    if predictor == "sparseinfer":
        return [Rule("sparseinfer", alpha=grid[k], knob=grid[k]) for k in idx]
    return [Rule("projection", theta=thresholds[f"layers.{i}.q{k}"], knob=grid[k]) for i, k in enumerate(idx)]


def _calibrate_predictor(rt, data: list[LayerData], wins, predictor: str, ppl_dense: float, dense_bytes: float,
                         progress, attention: dict | None = None) -> tuple[dict, dict]:
    """One predictor's tables, thresholds and measured path; with `attention` ({"levels", "thresholds"}
    per layer, from calibrate), the path also moves the layers' attention TEAL levels."""
    knob, grid = GRIDS[predictor]
    n = rt.config.ffn_dim
    tables, thresholds = [], {}
    for i, ld in enumerate(data):
        d = ld.x.shape[1]
        if predictor == "sparseinfer":
            n_neg = negative_counts_batch(ld.x, ld.layer.gate_signs)
            rows = [ld.row(a, n_neg <= a * (d - n_neg)) for a in grid]
        else:
            z = projection_scores(ld.x, ld.layer.gate_signs)
            rows = []
            for k, q in enumerate(grid):
                theta = projection_thresholds(z, ld.truth, q)
                thresholds[f"layers.{i}.q{k}"] = theta
                rows.append(ld.row(q, z >= theta))
        tables.append({"layer": i, "true_density": float(ld.truth.mean()), "table": rows})

    layers = [ld.layer for ld in data]
    levels = tuple(attention["levels"]) if attention else (0.0,)
    attn_dense = float(sum(L.attn_dense_bytes() for L in layers))

    def bytes_of(i: int, row: dict) -> float:
        return ffn_bytes(data[i].layer, row, predictor, n)

    def ffn_total(idx: list[int]) -> float:
        return sum(bytes_of(i, tables[i]["table"][k]) for i, k in enumerate(idx))

    def attn_total(att: list[list[int]]) -> float:
        return sum(attention_bytes(L, [levels[a] for a in lv]) for L, lv in zip(layers, att, strict=True))

    def total_bytes(state) -> float:
        return ffn_total(state[0]) + attn_total(state[1])

    def measure(state) -> float:
        idx, att = state
        teal = attention_teal(attention, [[levels[a] for a in lv] for lv in att])
        return perplexity(rt, wins, rules_for(predictor, grid, thresholds, idx), teal,
                          attention["criterion"] if attention else "teal")

    def point(state, ppl: float | None = None) -> dict:
        idx, att = state
        if ppl is None:
            ppl = measure(state)
        out = {"knobs": [grid[k] for k in idx], "ppl": ppl, "ppl_increase_pct": 100 * (ppl / ppl_dense - 1),
               "ffn_bytes_fraction": ffn_total(idx) / dense_bytes}
        if attention:
            a = attn_total(att)
            out.update(attention=[[levels[k] for k in lv] for lv in att], attn_bytes_fraction=a / attn_dense,
                       layer_bytes_fraction=(ffn_total(idx) + a) / (dense_bytes + attn_dense))
        return out

    # Moves: ("ffn", layer) one grid step more aggressive; ("attn", layer, group) one TEAL level up.
    moves = [("ffn", i, 0) for i in range(len(data))]
    if attention:
        moves += [("attn", i, g) for i in range(len(data)) for g in range(len(ATTN_GROUPS))]

    def apply(state, m):
        idx, att = list(state[0]), [list(lv) for lv in state[1]]
        if m[0] == "ffn":
            if idx[m[1]] == 0:
                return None
            idx[m[1]] -= 1
        else:
            if att[m[1]][m[2]] == len(levels) - 1:
                return None
            att[m[1]][m[2]] += 1
        return idx, att

    # Measured greedy: each step keeps the move with the smallest perplexity increase per weight byte saved,
    # measured end to end on the calibration windows (single-layer error proxies chose worse per-layer
    # splits: on the default model they never beat the best uniform setting on held-out text; this does).
    # Lazily: a candidate's last measured cost stands until it is the cheapest, then it is measured again.
    state = ([len(grid) - 1] * len(data), [[0] * len(ATTN_GROUPS) for _ in data])
    path = [point(state)]
    cost: dict[tuple, float] = {}
    while True:
        fresh: dict[tuple, tuple[float, object]] = {}  # measured in this state: (perplexity, next state)
        open_moves = [m for m in moves if apply(state, m) is not None]
        if not open_moves:
            break

        def measure_move(m, state=state, fresh=fresh) -> None:
            trial = apply(state, m)
            ppl = measure(trial)
            saved = max(total_bytes(state) - total_bytes(trial), 1e-9)
            cost[m] = (ppl - path[-1]["ppl"]) / saved
            fresh[m] = (ppl, trial)

        for m in open_moves:
            if m not in cost:
                measure_move(m)
        while True:
            best = min(open_moves, key=lambda m: cost[m])
            if best in fresh:
                break
            measure_move(best)
        ppl, state = fresh[best]
        del cost[best]  # its next step is a different move: measured afresh
        path.append(point(state, ppl))
        progress()
    uniform = []
    for k in range(len(grid)):
        p = point(([k] * len(data), [[0] * len(ATTN_GROUPS) for _ in data]))
        uniform.append({"knob": grid[k], **{key: p[key] for key in ("ppl", "ppl_increase_pct", "ffn_bytes_fraction")}})
        progress()
    section = {"knob": knob, "grid": [float(g) for g in grid], "layers": tables, "path": path, "uniform": uniform}
    if attention:
        section["attention"] = {"groups": {g: list(ps) for g, ps in ATTN_GROUPS.items()}, **attention}
    if predictor == "projection":
        section["thresholds_file"] = THRESHOLDS_FILE
    return section, thresholds


def calibrate(rt, text: str, source: str = "", window: int = 256, max_tokens: int = 2048,
              predictors: tuple[str, ...] = ("sparseinfer", "projection"),
              teal_targets: tuple[float, ...] | None = None, attention_levels: tuple[float, ...] = ATTN_LEVELS,
              attention_criterion: str = "teal",
              progress: Callable[[int, int], None] | None = None) -> tuple[dict, dict]:
    """(calibration dict, projection thresholds {"layers.i.qk": (N,) float32}). The sign-plane
    predictors are calibrated for ReLU-family models only, their paths with TEAL moves on the attention
    inputs at `attention_levels` (() for FFN-only paths). TEAL targets: None means (0.25, 0.4, 0.5)
    for models that are not ReLU-family and none for those (they have exact zeros to exploit)."""
    from edge_runtime.sparsity.teal import TARGETS, calibrate_teal, calibration_steps

    cfg = rt.config
    if not cfg.relu_family:
        predictors = ()
    if teal_targets is None:
        teal_targets = () if cfg.relu_family else TARGETS
    if window < 2:  # one-token windows run as decode steps, which record no statistics
        raise EdgeRuntimeError(f"the calibration window must be at least 2 tokens, got {window}")
    ids = rt.encode(text)
    wins = windowed(ids, min(window, rt.decoder.max_context - 1), max_tokens)
    scored = int(sum(len(w) - 1 for w in wins))
    if scored < MIN_TOKENS:
        raise EdgeRuntimeError(f"the calibration text gives {scored} tokens; calibration needs at least {MIN_TOKENS} "
                               f"(a few thousand for perplexity figures worth comparing)")
    # Even windows fit the tables and thresholds, odd windows judge every setting's perplexity: a setting
    # is never scored on the text its thresholds were fitted to (that flattered the projection predictor).
    fit, judge = (wins[0::2], wins[1::2]) if len(wins) > 1 else (wins, wins)
    seen: dict[str, list[list[np.ndarray]]] = {p: [[] for _ in range(cfg.n_layers)]
                                               for p in ("attn_in", "attn_out", "ffn_in", "ffn_act", "ffn_hidden")}
    dec = rt.decoder
    dec.set_sparsity(None)
    dec.observer = lambda i, point, a: seen[point][i].append(a) if point in seen else None
    try:
        for w in fit:
            dec.reset()
            dec.forward(w[:-1])
    finally:
        dec.observer = None
    ppl_dense = perplexity(rt, judge, None)
    wins = judge
    data = [LayerData(rt, i, *(np.concatenate(seen[p][i]) for p in ("ffn_in", "ffn_act", "ffn_hidden")))
            for i in range(cfg.n_layers)]
    dense_bytes = float(sum(L.ffn_dense_bytes() for L in rt.backend.weights.layers))
    attention = None
    if attention_levels:
        levels = tuple(float(v) for v in attention_levels)
        if levels[0] != 0 or list(levels) != sorted(set(levels)) or levels[-1] >= 1:
            raise EdgeRuntimeError(f"attention TEAL levels must rise from 0 and stay below 1, got {levels}")
        inputs = ("attn_in", "attn_out")
        layers = rt.backend.weights.layers
        attention = {"levels": list(levels), "criterion": check_criterion(attention_criterion),
                     "thresholds": [attention_thresholds({p: np.concatenate(seen[p][i]) for p in inputs}, levels,
                                                         layer=layers[i], criterion=attention_criterion)
                                    for i in range(cfg.n_layers)]}
    attn_steps = cfg.n_layers * len(ATTN_GROUPS) * (len(attention_levels) - 1) if attention else 0
    total = sum(cfg.n_layers * (len(GRIDS[p][1]) - 1) + attn_steps + len(GRIDS[p][1]) for p in predictors)
    total += calibration_steps(cfg.n_layers, tuple(teal_targets)) if teal_targets else 0
    done = [0]

    def tick() -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    sections, thresholds = {}, {}
    for p in predictors:
        sections[p], th = _calibrate_predictor(rt, data, wins, p, ppl_dense, dense_bytes, tick, attention)
        thresholds.update(th)
    if teal_targets:
        rt.decoder.set_sparsity(None)
        teal = calibrate_teal(rt, fit, tuple(teal_targets), judge=judge, tick=tick)
    calib = {
        "calibration_version": CALIBRATION_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "text": {"source": source, "tokens": scored}, "ppl_dense": ppl_dense, "dense_ffn_bytes": dense_bytes,
        "predictors": sections,
    }
    if teal_targets:
        calib["teal"] = teal
    return calib, thresholds

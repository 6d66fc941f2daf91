"""TEAL: training-free magnitude activation sparsity for any activation function (SiLU models too).

Every projection's input x is sparsified in decode by zeroing entries with |x| < t; the skipped
input channels are skipped weight columns. t comes from the calibrated distribution of that input:
the p-quantile of |x| (TEAL's t = icdf(0.5 + p/2) for a symmetric distribution). Sparsity is
allocated across a block's 7 projections greedily, as TEAL does: starting from 0, raise by one step
the projection whose step adds the least block-output error per weight byte saved, until the block's
byte-weighted average sparsity reaches the target.

The criterion is TEAL's |x| or WINA's |x| * ||W[:, i]|| (sparsity/wina.py): both are calibrated the same
way (quantiles of the criterion's score, the same greedy allocation) and the one with the lower
perplexity on held-out windows is kept for the model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.sparsity.perplexity import perplexity
from edge_runtime.sparsity.wina import CRITERIA, check_criterion

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
INPUT_OF = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_out", "gate": "ffn_in", "up": "ffn_in",
            "down": "ffn_hidden"}
STEP = 0.025  # stories260K at 25 %: WINA +2.9 % perplexity with this step, +3.1 % with 0.05
TARGETS = (0.25, 0.4, 0.5)


def collect_inputs(rt, wins: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Per layer, the dense model's input to each projection over the calibration windows."""
    n = rt.config.n_layers
    points = ("attn_in", "attn_out", "ffn_in", "ffn_hidden")
    got: list[dict[str, list]] = [{p: [] for p in points} for _ in range(n)]
    dec = rt.decoder
    dec.observer = lambda i, point, x: got[i][point].append(x) if point in points else None
    try:
        for w in wins:
            dec.reset()
            dec.forward(w[:-1])
    finally:
        dec.observer = None
    return [{k: np.concatenate(v) for k, v in layer.items()} for layer in got]


def _weights(rt, i: int) -> dict:
    layer = rt.backend.weights.layers[i]
    return {p: layer.projection(p) for p in PROJECTIONS}


def scores(rt, i: int, acts: dict[str, np.ndarray], criterion: str) -> dict[str, np.ndarray]:
    """Per projection of layer i, the criterion's score of each input (T, K): |x| (TEAL) or |x| * the
    projection's weight column norms (WINA); a threshold is a quantile of it."""
    layer = rt.backend.weights.layers[i]
    out = {}
    for p, m in _weights(rt, i).items():
        if m is None:
            continue
        a = np.abs(acts[INPUT_OF[p]])
        out[p] = a * layer.column_norm(p) if criterion == "wina" else a
    return out


def calibration_steps(n_layers: int, targets: tuple[float, ...], criteria: tuple[str, ...] = CRITERIA) -> int:
    """How many times calibrate_teal calls its tick: per criterion, one greedy walk per block and one perplexity
    per target; and the dense perplexity."""
    return len(criteria) * (n_layers + len(targets)) + 1


def allocate(rt, inputs: list[dict[str, np.ndarray]], wins: list[np.ndarray], targets: tuple[float, ...],
             criteria: tuple[str, ...] = ("teal",), tick: Callable[[], None] = lambda: None
             ) -> dict[str, dict[float, list[dict[str, float]]]]:
    """Per criterion and target, per-layer thresholds {projection: t} reaching that byte-weighted sparsity
    per block. The dense block outputs every trial is compared with are computed once for all criteria.

    Block by block (the other blocks dense), each step raises by STEP the sparsity of the projection
    whose step least increases the error of the block's output (the next block's normalised input, or
    the logits after the last block) per weight byte it saves, measured by running the model on the
    windows. One greedy walk serves every target: a target's setting is the point of the walk where the
    block's byte-weighted sparsity equals it (the step that crosses it taken in part). `tick` is called after
    each block's walk (seconds to minutes each)."""
    for target in targets:
        if not 0 < target < 1:
            raise EdgeRuntimeError(f"TEAL target must be in (0, 1), got {target}")
    n = rt.config.n_layers
    dec = rt.decoder
    saved = dec.rules, dec.teal, dec.teal_criterion
    for criterion in criteria:
        check_criterion(criterion)
    dec.set_sparsity(None)  # a predictor would take the FFN and ignore its trial thresholds
    try:
        dense_out = [_block_outputs(rt, wins, None, i, "teal") for i in range(n)]
        return {c: _allocate(rt, inputs, wins, targets, c, dense_out, tick) for c in criteria}
    finally:
        dec.set_teal(saved[1], saved[2])
        dec.set_sparsity(saved[0])


def _allocate(rt, inputs, wins, targets, criterion, dense_out, tick) -> dict[float, list[dict[str, float]]]:
    out: dict[float, list[dict[str, float]]] = {t: [] for t in targets}
    for i, acts in enumerate(inputs):
        mats = {p: m for p, m in _weights(rt, i).items() if m is not None}
        absx = scores(rt, i, acts, criterion)
        nbytes = {p: float(mats[p].nbytes) for p in mats}
        total = sum(nbytes.values())
        level = dict.fromkeys(mats, 0.0)

        def thresholds(lv: dict[str, float], ax=absx) -> dict[str, float]:
            return {p: float(np.quantile(ax[p], s)) if s > 0 else 0.0 for p, s in lv.items()}

        def reached(lv: dict[str, float], nb=nbytes, tot=total) -> float:
            return sum(v * nb[p] for p, v in lv.items()) / tot

        current = 0.0
        pending = sorted(targets)
        moved: str | None = None  # the projection the last step raised

        while pending:
            while pending and reached(level) >= pending[0] - 1e-9:
                # the target is crossed inside the last step: its projection stops where the block's
                # byte-weighted sparsity equals the target exactly (no overshoot of up to one step)
                exact = dict(level)
                if moved is not None:
                    exact[moved] = max(0.0, level[moved] - (reached(level) - pending[0]) * total / nbytes[moved])
                out[pending.pop(0)].append(thresholds(exact))
            if not pending:
                break
            best, best_cost, best_err = None, np.inf, 0.0
            for p in mats:
                if level[p] + STEP >= 0.99:
                    continue
                trial = thresholds({**level, p: level[p] + STEP})
                e = _relative_error(_block_outputs(rt, wins, (i, trial), i, criterion), dense_out[i])
                cost = (e - current) / (STEP * nbytes[p])
                if cost < best_cost:
                    best, best_cost, best_err = p, cost, e
            if best is None:  # every projection at its cap: the remaining targets get this setting
                for t in pending:
                    out[t].append(thresholds(level))
                break
            level[best] += STEP
            moved = best
            current = best_err
        tick()
    return out


def _block_outputs(rt, wins: list[np.ndarray], teal_at: tuple[int, dict] | None, i: int, criterion: str
                   ) -> np.ndarray:
    """Block i's output over the windows: the next block's normalised input, or the logits for the last
    block; thresholds of the criterion on one block only (teal_at = (block, thresholds)) or none."""
    dec = rt.decoder
    n = rt.config.n_layers
    outs: list[np.ndarray] = []
    dec.set_teal(None if teal_at is None else [teal_at[1] if j == teal_at[0] else {} for j in range(n)], criterion)
    dec.observer = (lambda j, point, x: outs.append(x) if (j == i + 1 and point == "attn_in") else None)
    try:
        for w in wins:
            dec.reset()
            logits = dec.forward(w[:-1], batched_sparse=True)
            if i == n - 1:
                outs.append(logits)
    finally:
        dec.observer = None
        dec.teal = None
    return np.concatenate(outs)


def _relative_error(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y - ref) / (np.linalg.norm(ref) or 1.0))


def calibrate_teal(rt, wins: list[np.ndarray], targets: tuple[float, ...] = TARGETS, search_tokens: int = 512,
                   judge: list[np.ndarray] | None = None, criteria: tuple[str, ...] = CRITERIA,
                   tick: Callable[[], None] = lambda: None) -> dict:
    """{"criteria": {"0.25": "wina", ...}, "targets": {"0.25": [per-layer {projection: t}], ...}, "compared"} for
    calibration.yaml. For each criterion, thresholds are quantiles over all of `wins` and the greedy search runs
    its trial forwards on their first search_tokens; at each target the criterion kept is the one with the lower
    perplexity on `judge` (default: wins), and "compared" records every perplexity. `tick` is called
    calibration_steps(n_layers, targets, criteria) times, for a progress display."""
    judge = wins if judge is None else judge
    inputs = collect_inputs(rt, wins)
    search, n = [], 0
    for w in wins:
        if n >= search_tokens:
            break
        search.append(w)
        n += len(w) - 1
    ppl_dense = perplexity(rt, judge, None)
    tick()
    found: dict[str, dict] = {}
    for criterion, alloc in allocate(rt, inputs, search, tuple(targets), tuple(criteria), tick).items():
        ppl = {}
        for t in targets:
            ppl[f"{t:g}"] = perplexity(rt, judge, None, teal=alloc[t], criterion=criterion)
            tick()
        found[criterion] = {"targets": {f"{t:g}": alloc[t] for t in targets}, "ppl": ppl}
    compared = {c: f["ppl"] for c, f in found.items()}
    best = better_criteria(compared)
    return {"step": STEP, "criteria": best, "targets": {t: found[c]["targets"][t] for t, c in best.items()},
            "ppl_dense": ppl_dense, "compared": compared}


def teal_kept(teal: dict) -> dict[str, dict]:
    """Per target key, what calibrate_teal kept: {"criterion", "ppl", "ppl_increase_pct"} (held-out)."""
    out = {}
    for t, c in teal["criteria"].items():
        ppl = teal["compared"][c][t]
        out[t] = {"criterion": c, "ppl": ppl, "ppl_increase_pct": 100.0 * (ppl / teal["ppl_dense"] - 1.0)}
    return out


def better_criteria(compared: dict[str, dict[str, float]]) -> dict[str, str]:
    """Per target key, the criterion with the lowest perplexity (compared: criterion -> {target: ppl})."""
    keys = next(iter(compared.values()))
    return {t: min(compared, key=lambda c: compared[c][t]) for t in keys}


def criterion_of(teal: dict, target: float) -> str:
    """The criterion a calibration's thresholds for target are for (files written before WINA hold TEAL's)."""
    return check_criterion((teal.get("criteria") or {}).get(f"{target:g}", "teal"))


def thresholds_for(teal: dict, target: float) -> list[dict[str, float]]:
    key = f"{target:g}"
    if key not in teal["targets"]:
        raise EdgeRuntimeError(f"TEAL is calibrated for targets {', '.join(teal['targets'])}, not {key}; "
                               f"run 'edge-runtime calibrate --teal-targets {key}'")
    return teal["targets"][key]

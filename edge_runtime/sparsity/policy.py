"""Per-layer conservativeness from the device profile, its power mode, the calibration and an objective.

For each predictor (SparseInfer's alpha, the projection predictor's q), the calibration's greedy path
orders settings from most conservative to most aggressive, each point moving one layer one grid step or
(calibrations with attention TEAL) one projection's (q, k, v or o) TEAL sparsity one level; a point's
bytes count both.
Every selection is one point on that path, found from two numbers:

- a speed target, a time per token. By default it comes from the profile's `decode_target`: either
  `hold_top_mode` (the projected time per token of the path's most conservative point in the profile's
  fastest mode; every profile shipped here uses it) or a `tokens_per_s` floor. `--latency-ms` /
  `--tokens-per-s` (Objective.latency_ms) replace it.
- a quality cap, a held-out perplexity increase in percent: the profile's `quality_cap_pct` (+1 %),
  replaced by `--quality-budget` (Objective.quality_budget_pct). The policy spends only
  CALIBRATION_MARGIN of it on the perplexity measured on the calibration text; points above that are
  never chosen.

The policy picks the first (most conservative) point within the cap whose projected time per token
(bytes / effective bandwidth of the mode + launch overhead; a projection, not a measurement) meets the
target. When no point within the cap meets it, it runs at the cap, the furthest point within it, and
says so (Selection.met False, Selection.note). So the top mode of a profile that holds its own speed
gets the most conservative point, and a slower mode moves along the same path as far as it must, up
to the cap. The target and the cap do not depend on the mode and a lower bandwidth only makes every
point slower, so a slower mode never gets a more conservative knob in any layer.

The predictor is chosen once per model and cap, never per mode: "auto" takes the calibrated predictor
whose furthest point within the cap reads the fewest FFN bytes (choose_predictor). A calibration
without measured perplexity (a planning-only table) has no cap to check: its whole path is open and
the note says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edge_runtime.config import ModelConfig
from edge_runtime.devices.profile import DeviceProfile
from edge_runtime.devices.sizes import DEFAULT_KV_TOKENS, decode_bytes_per_token
from edge_runtime.errors import EdgeRuntimeError

# Perplexity increases are measured on the calibration text; text met in use differs. The policy spends
# only this fraction of a quality budget on calibration-text losses. On the default model the setting
# chosen for +0.5 % on the calibration book's judging half gave +0.91 % on the held-out book
# (scripts/compare_predictors.py); without a margin an earlier calibration's +1 % became +1.42 %.
CALIBRATION_MARGIN = 0.5


@dataclass(frozen=True)
class Objective:
    """What the user asked for; None fields fall back to the profile's decode_target."""

    latency_ms: float | None = None  # per-token target
    quality_budget_pct: float | None = None  # allowed perplexity increase, percent

    def __post_init__(self) -> None:
        if self.latency_ms is not None and self.latency_ms <= 0:
            raise EdgeRuntimeError(f"latency target must be > 0 ms, got {self.latency_ms}")
        if self.quality_budget_pct is not None and self.quality_budget_pct < 0:
            raise EdgeRuntimeError(f"quality budget must be >= 0 %, got {self.quality_budget_pct}")

    @classmethod
    def from_flags(cls, latency_ms: float | None = None, tokens_per_s: float | None = None,
                   quality_budget_pct: float | None = None) -> Objective:
        """--latency-ms and --tokens-per-s name the same target; give at most one."""
        if latency_ms is not None and tokens_per_s is not None:
            raise EdgeRuntimeError("give --latency-ms or --tokens-per-s, not both")
        if tokens_per_s is not None:
            if tokens_per_s <= 0:
                raise EdgeRuntimeError(f"tokens/s target must be > 0, got {tokens_per_s}")
            latency_ms = 1e3 / tokens_per_s
        return cls(latency_ms, quality_budget_pct)


@dataclass
class Selection:
    predictor: str  # "sparseinfer" (knobs are alphas) or "projection" (knobs are q)
    knobs: list[float]
    path_index: int
    ffn_bytes_fraction: float
    bytes_per_token: float
    projected_ms_per_token: float  # a projection from the profile's bandwidth, not a measurement
    projected_tokens_per_s: float
    expected_ppl_increase_pct: float | None  # measured at calibration on the calibration text
    met: bool  # the speed target is met within the quality cap
    note: str
    profile: str
    power_mode: str
    target_ms_per_token: float = 0.0  # the speed target (a projection when it holds the top mode)
    target: str = ""  # where the target came from
    quality_cap_pct: float | None = None  # held-out perplexity increase not to exceed
    at_cap: bool = False  # the furthest point within the cap
    attention: list[list[float]] | None = None  # per layer a TEAL level per attention group (q, k, v, o); None: dense
    attn_bytes_fraction: float = 1.0  # q, k, v, o weight bytes read / dense
    layer_bytes_fraction: float | None = None  # the layers' weight bytes (attention and FFN) read / dense

    def to_dict(self) -> dict:
        return asdict(self)


def projected_ms(profile: DeviceProfile, mode: str | None, cfg: ModelConfig, bytes_per_token: float) -> float:
    perf = profile.performance
    launches = cfg.n_layers * perf.kernels_per_layer * perf.launch_overhead_us * 1e-3
    return bytes_per_token / profile.effective_bandwidth(mode) * 1e3 + launches


def quality_cap(profile: DeviceProfile, objective: Objective) -> float:
    if objective.quality_budget_pct is not None:
        return objective.quality_budget_pct
    return profile.decode_target.quality_cap_pct


def _measured(path: list[dict]) -> bool:
    return all(p.get("ppl_increase_pct") is not None for p in path)


def within_cap(path: list[dict], cap_pct: float) -> list[int]:
    """Path indices whose calibration-text perplexity increase is within the cap's spendable part."""
    if not _measured(path):
        return list(range(len(path)))
    spend = cap_pct * CALIBRATION_MARGIN
    return [i for i, p in enumerate(path) if p["ppl_increase_pct"] <= spend]


def point_bytes_fraction(p: dict) -> float:
    """A path point's layer bytes read / dense: attention and FFN where the path moves both, else the FFN."""
    return p.get("layer_bytes_fraction", p["ffn_bytes_fraction"])


def point_bytes(cfg: ModelConfig, encoding: str, p: dict, kv_tokens: int) -> float:
    return decode_bytes_per_token(cfg, encoding, p["ffn_bytes_fraction"], kv_tokens, p.get("attn_bytes_fraction", 1.0))


def choose_predictor(calib: dict, cap_pct: float) -> str:
    """The calibrated predictor whose furthest point within the cap reads the fewest layer bytes (the first
    calibrated one among equals). Depends on the model and the cap only, never on the power mode."""
    sections = calib["predictors"]
    if not sections:
        raise EdgeRuntimeError("no sign-plane predictor is calibrated for this model (not ReLU-family)")

    def cap_bytes(name: str) -> float:
        path = sections[name].get("path") or []
        allowed = within_cap(path, cap_pct) or [0]
        return point_bytes_fraction(path[allowed[-1]]) if path else float("inf")

    return min(sections, key=cap_bytes)


def speed_target(path: list[dict], cfg: ModelConfig, encoding: str, profile: DeviceProfile, objective: Objective,
                 kv_tokens: int) -> tuple[float, str]:
    """(ms per token to meet, where it comes from): the user's target, else the profile's."""
    if objective.latency_ms is not None:
        return objective.latency_ms, "asked"
    target = profile.decode_target
    if target.tokens_per_s is not None:
        return 1e3 / target.tokens_per_s, f"the profile's floor of {target.tokens_per_s:g} tokens/s"
    top = profile.top_mode()
    ms = projected_ms(profile, top.name, cfg, point_bytes(cfg, encoding, path[0], kv_tokens))
    return ms, f"hold {top.name}'s projected {1e3 / ms:.0f} tokens/s"


def select_knobs(section: dict, predictor: str, cfg: ModelConfig, encoding: str, profile: DeviceProfile,
                 mode: str | None, objective: Objective, kv_tokens: int = DEFAULT_KV_TOKENS) -> Selection:
    """One predictor's calibration section -> the selected per-layer knobs."""
    path = section.get("path") or []
    if not path:
        raise EdgeRuntimeError("the calibration has no selection path; run 'edge-runtime calibrate' again")
    mode_name = profile.mode(mode).name
    cap = quality_cap(profile, objective)
    if objective.quality_budget_pct is not None and not _measured(path):
        raise EdgeRuntimeError("this calibration has no measured perplexity; only a latency target can be used")
    allowed = within_cap(path, cap)
    caveat = "" if _measured(path) else " (perplexity not measured by this calibration: the cap is not checked)"
    target_ms, source = speed_target(path, cfg, encoding, profile, objective, kv_tokens)
    times = [projected_ms(profile, mode, cfg, point_bytes(cfg, encoding, p, kv_tokens)) for p in path]
    if not allowed:
        choice, met = 0, False
        note = f"no setting keeps perplexity within +{cap:g} %: using the most conservative"
    else:
        fast = [i for i in allowed if times[i] <= target_ms]
        if fast:
            choice, met = fast[0], True
            note = f"most conservative setting meeting {target_ms:.3f} ms/token ({source}) within +{cap:g} %"
        else:
            choice, met = allowed[-1], False
            note = (f"{target_ms:.3f} ms/token ({source}) is out of reach within +{cap:g} % perplexity "
                    f"(projected {times[choice]:.3f} ms at the cap): running at the cap")
    p = path[choice]
    bpt = point_bytes(cfg, encoding, p, kv_tokens)
    return Selection(predictor=predictor, knobs=list(p["knobs"]), path_index=choice,
                     ffn_bytes_fraction=p["ffn_bytes_fraction"], bytes_per_token=bpt,
                     projected_ms_per_token=times[choice], projected_tokens_per_s=1e3 / times[choice],
                     expected_ppl_increase_pct=p.get("ppl_increase_pct"), met=met, note=note + caveat,
                     profile=profile.name, power_mode=mode_name, target_ms_per_token=target_ms, target=source,
                     quality_cap_pct=cap, at_cap=bool(allowed) and choice == allowed[-1],
                     attention=p.get("attention"), attn_bytes_fraction=p.get("attn_bytes_fraction", 1.0),
                     layer_bytes_fraction=p.get("layer_bytes_fraction"))


def select(calib: dict, cfg: ModelConfig, encoding: str, profile: DeviceProfile, mode: str | None,
           objective: Objective, predictor: str = "auto", kv_tokens: int = DEFAULT_KV_TOKENS) -> Selection:
    """Per-layer knobs for one predictor; "auto" is resolved by choose_predictor (not by the mode)."""
    sections = calib["predictors"]
    if not sections:
        raise EdgeRuntimeError("no sign-plane predictor is calibrated for this model (not ReLU-family)")
    name = choose_predictor(calib, quality_cap(profile, objective)) if predictor == "auto" else predictor
    if name not in sections:
        raise EdgeRuntimeError(f"predictor {name!r} is not calibrated for this model "
                               f"(calibrated: {', '.join(sections)})")
    return select_knobs(sections[name], name, cfg, encoding, profile, mode, objective, kv_tokens)

"""Decode throughput on the running backend: dense and sparse tokens/s measured in the same run, with
the bytes each step reads and, from the device profile, the projected time (labelled a projection)."""

from __future__ import annotations

import statistics
import warnings

from edge_runtime.devices.sizes import decode_bytes_per_token
from edge_runtime.sparsity.policy import projected_ms


def print_report(report: dict, width: int = 30) -> None:
    """One `key value` line per entry, floats to three decimals."""
    for k, v in report.items():
        print(f"{k:{width}s} {v:.3f}" if isinstance(v, float) else f"{k:{width}s} {v}")


def decode_rate(rt, prompt: str, tokens: int, repeats: int = 3) -> tuple[float, dict]:
    """Median decode tokens/s over `repeats` generations (after one warm-up) and the last FFN stats."""
    rt.generate(prompt, max_new_tokens=8)
    rates = [rt.generate(prompt, max_new_tokens=tokens).decode_tokens_per_s for _ in range(repeats)]
    return statistics.median(rates), rt.ffn_stats()


def bench(rt, setting, prompt: str, tokens: int = 128, repeats: int = 3) -> dict:
    """Dense, then `setting` (left applied to the runtime afterwards) with the attention TEAL thresholds the
    decoder holds (a policy selection's); None measures dense only. `tokens` beyond what the context holds
    after the prompt is cut to that (reported as tokens_asked): generation stops there, and the bytes per
    token must be those of a KV cache the runtime can hold."""
    asked = tokens
    tokens = min(tokens, rt.decoder.max_context - len(rt.prepare_prompt(prompt)[0]))
    teal, criterion = rt.decoder.teal, rt.decoder.teal_criterion
    rt.decoder.set_teal(None)
    rt.set_sparsity(None)
    dense, _ = decode_rate(rt, prompt, tokens, repeats)
    enc = rt.model.manifest["encoding"]
    out = {"backend": rt.backend.name, "encoding": enc, "tokens": tokens, "dense_tokens_per_s": dense,
           "dense_bytes_per_token": decode_bytes_per_token(rt.config, enc, 1.0, tokens)}
    if tokens != asked:
        out["tokens_asked"] = asked
    if setting is not None:
        rt.decoder.set_teal(teal, criterion)
        rt.set_sparsity(setting)
        sparse, stats = decode_rate(rt, prompt, tokens, repeats)
        frac, attn = stats["ffn_bytes_fraction"], stats.get("attn_bytes_fraction", 1.0)
        out.update(sparse_tokens_per_s=sparse, sparse_over_dense=sparse / dense, ffn_bytes_fraction=frac,
                   attn_bytes_fraction=attn, layer_bytes_fraction=stats.get("layer_bytes_fraction"),
                   sparse_bytes_per_token=decode_bytes_per_token(rt.config, enc, frac, tokens, attn))
    else:
        rt.decoder.set_teal(teal, criterion)
    if rt.profile is not None:
        for key in ("dense", "sparse"):
            if f"{key}_bytes_per_token" in out:
                ms = projected_ms(rt.profile, rt.power_mode, rt.config, out[f"{key}_bytes_per_token"])
                out[f"projected_{key}_tokens_per_s"] = 1e3 / ms
        out["projection"] = f"{rt.profile.name} / {rt.power_mode} (from the profile's bandwidth, not measured)"
    return out


def cuda_event_ms(cp, fn, repeats: int = 50, warmup: int = 5, batch: int = 32, stream=None) -> float:
    """Device milliseconds per fn() call: the median over `repeats` of CUDA-event timings of `batch` calls
    replayed as one captured CUDA graph, divided by batch (CuPy module passed in: no import here).

    Events around one eager call would time the host too: a launcher's Python and the launch itself (10-30 us)
    leave the GPU idle, as long as a 7B gate GEMV's whole read on an H100. A graph replays the batch back to back.
    fn must issue only device work; a fn the graph cannot hold (one that allocates or syncs) is timed as `batch`
    eager calls between the events instead, with a RuntimeWarning saying so. stream: where fn issues its work
    (a CudaBackend's methods use the backend's own stream); default a new blocking one."""
    # a blocking stream: it waits for what the caller wrote on CuPy's default stream (inputs, knobs)
    stream = stream if stream is not None else cp.cuda.Stream()
    with stream:
        for _ in range(warmup):
            fn()
        stream.synchronize()
        graph = _captured(cp, stream, fn, batch)

        def run():
            if graph is not None:
                graph.launch(stream)
            else:
                for _ in range(batch):
                    fn()

        run()
        times = []
        for _ in range(repeats):
            a, b = cp.cuda.Event(), cp.cuda.Event()
            a.record(stream)
            run()
            b.record(stream)
            b.synchronize()
            times.append(cp.cuda.get_elapsed_time(a, b) / batch)
    return statistics.median(times)


def _captured(cp, stream, fn, batch: int):
    """batch calls of fn captured on stream as a graph, or None (with a warning) where capture fails."""
    from edge_runtime.backends.cuda_ops.common import capture_graph

    try:
        return capture_graph(stream, lambda: [fn() for _ in range(batch)])
    except Exception as e:  # an allocation, a sync or a host copy inside fn: CUDA refuses it in a capture
        warnings.warn(f"timed {getattr(fn, '__name__', 'fn')} as {batch} eager calls (it cannot be captured in "
                      f"a CUDA graph: {str(e).splitlines()[0] if str(e) else type(e).__name__}); its time includes "
                      "the host's launch overhead wherever that exceeds the kernel's", RuntimeWarning, stacklevel=3)
        stream.synchronize()
        return None


def cuda_copy_bandwidth(cp, nbytes: int) -> float:
    """Bytes read + written per second by a device-to-device copy of `nbytes` (median of CUDA-event timings):
    the roofline a decode step's bandwidth is divided by."""
    src = cp.ones(nbytes // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    ms = cuda_event_ms(cp, lambda: dst.__setitem__(Ellipsis, src), repeats=10, warmup=2, batch=4)
    return 2 * src.nbytes / (ms * 1e-3)


def gpu_energy_meter():
    """A callable giving the GPU's total-energy counter in joules (NVML: the whole board, idle draw included),
    or giving None where NVML cannot be read (no pynvml, no driver, no NVIDIA GPU)."""
    from edge_runtime.monitor.samplers import NvmlSampler

    nvml = NvmlSampler()

    def joules() -> float | None:
        mj = nvml.sample().get("energy_mj") if nvml.available else None
        return None if mj is None else mj / 1e3

    return joules


def cuda_l2_bytes(cp, default: int = 50 << 20) -> int:
    """The device's L2 size (what weight copies rotated past it must exceed), or `default` (an H100's) where
    the attribute cannot be read."""
    try:
        return int(cp.cuda.Device().attributes["L2CacheSize"])
    except (AttributeError, KeyError):
        return default


def copies_past_l2(l2: int, nbytes: float, least: int = 2, most: int = 16) -> int:
    """How many device copies of `nbytes` a rotation needs so that it holds 3 x L2: a weight read again only
    after three L2-fulls of other reads comes from memory, as a real layer's would."""
    return int(min(most, max(least, -(-3 * l2 // max(int(nbytes), 1)))))


def rotated(items: list, fn):
    """A no-argument step calling fn(item) on the items in turn (weight copies rotated past L2)."""
    turn = [0]

    def step():
        fn(items[turn[0] % len(items)])
        turn[0] += 1

    step.__name__ = getattr(fn, "__name__", "step")  # what cuda_event_ms's warning names
    return step

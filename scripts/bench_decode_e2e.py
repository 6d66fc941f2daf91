"""End-to-end decode benchmark of the cuda backend (parts b and c of the CUDA issue, and the GPU joules per
token of the monitoring issue), ratios from one run.

  python scripts/bench_decode_e2e.py [--layers 32] [--distinct-layers 4] [--prompt 128] [--tokens 256]
                                     [--min-seconds 2] [--json out.json] [--smoke]

b. A Llama-2-7B-shaped model with random weights (`--distinct-layers` random layers repeated up to `--layers`;
   every layer gets its own copy on the device, so a step reads what 32 distinct layers would; full vocabulary,
   tied head), `--tokens` greedy tokens after a `--prompt`-token prompt, decoded by:
   - the runtime dense fp16 (one CUDA graph per step, one 4-byte read of the sampled id), reading every weight
     row (the backend's dense_skips_zero_rows off: the baseline); and, for information, the runtime's default
     dense step, which skips up/down rows whose gate is an exact zero after the ReLU;
   - the runtime sparse, fp16 and int4, one SparseInfer alpha for every layer chosen so that the predictor lets
     25 % of the gate rows through; the fraction that survives the ReLU is measured and printed. These densities
     are IMPOSED on random weights (the gate bias of pack/synthetic.py moves the survivors towards the issue's
     0.11); they are not a trained model's (ProSparse-Llama-2-7B is 89 % sparse, and trained predictors reach
     0.22-0.25 predicted density on it);
   - Hugging Face transformers eager fp16 on the same weights (edge_runtime/bench_hf_cuda.py), where torch with
     CUDA is installed.
   Bytes per token are the weights the step reads (the sparse FFN's as counted by the backend) plus the KV cache
   at the run's mean position; GB/s is divided by a device-to-device copy's bandwidth measured here.
c. The embedded default model: --backend cuda against --backend cpu at the policy's setting, greedy ids compared;
   on cuda also dense (every row read) against that setting.
Energy: where NVML can be read, joules per decoded token for every row, from the GPU's total-energy counter
over the timed steps (the whole board, idle draw included). Runtime rows repeat their decode until
`--min-seconds` have been timed, so that the counter's update interval does not matter.
Jetson numbers are not measured here: the profiles project them from bandwidth (edge-runtime bench).
`--smoke` runs tiny shapes (also under the CPU emulator) to check the script, not to time anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from edge_runtime.atomic_write import atomic_write_text
from edge_runtime.backends import require_cuda
from edge_runtime.backends.cuda import CudaBackend
from edge_runtime.bench import cuda_copy_bandwidth, gpu_energy_meter
from edge_runtime.bench_hf_cuda import hf_decode
from edge_runtime.cli_args import description
from edge_runtime.config import ModelConfig
from edge_runtime.devices.shapes import SHAPES
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.model.decoder import Decoder
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.pack.synthetic import random_llama
from edge_runtime.sparsity.predictor import Rule

DEFAULT_PROMPT = "The old man looked at the sea"


def timed_decode(dec: Decoder, prompt_ids: list[int], tokens: int, energy, min_seconds: float) -> dict:
    """Greedy decode of `tokens` steps after a prefill of prompt_ids, repeated until min_seconds of steps were
    timed: tokens/s, J/token (None without a readable energy counter), the first run's ids (prompt's next token
    and 3 more) and the FFN statistics of the last run."""
    first = [dec.start(prompt_ids, SamplingParams())] + [dec.decode_step() for _ in range(3)]  # capture, warm up
    n, secs, joules = 0, 0.0, 0.0
    while n == 0 or secs < min_seconds:
        dec.start(prompt_ids, SamplingParams())
        e0, t0 = energy(), time.perf_counter()
        for _ in range(tokens):
            dec.decode_step()
        secs += time.perf_counter() - t0
        e1 = energy()
        joules += 0.0 if e0 is None else e1 - e0
        n += tokens
    return {"tokens_per_s": n / secs, "joules_per_token": joules / n if e0 is not None else None,
            "first_ids": first, "stats": dec.stats.summary()}


def uniform_alpha(dec: Decoder, prompt_ids: list[int], target: float, n_layers: int) -> float:
    """One SparseInfer alpha for every layer so that the predictor lets `target` of the gate rows through."""
    lo, hi = 0.5, 4.0
    for _ in range(12):
        mid = (lo + hi) / 2
        dec.set_sparsity([Rule("sparseinfer", alpha=mid)] * n_layers)
        dec.start(prompt_ids, SamplingParams())
        for _ in range(4):
            dec.decode_step()
        lo, hi = (mid, hi) if dec.stats.summary()["predicted_density"] < target else (lo, mid)
    return hi


def part_b(cp, cfg: ModelConfig, distinct: int, prompt: int, tokens: int, energy, min_seconds: float,
           copy_bytes: int = 1 << 30) -> dict:
    prompt_ids = [int(t) for t in np.random.default_rng(0).integers(3, cfg.vocab_size, prompt)]
    kv_positions = cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * (prompt + tokens // 2)  # K or V, mean position
    out = {"layers": cfg.n_layers, "distinct_layers": distinct, "prompt": prompt, "tokens": tokens,
           "copy_gbs": cuda_copy_bandwidth(cp, copy_bytes) / 1e9}
    for enc in ("fp16", "int4"):
        model = random_llama(cfg, enc, distinct_layers=distinct)
        be = CudaBackend(model, prompt + tokens + 8)
        dec = Decoder(be)
        weights = sum(m.nbytes for m in model.matrices.values())  # the tied LM head reads the table whole
        kv_bytes = 2 * kv_positions * be.k_cache.dtype.itemsize
        row = {}
        if enc == "fp16":
            be.dense_skips_zero_rows = False
            r = timed_decode(dec, prompt_ids, tokens, energy, min_seconds)
            row["dense"] = {**r, "bytes": weights + kv_bytes, "gbs": (weights + kv_bytes) * r["tokens_per_s"] / 1e9}
            be.dense_skips_zero_rows = True
            row["dense_skipping_zero_rows"] = timed_decode(dec, prompt_ids, tokens, energy, min_seconds)
        alpha = uniform_alpha(dec, prompt_ids, 0.25, cfg.n_layers)
        dec.set_sparsity([Rule("sparseinfer", alpha=alpha)] * cfg.n_layers)
        r = timed_decode(dec, prompt_ids, tokens, energy, min_seconds)
        s = r["stats"]
        ffn_dense = sum(L.ffn_dense_bytes() for L in be.weights.layers)
        step_bytes = weights - ffn_dense + s["ffn_bytes_per_token"] + kv_bytes
        row["sparse"] = {**r, "alpha": alpha, "predicted_density": s["predicted_density"],
                         "actual_density": s["actual_density"], "bytes": step_bytes,
                         "gbs": step_bytes * r["tokens_per_s"] / 1e9}
        be.free()
        if enc == "fp16":
            row["transformers"] = hf_decode(model, cfg, prompt_ids, tokens, energy)
        out[enc] = row
        del model, be, dec
    dense = out["fp16"]["dense"]
    dense["copy_fraction"] = dense["gbs"] / out["copy_gbs"]
    out["sparse_vs_dense"] = out["fp16"]["sparse"]["tokens_per_s"] / dense["tokens_per_s"]
    out["int4_sparse_vs_fp16_dense"] = out["int4"]["sparse"]["tokens_per_s"] / dense["tokens_per_s"]
    hf = out["fp16"]["transformers"]
    if hf is not None:
        out["dense_vs_transformers"] = dense["tokens_per_s"] / hf["tokens_per_s"]
        out["sparse_vs_transformers"] = out["fp16"]["sparse"]["tokens_per_s"] / hf["tokens_per_s"]
        out["greedy_ids_equal_transformers"] = hf["first_ids"] == dense["first_ids"]
    return out


def part_c(tokens: int, energy, min_seconds: float) -> dict:
    import edge_runtime

    res = {}
    for backend in ("cpu", "cuda"):
        rt = edge_runtime.load(backend=backend)  # the default model, the profile's per-layer setting
        rt.generate(DEFAULT_PROMPT, max_new_tokens=8)  # warm-up (graph capture)
        g = rt.generate(DEFAULT_PROMPT, max_new_tokens=tokens)
        res[backend] = {"tokens_per_s": g.decode_tokens_per_s, "ids": g.token_ids}
        if backend == "cuda":
            ids = rt.encode(DEFAULT_PROMPT)
            res["cuda_policy"] = timed_decode(rt.decoder, ids, tokens, energy, min_seconds)
            rt.set_sparsity(None)
            rt.backend.dense_skips_zero_rows = False  # dense as in part b: every weight row read
            res["cuda_dense"] = timed_decode(rt.decoder, ids, tokens, energy, min_seconds)
        rt.close()
    res["cuda_vs_cpu"] = res["cuda"]["tokens_per_s"] / max(res["cpu"]["tokens_per_s"], 1e-9)
    res["greedy_ids_equal"] = res["cuda"]["ids"] == res["cpu"]["ids"]
    return res


def _joules(r: dict | None) -> str:
    return "" if r is None or r.get("joules_per_token") is None else f", {r['joules_per_token']:.3f} J/token"


def report(out: dict) -> None:
    b, c = out["b"], out["c"]
    d = b["fp16"]["dense"]
    print(f"copy bandwidth {b['copy_gbs']:.0f} GB/s (read + write)")
    print(f"b. {b['layers']} layers ({b['distinct_layers']} distinct), {b['tokens']} tokens after {b['prompt']}")
    print(f"   dense fp16 (every row read): {d['tokens_per_s']:.1f} tok/s, {d['gbs']:.0f} GB/s = "
          f"{d['copy_fraction']:.2f} of copy{_joules(d)}")
    z = b["fp16"]["dense_skipping_zero_rows"]
    print(f"   dense fp16, up/down rows with a zero gate skipped (exact): {z['tokens_per_s']:.1f} tok/s{_joules(z)}")
    for enc in ("fp16", "int4"):
        s = b[enc]["sparse"]
        print(f"   sparse {enc} (IMPOSED: predicted {s['predicted_density']:.3f}, actual {s['actual_density']:.3f}): "
              f"{s['tokens_per_s']:.1f} tok/s, {s['gbs']:.0f} GB/s{_joules(s)}")
    print(f"   sparse / dense {b['sparse_vs_dense']:.2f}x, "
          f"int4 sparse / fp16 dense {b['int4_sparse_vs_fp16_dense']:.2f}x")
    hf = b["fp16"]["transformers"]
    if hf is None:
        print("   transformers eager fp16: not run (needs transformers and torch with CUDA)")
    else:
        print(f"   transformers eager fp16: {hf['tokens_per_s']:.1f} tok/s{_joules(hf)}; runtime dense "
              f"{b['dense_vs_transformers']:.2f}x, sparse {b['sparse_vs_transformers']:.2f}x; first greedy ids "
              f"equal: {b['greedy_ids_equal_transformers']}")
    print(f"c. default model: cuda {c['cuda']['tokens_per_s']:.0f} tok/s, cpu {c['cpu']['tokens_per_s']:.0f} tok/s "
          f"({c['cuda_vs_cpu']:.2f}x); greedy ids equal: {c['greedy_ids_equal']}")
    print(f"   cuda dense {c['cuda_dense']['tokens_per_s']:.0f} tok/s{_joules(c['cuda_dense'])}; policy setting "
          f"{c['cuda_policy']['tokens_per_s']:.0f} tok/s{_joules(c['cuda_policy'])}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--layers", type=int, default=32, help="layers of the 7B-shaped model (Llama-2-7B has 32)")
    ap.add_argument("--distinct-layers", type=int, default=4, help="random layers built, repeated up to --layers")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens before the timed decode")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--min-seconds", type=float, default=2.0, help="timed decode per runtime row, at least")
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script, times nothing")
    args = ap.parse_args(argv)
    if min(args.layers, args.distinct_layers, args.prompt, args.tokens) < 1 or args.min_seconds < 0:
        ap.error("--layers, --distinct-layers, --prompt and --tokens must be at least 1, --min-seconds at least 0")
    try:
        cp = require_cuda("this benchmark", "see scripts/bench_cpu.py for the cpu backend")
    except EdgeRuntimeError as e:
        raise SystemExit(f"bench_decode_e2e.py: error: {e}") from None
    base = SHAPES["llama2-7b"]
    if args.smoke:
        cfg = dataclasses.replace(base, dim=64, n_heads=4, n_kv_heads=4, head_dim=16, ffn_dim=128, vocab_size=256,
                                  n_layers=2, tie_embeddings=True)
        distinct, prompt, min_seconds, copy_bytes = 1, 6, 0.0, 4 << 20
    else:
        cfg = dataclasses.replace(base, n_layers=args.layers, tie_embeddings=True)
        distinct, prompt, min_seconds, copy_bytes = args.distinct_layers, args.prompt, args.min_seconds, 1 << 30
    energy = gpu_energy_meter()
    out = {"b": part_b(cp, cfg, min(distinct, cfg.n_layers), prompt, args.tokens, energy, min_seconds, copy_bytes),
           "c": part_c(args.tokens, energy, min_seconds)}
    report(out)
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()

"""Prompt prefill through ONNX Runtime (CPU provider) against the numpy backend's batched prefill, and
the cost of the export, on a randomly initialised 110M-parameter ReLU Llama (llama2.c's stories110M
shape: dim 768, 12 layers, 12 heads, FFN 2048, vocab 32000, tied embeddings).

  python scripts/bench_prefill_onnx.py [--dtype int8] [--prompt-tokens 512] [--rounds 3] [--workdir DIR]

Export: wall time and peak RSS (VmHWM) of a child process that loads the packed model (sha256
verify included) and writes the fp32 and then the packed export; bar: < 30 s, peak < fp32 size + 500 MB.
Prefill: the same random prompt through each path, rounds alternating between paths, medians; the
ratio numpy / onnxruntime is printed. Both use every core (OpenBLAS threads, ORT intra-op threads).
"""

from __future__ import annotations

import edge_runtime  # noqa: F401  (before numpy, as the CLI does: OpenBLAS's idle spin, edge_runtime/blas_spin.py)

# isort: split
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edge_runtime.cli_args import description

SHAPE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 2048,
         "vocab_size": 32000}


def build_model(work: Path, dtype: str, seed: int) -> Path:
    """The random HF checkpoint converted to `dtype`; reused when already in `work`."""
    packed = work / f"packed-{dtype}"
    if (packed / "manifest.yaml").is_file():
        return packed
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise SystemExit("bench_prefill_onnx.py: error: builds its random model with transformers: "
                         "pip install '.[train]'") from None

    from edge_runtime.pack.convert import convert

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPE, hidden_act="relu", tie_word_embeddings=True, max_position_embeddings=1024,
                      num_key_value_heads=12, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"random ReLU Llama: {n_params / 1e6:.1f} M parameters (seed {seed})", flush=True)
    model.save_pretrained(work / "hf", safe_serialization=True)
    del model
    convert(work / "hf", packed, dtype, progress=False, overwrite=True)
    return packed


def peak_rss_mb() -> float:
    """This process's peak resident set. VmHWM belongs to the address space made at exec; ru_maxrss
    would also carry the parent's resident set, which a forked child holds until it execs (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def export_child(model_dir: str, out_dir: str) -> None:
    """Runs in the child: load + fp32 export + packed export, timed; prints one JSON line."""
    from edge_runtime.export.onnx_export import export_onnx
    from edge_runtime.export.onnx_graph import ExportOptions
    from edge_runtime.pack.loader import load_packed

    t0 = time.perf_counter()
    model = load_packed(model_dir)
    load_s = time.perf_counter() - t0
    result = {"load_verify_s": load_s}
    for dtype in ("fp32", "packed"):
        info = export_onnx(model, Path(out_dir) / f"{dtype}.onnx", ExportOptions(dtype=dtype, logits="last"))
        result[f"export_{dtype}_s"] = info["seconds"]
        result[f"export_{dtype}_mb"] = sum(f["bytes"] for f in info["files"].values()) / 1e6
        result[f"peak_rss_after_{dtype}_mb"] = peak_rss_mb()
    print(json.dumps(result))


def measure_export(model_dir: Path, out_dir: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--export-child", str(model_dir), str(out_dir)],
                          check=True, capture_output=True, text=True)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["child_wall_s"] = time.perf_counter() - t0  # interpreter start and imports included
    return row


def time_prefill(model_dir: Path, n_tokens: int, rounds: int, seed: int, cache: Path) -> dict:
    from edge_runtime.export.onnx_prefill import OnnxPrefill
    from edge_runtime.runtime import load

    rt = load(model_dir, profile=None, backend="cpu", max_context=1024)
    ids = [int(i) for i in np.random.default_rng(seed).integers(3, rt.config.vocab_size, n_tokens)]
    sessions = {dtype: OnnxPrefill(rt.model, providers=["CPUExecutionProvider"], dtype=dtype, cache_dir=cache)
                for dtype in ("fp32", "packed")}

    def numpy_prefill():
        rt.decoder.reset()
        return rt.decoder.forward(ids, last_only=True)[-1]

    paths = {"numpy": numpy_prefill, **{f"ort_{d}": (lambda s=s: s.run(ids)[0]) for d, s in sessions.items()}}
    last = {name: fn() for name, fn in paths.items()}  # warm-up, and the logits to compare
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    ref = last["numpy"]
    row = {"prompt_tokens": n_tokens, "rounds": rounds, "providers": sessions["fp32"].providers_chosen,
           "numpy_s": med["numpy"]}
    for d in sessions:
        row[f"ort_{d}_s"] = med[f"ort_{d}"]
        row[f"speedup_ort_{d}_over_numpy"] = med["numpy"] / med[f"ort_{d}"]
        row[f"logits_rel_err_{d}"] = float(np.abs(last[f"ort_{d}"] - ref).max() / np.abs(ref).max())
    row["all_times_s"] = {name: [round(t, 3) for t in ts] for name, ts in times.items()}
    return row


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--export-child":
        export_child(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--dtype", default="int8", choices=("fp32", "fp16", "int8", "int4"), help="packed encoding")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edge-bench-prefill-onnx"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(args.workdir, args.dtype, args.seed)
    from edge_runtime.pack.loader import load_packed

    cfg = load_packed(model_dir, verify=False).config
    fp32_mb = 4 * sum(m.shape[0] * m.shape[1] for m in load_packed(model_dir, verify=False).matrices.values()) / 1e6
    print(f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}; packed {args.dtype}: {cfg.n_layers} layers, "
          f"d {cfg.dim}, FFN {cfg.ffn_dim} ({cfg.activation}); fp32 weights {fp32_mb:.0f} MB", flush=True)
    export = measure_export(model_dir, args.workdir / "export")
    export["peak_rss_bar_mb"] = fp32_mb + 500
    print("export", json.dumps(export), flush=True)
    prefill = time_prefill(model_dir, args.prompt_tokens, args.rounds, args.seed, args.workdir / "cache")
    print("prefill", json.dumps(prefill), flush=True)
    print(f"prefill {args.prompt_tokens} tokens: numpy {prefill['numpy_s']:.2f} s, onnxruntime fp32 "
          f"{prefill['ort_fp32_s']:.2f} s ({prefill['speedup_ort_fp32_over_numpy']:.2f} x), packed "
          f"{prefill['ort_packed_s']:.2f} s ({prefill['speedup_ort_packed_over_numpy']:.2f} x); export fp32 "
          f"{export['export_fp32_s']:.1f} s, packed {export['export_packed_s']:.1f} s, peak RSS of the whole export "
          f"{export['peak_rss_after_packed_mb']:.0f} MB (bar {export['peak_rss_bar_mb']:.0f} MB)")


if __name__ == "__main__":
    main()

"""CPU backend decode benchmark: tokens/s, achieved weight GB/s and its fraction of a numpy copy's bandwidth
measured in the same run, a plain PyTorch fp32 decode loop on the same weights, peak RSS of generate.

  python scripts/bench_cpu.py --model DIR [--policy] [--tokens 256] [--repeats 3] [--rounds 3] [--threads 1]
  python scripts/bench_cpu.py --hf ../shared/models/stories260K-hf --dtype fp32   (converts first)
  python scripts/bench_cpu.py --synthetic 110m --dtype int8 --threads 1 --rounds 3  (no checkpoint needed)

--synthetic builds a random Llama of the named shapes from a transformers config (seed fixed, cached under
--workdir), converts it, and alternates rounds of: a numpy copy (read + write bandwidth), edge-runtime
decode, and a PyTorch fp32 greedy decode loop with KV cache on the unconverted weights (torch threads =
--threads). Decode tokens/s is timed over the decode steps only; medians and min-max spread are printed.
--model (or --hf) alternates rounds of dense decode and sparse decode (--policy: the model's policy setting;
--alpha), each the median of --repeats generations, and prints the medians, their spread and each round's ratio.
Peak RSS is measured on a separate `edge-runtime generate` process.
"""

from __future__ import annotations

import edge_runtime  # noqa: F401  (before numpy, as the CLI does: OpenBLAS's idle spin, edge_runtime/blas_spin.py)

# isort: split
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_runtime.bench import decode_rate, print_report
from edge_runtime.cli_args import description
from edge_runtime.pack.convert import convert
from edge_runtime.runtime import load

# Random Llamas of published shapes: llama2.c stories110M and TinyLlama 1.1B (vocab 32000 both).
SHAPES = {
    "110m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 intermediate_size=2048),
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632),
}
PROMPT_IDS = [1, 450, 2030, 338, 263]


# Run the CLI in a fresh interpreter and print its own VmHWM (peak RSS of this address space) at exit:
# getrusage(RUSAGE_CHILDREN) would include the pages a big parent shares with the child at fork time.
_RSS_CHILD = ("import sys\nfrom edge_runtime.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
              "    s = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
              "    print('VmHWM', s['VmHWM'].split()[0], file=sys.stderr)\n")


def peak_rss_mb(model: Path, prompt: str, tokens: int, threads: int | None) -> float:
    """Peak RSS (VmHWM) of a child `edge-runtime generate`, in MB."""
    cmd = [sys.executable, "-c", _RSS_CHILD, "generate", "--model", str(model), "--prompt", prompt,
           "--max-new-tokens", str(tokens), "--backend", "cpu"]
    if threads:
        cmd += ["--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    hwm = [line.split()[1] for line in res.stderr.splitlines() if line.startswith("VmHWM")]
    if res.returncode != 0 or not hwm:
        raise RuntimeError(f"generate failed: {res.stderr[-2000:]}")
    return int(hwm[0]) / 1024


def build_synthetic(name: str, dtype: str, workdir: Path) -> tuple[Path, Path]:
    """(HF directory, packed directory) of a random Llama with SHAPES[name], built once and kept."""
    hf, packed = workdir / f"llama-{name}-hf", workdir / f"llama-{name}-{dtype}"
    if not (hf / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                          tie_word_embeddings=False, **SHAPES[name])
        model = LlamaForCausalLM(cfg).eval()
        model.save_pretrained(hf, safe_serialization=True)
        _byte_level_tokenizer(hf)
    if not (packed / "manifest.yaml").exists():
        convert(hf, packed, dtype, progress=False)
    return hf, packed


def _byte_level_tokenizer(out: Path) -> None:
    """A small byte-level BPE tokenizer.json (ids below the model's vocabulary) so `generate` takes text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["once upon a time there was a little robot who liked the sea"] * 10, trainer)
    tok.save(str(out / "tokenizer.json"))


def copy_gbps(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """numpy copy of nbytes: (read + write) bytes per second, best of repeats, in GB/s."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best / 1e9


def torch_rate(hf: Path, tokens: int, threads: int):
    """A plain PyTorch fp32 greedy decode loop with KV cache: returns a function -> decode tokens/s."""
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()

    def run() -> float:
        with torch.inference_mode():
            out = model(torch.tensor([PROMPT_IDS]), use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(tokens):
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return tokens / (time.perf_counter() - t)

    return run, sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n) * 4


def weight_bytes_per_token(rt) -> int:
    """Bytes of every matrix a dense decode step reads (all layers and the output head; the embedding
    row is negligible)."""
    w = rt.backend.weights
    mats = [w.lm_head] + [m for lay in w.layers for m in (lay.q.w, lay.k.w, lay.v.w, lay.o.w, lay.gate.w,
                                                            lay.down_t) + ((lay.up.w,) if lay.up else ())]
    return sum(m.nbytes for m in mats)


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def synthetic(args) -> dict:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("bench_cpu.py: error: --synthetic builds its model with transformers and times a PyTorch "
                         "loop: pip install '.[train]' (--model and --hf need neither)") from None
    workdir = args.workdir or Path(tempfile.gettempdir()) / "edge-runtime-bench"
    hf, packed = build_synthetic(args.synthetic, args.dtype, workdir)
    threads = args.threads or 1
    rt = load(packed, profile=None, backend="cpu", threads=threads)
    er_bytes = weight_bytes_per_token(rt)
    torch_run, torch_bytes = torch_rate(hf, args.tokens, threads)
    rt.generate(PROMPT_IDS, max_new_tokens=4, stop=())  # warm-up (compiles or loads the kernels)
    torch_run()
    rows: dict[str, list[float]] = {k: [] for k in ("copy_gbps", "er_tps", "torch_tps")}
    for _ in range(args.rounds):  # alternating rounds: the machine's load hits every engine alike
        rows["copy_gbps"].append(copy_gbps())
        rows["er_tps"].append(rt.generate(PROMPT_IDS, max_new_tokens=args.tokens, stop=()).decode_tokens_per_s)
        rows["torch_tps"].append(torch_run())
    copy = statistics.median(rows["copy_gbps"])
    er = [t * er_bytes / 1e9 for t in rows["er_tps"]]
    pt = [t * torch_bytes / 1e9 for t in rows["torch_tps"]]
    out = {"model": f"random llama {args.synthetic} ({hf.name})", "encoding": args.dtype, "threads": threads,
           "tokens": args.tokens, "rounds": args.rounds, "copy_gbps": spread(rows["copy_gbps"]),
           "weight_mb_per_token": er_bytes / 1e6, "tokens_per_s": spread(rows["er_tps"]),
           "weight_gbps": spread(er), "copy_fraction": statistics.median(er) / copy,
           "torch_fp32_tokens_per_s": spread(rows["torch_tps"]), "torch_fp32_weight_gbps": spread(pt),
           "torch_copy_fraction": statistics.median(pt) / copy,
           "speedup_over_torch": statistics.median(rows["er_tps"]) / statistics.median(rows["torch_tps"]),
           "packed_mb_on_disk": sum(f.stat().st_size for f in packed.iterdir()) / 1e6}
    if args.rss:
        out["peak_rss_mb"] = peak_rss_mb(packed, "Once upon a time", args.tokens, threads)
        out["rss_over_disk_mb"] = out["peak_rss_mb"] - out["packed_mb_on_disk"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--model", type=Path)
    ap.add_argument("--hf", type=Path, help="Hugging Face directory to convert first")
    ap.add_argument("--synthetic", choices=sorted(SHAPES), help="build a random Llama of these shapes")
    ap.add_argument("--workdir", type=Path, default=None, help="where --synthetic keeps its models")
    ap.add_argument("--dtype", default=None, help="encoding to convert to (default fp32 for --hf, int8 else)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating rounds (--synthetic: copy, edge-runtime, PyTorch; --model: dense, sparse)")
    ap.add_argument("--rss", action="store_true", help="--synthetic: also the peak RSS of generate")
    ap.add_argument("--alpha", type=float, default=None, help="also time sparse decode at this alpha")
    ap.add_argument("--policy", action="store_true", help="also time sparse decode at the model's policy setting")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.synthetic:
        args.dtype = args.dtype or "int8"
        row = synthetic(args)
    else:
        row = packed_model(args, ap)
    if args.json:
        print(json.dumps(row))
    else:
        print_report({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in row.items()}, 28)


def packed_model(args, ap) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.hf:
            model = Path(tmp) / "packed"
            convert(args.hf, model, args.dtype or "fp32", progress=False)
        rt = load(model, profile="auto" if args.policy else None, backend="cpu", threads=args.threads)
        setting = args.alpha if args.alpha is not None else (
            rt.rules_for(rt.selection) if args.policy and rt.selection is not None else None)
        if setting is not None and not rt.config.relu_family:
            setting = None
        teal = (rt.teal_for(rt.selection), rt.attention_criterion(rt.selection)) if (
            setting is not None and args.policy and args.alpha is None) else (None, "teal")
        dense, sparse, stats = [], [], {}
        for _ in range(args.rounds):  # dense and sparse alternate: the ratio comes from one machine state
            rt.decoder.set_teal(None)
            rt.set_sparsity(None)
            dense.append(decode_rate(rt, args.prompt, args.tokens, args.repeats)[0])
            if setting is not None:  # the selection's attention thresholds go with its rules
                rt.decoder.set_teal(*teal)
                rt.set_sparsity(setting)
                rate, stats = decode_rate(rt, args.prompt, args.tokens, args.repeats)
                sparse.append(rate)
        row = {"model": str(args.hf or model or "default model"), "encoding": rt.model.manifest["encoding"],
               "threads": rt.backend.threads, "weight_mb": rt.model.weight_bytes / 1e6, "rounds": args.rounds,
               "decode_tokens_per_s_dense": statistics.median(dense), "dense_spread": spread(dense)}
        if sparse:
            row.update(decode_tokens_per_s_sparse=statistics.median(sparse), sparse_spread=spread(sparse),
                       sparse_over_dense=statistics.median(sparse) / statistics.median(dense),
                       sparse_over_dense_per_round=[round(s / d, 3) for s, d in zip(sparse, dense, strict=True)],
                       ffn_bytes_fraction=stats["ffn_bytes_fraction"])
        if model is not None:
            row["peak_rss_mb"] = peak_rss_mb(model, args.prompt, args.tokens, args.threads)
            row["rss_over_weights_mb"] = row["peak_rss_mb"] - row["weight_mb"]
    return row


if __name__ == "__main__":
    main()

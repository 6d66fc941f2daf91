"""The edge-runtime command line. Every user error ends as one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from edge_runtime import cli_args as argtypes
from edge_runtime.errors import EdgeRuntimeError, install_extra
from edge_runtime.version import __version__

DEMO_PROMPT = "The old man looked at the sea and"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="packed model directory (default: the embedded default model)")
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--prefill", default="native", choices=("native", "onnx"),
                   help="prompt prefill: the backend's own batched pass, or the dense model exported to ONNX and run "
                        "by ONNX Runtime (TensorRT, CUDA or CPU provider, whichever is installed)")
    p.add_argument("--max-context", type=argtypes.count, default=None, help="KV cache positions (default 2048)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the weights at load")
    p.add_argument("--manifest-sha256", default=None, metavar="DIGEST",
                   help="refuse the model unless its manifest.yaml has this sha256 (as 'info' prints)")
    _add_threads_arg(p)


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=argtypes.int_range(1, 1024), default=None,
                   help="cpu backend compute threads (default: the cores numpy's BLAS would use; one when a "
                        "decode step reads under 16 MB). With other busy processes, use fewer than the cores "
                        "they leave free: two threads on two cores, one of them busy, decode at half the speed "
                        "of one thread")


def _add_sparsity_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--sparsity", choices=("off", "on", "teal"), default=default,
                   help="on: sign-plane predicted FFN sparsity (ReLU-family models); teal: magnitude "
                        "activation sparsity on every projection (any model, needs a TEAL calibration)")
    p.add_argument("--teal-target", type=argtypes.fraction, default=0.4, help="TEAL sparsity target (a calibrated one)")
    p.add_argument("--alpha", type=argtypes.alpha, default=None,
                   help="one alpha for every layer, overriding the profile's per-layer selection")
    _add_policy_args(p)


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="auto", help="device profile: auto (detect), a name, or a YAML path")
    p.add_argument("--power-mode", default=None, help="power mode to plan for (default: detected or the profile's)")
    p.add_argument("--latency-ms", type=argtypes.float_range(0.0, 1e6, low_open=True), default=None,
                   help="per-token latency target for the policy (default: the profile's decode_target)")
    p.add_argument("--tokens-per-s", type=argtypes.float_range(0.0, 1e9, low_open=True), default=None,
                   help="the same target as decode tokens/s")
    p.add_argument("--quality-budget", type=argtypes.float_range(0.0, 1000.0), default=None,
                   help="perplexity increase in percent the policy may not exceed (default: the profile's cap, 1)")
    p.add_argument("--predictor", default="auto", choices=("auto", "sparseinfer", "projection"),
                   help="which calibrated predictor the policy uses (auto: the one reading fewer bytes)")


class OneLineErrors(argparse.ArgumentParser):
    """A usage error is one line naming the error and where to read more, not the whole usage block first
    (subcommands' parsers are made of this class too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineErrors(prog="edge-runtime", description="LLM runtime for Jetson Orin with "
                                 "sign-bit predicted activation sparsity.")
    ap.add_argument("--version", action="version", version=f"edge-runtime {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="generate from the embedded default model with sparse decode")
    _add_threads_arg(p)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("convert", help="pack a Hugging Face checkpoint directory")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default=None, choices=("fp32", "fp16", "int8", "int4"), help="default int8")
    p.add_argument("--for-device", default=None, metavar="NAME|auto",
                   help="pack with the encoding the memory planner picks for this profile (auto: this device)")
    p.add_argument("--context", type=argtypes.count, default=2048, help="KV cache length --for-device plans for")
    p.add_argument("--group-size", type=argtypes.int_range(2, 1 << 16, even=True), default=64,
                   help="int4 group along K")
    p.add_argument("--default-alpha", type=argtypes.alpha, default=None,
                   help="the alpha this model decodes with unless told otherwise (stored in the manifest)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing packed model at OUT_DIR (never the input or a folder of other files)")
    p.add_argument("--weight-sparsity", type=argtypes.float_range(0.0, 1.0, high_open=True), default=0.0,
                   help="prune this fraction of every attention and FFN row; stored compressed (fp16/int8)")
    p.add_argument("--prune", default="magnitude", choices=("magnitude", "wanda"))
    p.add_argument("--calib-text", default=None, help="UTF-8 text for Wanda's activation norms")

    p = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=argtypes.count, default=128)
    p.add_argument("--temperature", type=argtypes.temperature, default=0.0)
    p.add_argument("--top-k", type=argtypes.int_range(0, argtypes.MAX_COUNT), default=0)
    p.add_argument("--top-p", type=argtypes.probability, default=1.0)
    p.add_argument("--repetition-penalty", type=argtypes.penalty, default=1.0)
    p.add_argument("--seed", type=argtypes.seed, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--recall", action="store_true", help="also measure predictor recall (runs the dense gate)")
    _add_sparsity_args(p, "off")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("eval", help="perplexity dense vs sparse and FFN sparsity on a text file")
    _add_model_args(p)
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--max-tokens", type=argtypes.count, default=4096)
    p.add_argument("--window", type=argtypes.count, default=256)
    _add_sparsity_args(p, "on")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP daemon (needs the serve extra)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=argtypes.port, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--max-queue", type=argtypes.int_range(0, 4096), default=8,
                   help="requests waiting beyond the running one")
    p.add_argument("--max-tokens-limit", type=argtypes.count, default=512)
    p.add_argument("--shutdown-grace", type=argtypes.float_range(0.0, 3600.0), default=5.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, how long the running generation may go on before it is stopped "
                        "(queued requests get 503 at once)")
    _add_sparsity_args(p, "on")

    p = sub.add_parser("chat", help="interactive chat in the terminal, streamed")
    _add_model_args(p)
    p.add_argument("--max-new-tokens", type=argtypes.count, default=128)
    p.add_argument("--temperature", type=argtypes.temperature, default=0.7)
    p.add_argument("--top-p", type=argtypes.probability, default=0.9)
    p.add_argument("--system", default=None, help="system message")
    _add_sparsity_args(p, "on")

    p = sub.add_parser("calibrate", help="calibrate the predictor on text; writes calibration.yaml into the model")
    p.add_argument("--model", required=True,
                   help="packed model directory, rewritten in place (the embedded model ships calibrated: to "
                        "recalibrate it, copy edge_runtime/data/default-model and name the copy)")
    p.add_argument("--text", required=True, help="UTF-8 calibration text (not the evaluation text)")
    p.add_argument("--max-tokens", type=argtypes.count, default=2048)
    p.add_argument("--window", type=argtypes.count, default=256)
    p.add_argument("--teal-targets", default="auto",
                   help="comma-separated TEAL sparsity targets; auto: 0.25,0.4,0.5 for non-ReLU models, none for ReLU")
    p.add_argument("--attention-levels", default="auto",
                   help="ReLU models: comma-separated TEAL sparsity levels of the attention inputs the selection path "
                        "may move through (from 0); auto: 0,0.1,...,0.7; none: FFN-only paths")
    p.add_argument("--attention-criterion", choices=("teal", "wina"), default="teal",
                   help="which channels the attention thresholds keep: |x| >= t (teal) or |x| * weight column "
                        "norm >= t (wina)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("profile", help="device profiles: list, show, detect, select")
    psub = p.add_subparsers(dest="profile_command", required=True, metavar="ACTION")
    q = psub.add_parser("list", help="profiles known to this installation")
    q.add_argument("--json", action="store_true")
    q = psub.add_parser("show", help="one profile with its power modes")
    q.add_argument("name")
    q.add_argument("--json", action="store_true")
    q = psub.add_parser("detect", help="the profile and power mode of this machine")
    q.add_argument("--json", action="store_true")
    q = psub.add_parser("select", help="per-layer alphas for a profile, power mode and objective")
    q.add_argument("--model", help="calibrated packed model (default: the embedded default model)")
    _add_policy_args(q)
    q.add_argument("--context", type=argtypes.count, default=2048, help="KV cache length for the memory plan")
    q.add_argument("--json", action="store_true")

    p = sub.add_parser("monitor", help="power, clocks, memory and tokens/s, live; optionally around a command")
    p.add_argument("--interval", type=argtypes.float_range(0.0, 3.6e6, low_open=True), default=100.0,
                   help="sampling interval in ms")
    p.add_argument("--jsonl", default=None, help="append samples and token events to this JSONL file")
    p.add_argument("--prometheus", type=argtypes.port, default=None, metavar="PORT",
                   help="serve /metrics on 127.0.0.1:PORT")
    p.add_argument("--duration", type=argtypes.float_range(0.0, 1e7, low_open=True), default=None,
                   help="stop after this many seconds; a wrapped command still running then is stopped "
                        "(exit status 124, as timeout(1))")
    p.add_argument("wrapped", nargs=argparse.REMAINDER, help="-- COMMAND ...: monitor while it runs")

    p = sub.add_parser("report", help="summary and PNG plots from a monitor JSONL file or a tegrastats log")
    p.add_argument("jsonl", nargs="?", help="JSONL written by 'edge-runtime monitor --jsonl'")
    p.add_argument("--tegrastats", default=None, help="a tegrastats log instead")
    p.add_argument("--out", required=True, help="output directory for summary.json and PNGs")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("bench", help="decode tokens/s, dense and sparse, measured in one run")
    _add_model_args(p)
    p.add_argument("--prompt", default=DEMO_PROMPT)
    p.add_argument("--tokens", type=argtypes.count, default=128)
    p.add_argument("--repeats", type=argtypes.int_range(1, 1000), default=3)
    _add_sparsity_args(p, "on")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("info", help="what a packed model directory holds")
    p.add_argument("model_dir", nargs="?", default=None, help="packed model directory (default: the embedded model)")
    p.add_argument("--verify", action="store_true", help="also check every file's sha256 (sizes are always checked)")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export-onnx", help="the dense forward as an ONNX graph (ONNX Runtime, TensorRT)")
    p.add_argument("model_dir", metavar="MODEL", help="packed model directory")
    p.add_argument("out", metavar="OUT.onnx")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "packed"),
                   help="packed: int8/int4 weights stay quantised as DequantizeLinear initialisers (opset 21)")
    p.add_argument("--max-context", type=argtypes.count, default=None,
                   help="RoPE table rows: the positions the graph accepts (default: the model's)")
    p.add_argument("--logits", default="all", choices=("all", "last"), help="logits of every position or the last")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the weights")
    p.add_argument("--json", action="store_true")
    return ap


def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeRuntimeError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _say_if_compiling(backend: str, model: str | None) -> None:
    """One line on stderr when this command's cpu kernels are not compiled yet: the first command after an
    install spends seconds compiling them (numba, cached beside the package) and would look hung. Not for a
    model path that holds no model: that fails before anything compiles, and its error is the only line."""
    from edge_runtime.backends import resolve_backend
    from edge_runtime.paths import resolve_model

    if resolve_backend(backend) == "cuda" or not (resolve_model(model) / "manifest.yaml").is_file():
        return
    from edge_runtime.backends.cpu_fused import fused_layer
    from edge_runtime.backends.jit import compile_pending

    if compile_pending(fused_layer):
        print("edge-runtime: compiling the cpu kernels (once after an install; later runs load them from the "
              "cache)", file=sys.stderr)


def _load(args, watch_power: bool = False):
    """The runtime for a command; long-running ones (serve, chat) follow the board's power mode."""
    import warnings

    from edge_runtime.devices.planner import KVBudgetWarning
    from edge_runtime.runtime import load

    pinned = _pinned_digest(args.manifest_sha256)
    _say_if_compiling(args.backend, args.model)
    _say_if_threads_capped(args.threads, args.backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", KVBudgetWarning)
        rt = load(args.model, profile=getattr(args, "profile", "auto"), backend=args.backend,
                  max_context=args.max_context, verify=not args.no_verify,
                  power_mode=getattr(args, "power_mode", None), objective=_objective(args),
                  predictor=getattr(args, "predictor", "auto"), watch_power=watch_power and args.power_mode is None,
                  prefill=args.prefill, threads=args.threads)
    for w in caught:  # the shortened KV budget, one line each
        print(f"edge-runtime: warning: {w.message}", file=sys.stderr)
    if pinned and rt.model.manifest_sha256 != pinned:  # the digest of the bytes that were parsed
        rt.close()
        raise EdgeRuntimeError(f"{rt.model.path}/manifest.yaml has sha256 {rt.model.manifest_sha256}, not the "
                               f"pinned {pinned}: the model was changed")
    return rt


def _pinned_digest(text: str | None) -> str | None:
    """--manifest-sha256 as 64 lowercase hex digits, checked before anything loads: a mistyped digest is not
    a changed model."""
    if text is None:
        return None
    digest = text.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise EdgeRuntimeError(f"--manifest-sha256 {text!r} is not a sha256 digest (64 hex digits, as "
                               f"'edge-runtime info MODEL' prints)")
    return digest


def _say_if_threads_capped(asked: int | None, backend: str) -> None:
    """The compiled kernels run on at most numba's pool (the machine's cores): a larger --threads is capped there
    (jit.use_threads); say so rather than let a benchmark claim threads it did not get."""
    from edge_runtime.backends import resolve_backend

    if asked is None or resolve_backend(backend) != "cpu":
        return
    from edge_runtime.backends.jit import max_threads

    most = max_threads()
    if asked > most:
        print(f"edge-runtime: warning: --threads {asked}: the cpu kernels run on at most {most} "
              f"thread{'s' * (most != 1)} here; using {most}", file=sys.stderr)


def _objective(args):
    from edge_runtime.sparsity.policy import Objective

    return Objective.from_flags(getattr(args, "latency_ms", None), getattr(args, "tokens_per_s", None),
                                getattr(args, "quality_budget", None))


def _sparse_setting(args, rt) -> list | float | None:
    """The decode setting the flags ask for: off/teal -> None (TEAL is set on the runtime); --alpha ->
    SparseInfer at that alpha everywhere; else the profile policy's per-layer rules (either predictor),
    else SparseInfer at the model's default alpha."""
    if args.sparsity in ("off", "teal"):
        rt.set_teal(args.teal_target if args.sparsity == "teal" else None)
        return None
    rt.set_teal(None)
    if args.alpha is not None:
        return args.alpha
    if rt.selection is None:
        return rt.default_alpha
    # the selection's attention thresholds (None: dense) and the criterion they were calibrated for
    rt.decoder.set_teal(rt.teal_for(rt.selection), rt.attention_criterion(rt.selection))
    return rt.rules_for(rt.selection)


def _apply_sparsity(args, rt, measure_recall: bool = False) -> None:
    """As _sparse_setting, but a policy selection stays in the policy's hands (power-mode changes apply)."""
    if args.sparsity == "on" and not rt.config.relu_family:
        print(f"note: {rt.config.activation} model: sparse decode needs a ReLU-family FFN; decoding dense",
              file=sys.stderr)
        rt.set_sparsity(None)
        return
    if args.sparsity == "on" and args.alpha is None and rt.follow_policy(measure_recall):
        return
    rt.set_sparsity(_sparse_setting(args, rt), measure_recall)


def cmd_convert(args) -> int:
    from edge_runtime.pack.convert import check_options, convert

    dtype, sparsity = args.dtype or "int8", args.weight_sparsity
    if args.for_device:
        if args.dtype is not None or args.weight_sparsity:
            raise EdgeRuntimeError("--for-device picks the encoding; leave out --dtype and --weight-sparsity")
        dtype, sparsity = _encoding_for_device(Path(args.hf_dir), args.for_device, args.context)
    norms = None
    if sparsity and args.prune == "wanda" and args.calib_text:
        from edge_runtime.sparsity.wanda import input_norms

        check_options(dtype, sparsity, args.prune)
        norms = input_norms(Path(args.hf_dir), _read_text(args.calib_text))
    m = convert(Path(args.hf_dir), Path(args.out_dir), dtype, args.group_size, args.overwrite,
                progress=sys.stderr.isatty(), default_alpha=args.default_alpha,
                weight_sparsity=sparsity, prune=args.prune, input_norms=norms)
    size = sum(f["bytes"] for f in m["files"].values())
    ws = f", weight sparsity {sparsity:g}" if sparsity else ""
    print(f"packed {m['model']['arch']} ({m['model']['n_layers']} layers, {dtype}{ws}) into {args.out_dir}: "
          f"{size / 1e6:.2f} MB")
    if m["tokenizer"] is None:
        print(f"edge-runtime: note: {args.hf_dir} has no tokenizer.json; the packed model takes token ids, not text",
              file=sys.stderr)
    return 0


def _encoding_for_device(hf_dir: Path, name: str, context: int) -> tuple[str, float]:
    """(dtype, weight sparsity) the memory planner picks for the checkpoint on that profile."""
    from edge_runtime.devices.planner import plan_memory, split_encoding
    from edge_runtime.devices.profile import load_profile
    from edge_runtime.pack.hf_config import model_config_from_hf, read_hf_config

    if name == "auto":
        from edge_runtime.devices.detect import detect

        name = detect().profile
    profile = load_profile(name)
    cfg = model_config_from_hf(read_hf_config(hf_dir))
    plan = plan_memory(cfg, profile, min(context, cfg.max_positions))
    print(f"planned for {profile.name}: {plan.encoding} ({plan.needed_gb[plan.encoding]:.2f} GB with a "
          f"{plan.context}-token KV cache of {plan.budget_gb:.2f} GB usable)", file=sys.stderr)
    return split_encoding(plan.encoding)


def _print_generation(rt, res, as_json: bool, label: str = "") -> None:
    stats = rt.ffn_stats()
    if as_json:
        print(json.dumps({"text": res.text, "token_ids": res.token_ids, "prompt_tokens": res.prompt_tokens,
                          "finish_reason": res.finish_reason, "tokens_per_s": res.decode_tokens_per_s,
                          "prefill_s": res.prefill_s, "decode_s": res.decode_s, "ffn": stats}))
        return
    print(label + res.text)
    print(f"\n[{len(res.token_ids)} tokens, {res.decode_tokens_per_s:.1f} tokens/s decode, "
          f"finish: {res.finish_reason}]", file=sys.stderr)
    if stats.get("decode_steps"):
        line = (f"[FFN: predicted density {stats['predicted_density']:.3f}, actual density "
                f"{stats['actual_density']:.3f}, weight bytes read {stats['ffn_bytes_fraction']:.3f} of dense")
        if "recall" in stats:
            line += f", recall {stats['recall']:.3f}"
        print(line + "]", file=sys.stderr)


def cmd_generate(args) -> int:
    rt = _load(args)
    if args.sparsity == "on" and not rt.config.relu_family:
        raise EdgeRuntimeError(f"sparse decode predicts exact zeros of a ReLU-family FFN; this model's activation "
                               f"is {rt.config.activation} (use --sparsity teal)")
    _apply_sparsity(args, rt, measure_recall=args.recall)
    res = rt.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                      seed=args.seed, stop=args.stop)
    _print_generation(rt, res, args.json)
    return 0


def cmd_demo(args) -> int:
    from edge_runtime.runtime import load

    _say_if_compiling("auto", None)
    _say_if_threads_capped(args.threads, "auto")
    rt = load(None, backend="auto", threads=args.threads, warm_up=False)
    sel = rt.selection
    # Warm up both decode paths: the fused step that generate, chat and serve run (so that the command after the
    # demo does not stall compiling it) and the recall-measuring one the demo runs (its speed figure is then
    # not the kernels' compile).
    for recall in (False, True):
        if not rt.follow_policy(measure_recall=recall):  # the policy's rules and attention thresholds, else default
            rt.set_sparsity(rt.default_alpha, measure_recall=recall)
        rt.warm_up()
    res = rt.generate(DEMO_PROMPT, max_new_tokens=48, repetition_penalty=1.2)
    if not args.json:
        how = (f"profile {rt.profile.name}, mode {rt.power_mode}, {sel.predictor} predictor, per-layer "
               f"{rt.calibration['predictors'][sel.predictor]['knob']} {sel.knobs}" if sel
               else f"alpha {rt.default_alpha}")
        print(f"edge-runtime demo: embedded model, {rt.backend.name} backend, sparse decode ({how}); recall "
              "measured against the dense gate, which costs speed (generate and bench run without it)", file=sys.stderr)
    _print_generation(rt, res, args.json, label=DEMO_PROMPT)
    return 0


FEW_EVAL_TOKENS = 1000  # below this, perplexity differences between settings are mostly noise


def cmd_eval(args) -> int:
    from edge_runtime.devices.sizes import DEFAULT_KV_TOKENS
    from edge_runtime.evaluate import evaluate_text
    from edge_runtime.sparsity.policy import select

    text = _read_text(args.text)
    rt = _load(args)
    res = evaluate_text(rt, text, _sparse_setting(args, rt), window=args.window, max_tokens=args.max_tokens)
    if rt.selection is not None and args.sparsity == "on" and args.alpha is None:
        res["predictor"] = rt.selection.predictor
        res["knobs"] = rt.selection.knobs
        # every calibrated predictor at its own policy selection, on the same text
        res["predictors"] = {}
        teal, criterion = rt.decoder.teal, rt.decoder.teal_criterion
        for name in rt.calibration["predictors"]:
            sel = select(rt.calibration, rt.config, rt.model.manifest["encoding"], rt.profile, rt.power_mode,
                         rt.objective, name, kv_tokens=min(DEFAULT_KV_TOKENS, rt.decoder.max_context))
            rt.decoder.set_teal(rt.teal_for(sel), rt.attention_criterion(sel))
            one = res if name == rt.selection.predictor else evaluate_text(
                rt, text, rt.rules_for(sel), window=args.window, max_tokens=args.max_tokens)
            rt.decoder.set_teal(teal, criterion)
            res["predictors"][name] = {"knobs": sel.knobs, **{k: one[k] for k in (
                "ppl_sparse", "predicted_density", "recall", "top1_agreement", "ffn_bytes_fraction")}}
    if res["tokens"] < FEW_EVAL_TOKENS:
        print(f"edge-runtime: warning: only {res['tokens']} tokens scored; a perplexity change of a few percent "
              f"needs a few thousand (the README's figures use 4,096)", file=sys.stderr)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"tokens {res['tokens']}  ppl dense {res['ppl_dense']:.3f}")
    if "ppl_teal" in res:
        print(f"ppl TEAL {args.teal_target:g}: {res['ppl_teal']:.3f} "
              f"({100 * (res['ppl_teal'] / res['ppl_dense'] - 1):+.2f} %), top-1 agreement {res['top1_agreement']:.4f}")
    if "ppl_sparse" in res:
        print(f"ppl sparse {res['ppl_sparse']:.3f} ({100 * (res['ppl_sparse'] / res['ppl_dense'] - 1):+.2f} %)  "
              f"FFN sparsity {res['ffn_sparsity']:.4f}  predicted density {res['predicted_density']:.3f}  "
              f"recall {res['recall']:.4f}  top-1 agreement {res['top1_agreement']:.4f}  "
              f"FFN bytes {res['ffn_bytes_fraction']:.3f} of dense")
        if "layer_bytes_fraction" in res:
            print(f"weight bytes per token: layers {res['layer_bytes_per_token']:.0f} "
                  f"({res['layer_bytes_fraction']:.3f} of dense; attention {res['attn_bytes_fraction']:.3f}), "
                  f"LM head {res['lm_head_bytes_per_token']:.0f}, step {res['step_bytes_per_token']:.0f} "
                  f"({res['step_bytes_fraction']:.3f} of dense)")
        for r in res["per_layer"]:
            print(f"  layer {r['layer']:2d}: sparsity {r['ffn_sparsity']:.4f}  predicted {r['predicted_density']:.3f}"
                  f"  recall {r['recall']:.4f}  bytes {r['ffn_bytes_fraction']:.3f}")
        for name, r in res.get("predictors", {}).items():
            print(f"  {name}: knobs {r['knobs']}  ppl {100 * (r['ppl_sparse'] / res['ppl_dense'] - 1):+.2f} %  "
                  f"predicted density {r['predicted_density']:.3f}  FFN bytes {r['ffn_bytes_fraction']:.3f}")
    return 0


def cmd_serve(args) -> int:
    try:
        import uvicorn

        from edge_runtime.serve.app import create_app
        from edge_runtime.serve.server import Daemon
    except ImportError as e:
        raise EdgeRuntimeError(f"serve needs the serve extra: {install_extra('serve')} "
                               f"({e.name} is missing)") from None
    sock = _listen(args.host, args.port)  # before the model loads: a taken port fails fast, with one line
    rt = _load(args, watch_power=True)
    _apply_sparsity(args, rt)
    app = create_app(rt, api_key=args.api_key, max_queue=args.max_queue, max_tokens_limit=args.max_tokens_limit)
    server = Daemon(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"), app.state.engine,
                    grace_s=args.shutdown_grace)
    print(f"edge-runtime: serving {rt.name} on http://{args.host}:{args.port} ({rt.backend.name} backend)",
          file=sys.stderr)
    server.run(sockets=[sock])
    if not server.started:
        raise EdgeRuntimeError("the server did not start (see the log line above)")
    return 0


def _listen(host: str, port: int):
    """A bound socket for uvicorn, as uvicorn would make it; an address in use is a user error."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise EdgeRuntimeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def cmd_chat(args) -> int:
    from edge_runtime.chat_repl import run_chat

    if sys.stdin is None:  # started with stdin closed (`<&-`): input() would raise "lost sys.stdin"
        raise EdgeRuntimeError("chat reads its messages from standard input, which is closed; run it in a "
                               "terminal or pipe the messages in, one per line")
    rt = _load(args, watch_power=True)
    _apply_sparsity(args, rt)
    return run_chat(rt, args.system, args.max_new_tokens, args.temperature, args.top_p)


def cmd_calibrate(args) -> int:
    from edge_runtime.paths import resolve_model
    from edge_runtime.runtime import load
    from edge_runtime.sparsity.calibrate import ATTN_LEVELS, calibrate
    from edge_runtime.sparsity.calibration_files import (
        SET_ASIDE,
        check_writable,
        set_aside_broken_calibration,
        write_calibration,
    )
    from edge_runtime.sparsity.teal import teal_kept

    path = Path(args.text)
    text = _read_text(path)
    model_dir = resolve_model(args.model)
    check_writable(model_dir)  # before the minutes calibrating takes, not after
    for name in set_aside_broken_calibration(model_dir):
        print(f"edge-runtime: note: {model_dir / name} did not match the manifest (an interrupted calibrate, or an "
              f"edited file); moved to {name}{SET_ASIDE}, this run writes a new calibration", file=sys.stderr)
    rt = load(model_dir, profile=None, backend="cpu")
    from edge_runtime.progress import Progress

    with Progress("calibrate", "step") as progress:
        try:
            targets = None if args.teal_targets == "auto" else tuple(
                float(t) for t in args.teal_targets.split(",") if t.strip())
        except ValueError:
            raise EdgeRuntimeError(f"--teal-targets must be numbers like 0.25,0.4, got {args.teal_targets!r}") from None
        levels = ATTN_LEVELS if args.attention_levels == "auto" else () if args.attention_levels == "none" else None
        if levels is None:
            try:
                levels = tuple(float(v) for v in args.attention_levels.split(",") if v.strip())
            except ValueError:
                raise EdgeRuntimeError(f"--attention-levels must be numbers like 0,0.2,0.4 or none, got "
                                       f"{args.attention_levels!r}") from None
        calib, thresholds = calibrate(rt, text, source=path.name, window=args.window, max_tokens=args.max_tokens,
                                      teal_targets=targets, attention_levels=levels,
                                      attention_criterion=args.attention_criterion, progress=progress)
    try:
        out = write_calibration(model_dir, calib, thresholds)
    except OSError as e:
        raise EdgeRuntimeError(f"cannot write calibration.yaml into {model_dir}: {e.strerror}") from None
    summary = {"path": str(out), "tokens": calib["text"]["tokens"], "ppl_dense": calib["ppl_dense"],
               "uniform": {p: sec["uniform"] for p, sec in calib["predictors"].items()}}
    if "teal" in calib:
        summary["teal"] = teal_kept(calib["teal"])
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"wrote {out}: {summary['tokens']} tokens, dense perplexity {calib['ppl_dense']:.3f}")
    for p, sec in calib["predictors"].items():
        for u in sec["uniform"]:
            print(f"  {p} {sec['knob']} {u['knob']:g}: ppl {u['ppl_increase_pct']:+.2f} %, "
                  f"FFN bytes {u['ffn_bytes_fraction']:.3f}")
    for t, r in summary.get("teal", {}).items():
        print(f"  teal target {t} ({r['criterion']}): ppl {r['ppl_increase_pct']:+.2f} %")
    return 0


def cmd_profile(args) -> int:
    from edge_runtime.devices.profile import list_profiles, load_profile

    action = args.profile_command
    if action == "list":
        names = list_profiles()
        print(json.dumps(names) if args.json else "\n".join(names))
        return 0
    if action == "show":
        p = load_profile(args.name)
        if args.json:
            print(json.dumps(p.to_dict()))
            return 0
        print(f"{p.name}: {p.description} ({p.kind}, {p.memory_total_gb} GB, default mode {p.default_power_mode})")
        for m in p.power_modes:
            cap = f"{m.watts:g}W" if m.watts else "no cap"
            print(f"  {m.id}: {m.name:11s} {cap:>7s}  GPU {m.gpu_max_mhz:g} MHz  "
                  f"CPU {m.cpu_cores_online}x{m.cpu_max_mhz:g} MHz  EMC {m.emc_max_mhz:g} MHz  "
                  f"{m.memory_bandwidth_gbs:g} GB/s  (effective {p.effective_bandwidth(m.name) / 1e9:.1f} GB/s)")
        return 0
    if action == "detect":
        from edge_runtime.devices.detect import detect

        d = detect()
        out = {"profile": d.profile, "power_mode": d.power_mode, "source": d.source, "details": d.details}
        print(json.dumps(out) if args.json else f"{d.profile} (power mode {d.power_mode or 'unknown'}; {d.source})")
        return 0
    return _profile_select(args)


def _profile_select(args) -> int:
    from edge_runtime.devices.detect import detect
    from edge_runtime.devices.planner import plan_memory
    from edge_runtime.devices.profile import load_profile
    from edge_runtime.pack.loader import load_packed
    from edge_runtime.paths import resolve_model
    from edge_runtime.sparsity.calibration_files import read_calibration
    from edge_runtime.sparsity.policy import select

    model_dir = resolve_model(args.model)
    model = load_packed(model_dir, verify=False)
    calibrated = read_calibration(model_dir)
    if calibrated is None:
        raise EdgeRuntimeError(f"{model_dir} is not calibrated; run 'edge-runtime calibrate --model {model_dir} "
                               f"--text FILE' first")
    name, mode = args.profile, args.power_mode
    if name == "auto":
        found = detect()
        name, mode = found.profile, mode or found.power_mode
    profile = load_profile(name)
    sel = select(calibrated[0], model.config, model.manifest["encoding"], profile, mode, _objective(args),
                 args.predictor)
    plan = plan_memory(model.config, profile, min(args.context, model.config.max_positions))
    out = {**sel.to_dict(), "memory_plan": {"encoding": plan.encoding, "needed_gb": plan.needed_gb,
                                            "budget_gb": plan.budget_gb}}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{profile.name}, power mode {sel.power_mode}: {sel.note}")
    print(f"speed target {'met' if sel.met else 'NOT met'}; quality cap +{sel.quality_cap_pct:g} % held-out "
          f"perplexity" + (", reached" if sel.at_cap else ""))
    knob = calibrated[0]["predictors"][sel.predictor]["knob"]
    print(f"predictor {sel.predictor}, per-layer {knob}: " + " ".join(f"{a:g}" for a in sel.knobs))
    if sel.attention:
        from edge_runtime.sparsity.calibrate import attention_criterion, section_groups

        att = calibrated[0]["predictors"][sel.predictor].get("attention")
        print(f"attention TEAL sparsity per layer [{', '.join(section_groups(att))}] ({attention_criterion(att)}): "
              + " ".join("[" + ", ".join(f"{a:g}" for a in lv) + "]" for lv in sel.attention))
    print(f"FFN bytes {sel.ffn_bytes_fraction:.3f} of dense"
          + (f", attention {sel.attn_bytes_fraction:.3f}, layers {sel.layer_bytes_fraction:.3f}"
             if sel.layer_bytes_fraction is not None else "")
          + f"; {sel.bytes_per_token / 1e6:.3f} MB read per token")
    print(f"PROJECTION from the profile's bandwidth (not a measurement): {sel.projected_ms_per_token:.3f} ms/token, "
          f"{sel.projected_tokens_per_s:.0f} tokens/s")
    if sel.expected_ppl_increase_pct is not None:
        print(f"expected perplexity change (measured at calibration): {sel.expected_ppl_increase_pct:+.2f} %")
    print(f"memory plan: {plan.encoding} fits ({plan.needed_gb[plan.encoding]:.3f} GB of {plan.budget_gb:.2f} GB)")
    return 0


def cmd_monitor(args) -> int:
    from edge_runtime.monitor.command import run_monitor

    command = args.wrapped[1:] if args.wrapped[:1] == ["--"] else args.wrapped
    if args.interval <= 0:
        raise EdgeRuntimeError("--interval must be > 0 ms")
    return run_monitor(args.interval, args.jsonl, args.prometheus, args.duration, command)


def cmd_report(args) -> int:
    from edge_runtime.monitor.report import make_report

    if bool(args.jsonl) == bool(args.tegrastats):
        raise EdgeRuntimeError("give either a JSONL file or --tegrastats LOGFILE")
    source = Path(args.tegrastats or args.jsonl)
    summary = make_report(source, Path(args.out), tegrastats=bool(args.tegrastats))
    if args.json:
        print(json.dumps(summary))
        return 0
    total = summary.get("total_mw")
    print(f"{summary['samples']} samples from {source} ({summary['unparseable_lines']} lines skipped)")
    if total:
        print(f"total power: mean {total['mean']:.0f} mW, peak {total['peak']:.0f} mW")
    for rail, v in summary["rails_mw"].items():
        print(f"  {rail}: mean {v['mean']:.0f} mW, peak {v['peak']:.0f} mW")
    if summary.get("tokens_per_s"):
        print(f"tokens/s {summary['tokens_per_s']:.1f}, latency p50 {summary['latency_ms']['p50']:.2f} ms")
    print(f"plots: {', '.join(summary['plots']) or 'none'} in {args.out}")
    return 0


def cmd_bench(args) -> int:
    from edge_runtime.bench import bench, print_report

    rt = _load(args)
    setting = _sparse_setting(args, rt) if (args.sparsity == "on" and rt.config.relu_family) else None
    res = bench(rt, setting, args.prompt, args.tokens, args.repeats)
    if "tokens_asked" in res:
        print(f"edge-runtime: note: --tokens {args.tokens} is more than the {rt.decoder.max_context}-token context "
              f"holds after the prompt; measured {res['tokens']}", file=sys.stderr)
    if args.json:
        print(json.dumps(res))
        return 0
    print_report(res)
    return 0


def cmd_info(args) -> int:
    from edge_runtime.pack.format import check_files, load_manifest, verify_files
    from edge_runtime.pack.loader import model_config
    from edge_runtime.paths import resolve_model

    model_dir = resolve_model(args.model_dir)
    m, digest = load_manifest(model_dir)
    model_config(model_dir, m)  # a bad config is one line here too
    (verify_files if args.verify else check_files)(model_dir, m)  # a truncated or corrupt file: one line
    checked = "sizes and sha256 checked" if args.verify else "sizes checked (--verify: sha256 too)"
    files = {k: v["bytes"] for k, v in m["files"].items()}
    encodings: dict[str, int] = {}
    for t in m["tensors"].values():
        encodings[t["encoding"]] = encodings.get(t["encoding"], 0) + 1
    info = {"path": str(model_dir), "format": f"{m['format']} v{m['format_version']}", "encoding": m["encoding"],
            "model": m["model"], "tensor_encodings": encodings, "files": files, "total_bytes": sum(files.values()),
            "tokenizer": m["tokenizer"], "chat_template": bool(m.get("chat_template")),
            "sparsity": m.get("sparsity", {}), "manifest_sha256": digest, "files_checked": checked}
    if args.json:
        print(json.dumps(info))
        return 0
    c = m["model"]
    print(f"{model_dir}: {info['format']}, {c['arch']} {c['n_layers']} layers, d {c['dim']}, "
          f"FFN {c['ffn_dim']} ({c['activation']}), heads {c['n_heads']}/{c['n_kv_heads']}, vocab {c['vocab_size']}")
    print(f"weights: {m['encoding']}; tensors by encoding: "
          + ", ".join(f"{k} {v}" for k, v in sorted(encodings.items())))
    print(f"files: {len(files)}, {info['total_bytes'] / 1e6:.2f} MB, {checked}; tokenizer: {m['tokenizer']}; "
          f"chat template: {'yes' if info['chat_template'] else 'no'}")
    print(f"manifest sha256: {digest} (pin it: --manifest-sha256 {digest})")
    return 0


def cmd_export_onnx(args) -> int:
    try:
        from edge_runtime.export.onnx_export import export_onnx
        from edge_runtime.export.onnx_graph import ExportOptions
    except ImportError:
        raise EdgeRuntimeError(f"export-onnx needs the onnx package: {install_extra('onnx')}") from None
    from edge_runtime.pack.loader import load_packed

    opts = ExportOptions(dtype=args.dtype, max_context=args.max_context, logits=args.logits)
    info = export_onnx(load_packed(Path(args.model_dir), verify=not args.no_verify), Path(args.out), opts)
    if args.json:
        print(json.dumps({**info, "options": opts.as_dict()}))
        return 0
    size = sum(f["bytes"] for f in info["files"].values())
    extra = " with its external data file" if info["external"] else ""
    print(f"exported {args.model_dir} ({args.dtype}, opset {opts.opset}) to {args.out}{extra}: "
          f"{size / 1e6:.2f} MB in {info['seconds']:.1f} s; onnx.checker passed")
    return 0


COMMANDS = {"demo": cmd_demo, "convert": cmd_convert, "generate": cmd_generate, "eval": cmd_eval,
            "info": cmd_info, "serve": cmd_serve, "chat": cmd_chat, "calibrate": cmd_calibrate,
            "profile": cmd_profile, "monitor": cmd_monitor, "report": cmd_report, "bench": cmd_bench,
            "export-onnx": cmd_export_onnx}


def check_numba_threads() -> None:
    """numba reads NUMBA_NUM_THREADS when first imported and stops with a bare ValueError traceback for a
    value of 0 or less (one it cannot parse it ignores, with a warning)."""
    raw = os.environ.get("NUMBA_NUM_THREADS", "").strip()
    try:
        bad = int(raw) <= 0
    except ValueError:
        return
    if bad:
        raise EdgeRuntimeError(f"NUMBA_NUM_THREADS={raw}: give a number of threads above 0, or unset it to use "
                               "every core (--threads sets how many a command uses)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_numba_threads()
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a reader gone away shows here, not as "Exception ignored" at interpreter exit
        return status
    except BrokenPipeError:  # the reader went away (`| head`): not an error worth a message
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the interpreter closes it at exit)
        return 0
    except EdgeRuntimeError as e:
        print(f"edge-runtime: error: {e}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as e:  # the machine's limits (disk, permissions, memory): still one line
        what = getattr(e, "strerror", None) or str(e) or type(e).__name__
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"edge-runtime: error: {what}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge-runtime: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

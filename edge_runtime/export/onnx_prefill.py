"""Prompt prefill through ONNX Runtime: the cached export, one InferenceSession per model, and the
present K/V handed back in the numpy backend's KV-cache layout.

Execution providers are tried in the order TensorRT, CUDA, CPU, keeping those the installed
onnxruntime offers; `providers_chosen` is what the session actually enabled (ONNX Runtime drops a
provider whose libraries fail to load), for the CLI to print and the daemon's /health to report.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edge_runtime.errors import EdgeRuntimeError, install_extra
from edge_runtime.export.onnx_cache import cached_export
from edge_runtime.export.onnx_graph import ExportOptions
from edge_runtime.pack.loader import PackedModel

PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
KV = list[tuple[np.ndarray, np.ndarray]]  # per layer (k, v), each (n_kv_heads, T, head_dim) float32


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise EdgeRuntimeError(f"ONNX prefill needs onnxruntime: {install_extra('onnx')} "
                               "(onnxruntime-gpu or a JetPack onnxruntime wheel for CUDA/TensorRT)") from None
    return onnxruntime


def choose_providers(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """The requested providers (default PROVIDER_ORDER), in that order, that `available` offers."""
    wanted = list(requested) if requested else list(PROVIDER_ORDER)
    chosen = [p for p in wanted if p in available]
    if not chosen:
        raise EdgeRuntimeError(f"none of the execution providers {', '.join(wanted)} is available in this "
                               f"onnxruntime (it offers {', '.join(available)})")
    return chosen


def session_options():
    """ONNX Runtime fuses DequantizeLinear + MatMul (int8 per-axis and blocked int4) into MatMulNBits,
    which by default quantises the activations to int8 (accuracy level 4: relative logit error about
    5e-3 here); level 1 keeps them fp32, as our backends compute."""
    so = _ort().SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    return so


class OnnxPrefill:
    """Runs a prompt through the exported dense graph (logits of the last position only).

    dtype: the export's weight storage (fp32 | fp16 | packed); max_context: rows of the position
    tables (None: the model's max_positions); cache_dir: where the export lives (None: next to the
    model, see onnx_cache); verify: sha256 the cached files before reusing them."""

    def __init__(self, model: PackedModel, providers: Sequence[str] | None = None, dtype: str = "fp32",
                 max_context: int | None = None, cache_dir: str | Path | None = None, verify: bool = True):
        ort = _ort()
        self.config = model.config
        self.options = ExportOptions(dtype=dtype, max_context=max_context, logits="last")
        self.path, self.cache_note = cached_export(model, self.options, cache_dir, verify)
        names = choose_providers(providers, ort.get_available_providers())
        self.session = ort.InferenceSession(str(self.path), session_options(),
                                            providers=[self._provider(p) for p in names])
        self.providers_chosen: list[str] = self.session.get_providers()
        self._outputs = [o.name for o in self.session.get_outputs()]

    def _provider(self, name: str) -> str | tuple[str, dict]:
        if name != "TensorrtExecutionProvider":
            return name
        # Building a TensorRT engine takes minutes on a Jetson: keep it beside the export.
        return name, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(self.path.parent / "trt"),
                      "trt_fp16_enable": self.options.dtype == "fp16"}

    def describe(self) -> dict:
        """What /health and the CLI report."""
        return {"prefill": "onnx", "providers": self.providers_chosen, "export": str(self.path),
                "dtype": self.options.dtype, "cache": self.cache_note}

    def _feed(self, ids: Sequence[int], past: KV | None, start: int | None) -> dict[str, np.ndarray]:
        cfg = self.config
        if len(ids) == 0:
            raise EdgeRuntimeError("nothing to prefill: empty token list")
        if past is None:
            past = [(np.zeros((cfg.n_kv_heads, 0, cfg.head_dim), np.float32),) * 2] * cfg.n_layers
        n_past = past[0][0].shape[1]
        start = n_past if start is None else start
        feed = {"input_ids": np.asarray(ids, dtype=np.int64)[None, :], "start_pos": np.array([start], np.int64)}
        for i, (k, v) in enumerate(past):
            feed[f"past_key_{i}"] = np.ascontiguousarray(k, dtype=np.float32)[None]  # (1, n_kv, P, hd)
            feed[f"past_value_{i}"] = np.ascontiguousarray(v, dtype=np.float32)[None]
        return feed

    def run(self, ids: Sequence[int], past: KV | None = None, start: int | None = None) -> tuple[np.ndarray, KV]:
        """ids (T,) -> (logits of the last position (vocab,) float32, per layer (k, v) each
        (n_kv_heads, P + T, head_dim) float32). With `past` (a previous call's K/V) the prompt
        continues it; start defaults to its length P."""
        outs = self.session.run(self._outputs, self._feed(ids, past, start))
        kv = [(outs[1 + 2 * i][0], outs[2 + 2 * i][0]) for i in range(self.config.n_layers)]
        return outs[0][0, -1], kv

    def run_bound(self, ids: Sequence[int], device: str = "cpu", device_id: int = 0) -> list:
        """As run, but every output stays an OrtValue on `device` ("cuda" with the CUDA or TensorRT
        provider): [logits (1, 1, vocab), present_key_0, present_value_0, ...], each (1, n_kv, T, hd).
        A GPU backend copies them device to device into its cache (OrtValue.data_ptr()): no host trip."""
        binding = self.session.io_binding()
        for name, value in self._feed(ids, None, None).items():
            binding.bind_cpu_input(name, value)
        for name in self._outputs:
            binding.bind_output(name, device, device_id)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()

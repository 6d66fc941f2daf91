"""The in-process runtime: a packed model, a backend, a decoder and a tokenizer behind one object."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edge_runtime.backends import create_backend
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.model.decoder import Decoder
from edge_runtime.model.generate import GenerationConfig, GenerationResult, generate
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.model.tokenizer import Tokenizer
from edge_runtime.pack.loader import PackedModel, load_packed

DEFAULT_CONTEXT = 2048
FALLBACK_ALPHA = 1.0  # SparseInfer's majority vote, for models converted without a default alpha


class Runtime:
    def __init__(self, model: PackedModel, backend: str = "auto", max_context: int | None = None):
        self.model = model
        ctx = min(max_context or DEFAULT_CONTEXT, model.config.max_positions)
        self.backend = create_backend(backend, model, ctx)
        self.decoder = Decoder(self.backend)
        path = model.tokenizer_path
        self.tokenizer = Tokenizer(path) if path else None

    @property
    def config(self):
        return self.model.config

    @property
    def default_alpha(self) -> float:
        """The alpha stored with the model at conversion (--default-alpha), else FALLBACK_ALPHA."""
        return float((self.model.manifest.get("sparsity") or {}).get("default_alpha", FALLBACK_ALPHA))

    def set_sparsity(self, alphas: Sequence[float] | float | None, measure_recall: bool = False) -> None:
        self.decoder.set_sparsity(alphas, measure_recall)

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise EdgeRuntimeError(f"{self.model.path} has no tokenizer.json; text prompts need one")
        return self.tokenizer.encode(prompt)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: Sequence[str] = ()) -> GenerationResult:
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        cfg = GenerationConfig(max_new_tokens, SamplingParams(temperature, top_k, top_p, repetition_penalty, seed),
                               tuple(stop))
        return generate(self.decoder, self.tokenizer, ids, cfg)

    def ffn_stats(self) -> dict:
        return self.decoder.stats.summary()


def load(path: str | Path, backend: str = "auto", max_context: int | None = None,
         verify: bool = True) -> Runtime:
    return Runtime(load_packed(path, verify=verify), backend=backend, max_context=max_context)

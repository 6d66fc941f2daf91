"""Where the embedded default model lives inside the installed package."""

from __future__ import annotations

from pathlib import Path

from edge_runtime.errors import EdgeRuntimeError

DEFAULT_MODEL_DIR = Path(__file__).parent / "data" / "default-model"


def resolve_model(path: str | Path | None) -> Path:
    """The given model directory, or the embedded default model when None."""
    if path is not None:
        return Path(path)
    if not (DEFAULT_MODEL_DIR / "manifest.yaml").is_file():
        raise EdgeRuntimeError(f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; "
                               f"reinstall edge-runtime or pass --model DIR")
    return DEFAULT_MODEL_DIR

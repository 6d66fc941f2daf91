"""Where the embedded default model lives inside the installed package, and the one check every file
a model names goes through before it is opened."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from edge_runtime.errors import EdgeRuntimeError, ModelFormatError

DEFAULT_MODEL_DIR = Path(__file__).parent / "data" / "default-model"


def resolve_model(path: str | Path | None) -> Path:
    """The given model directory, or the embedded default model when None."""
    if path is not None:
        return Path(path)
    if not (DEFAULT_MODEL_DIR / "manifest.yaml").is_file():
        raise EdgeRuntimeError(f"the embedded default model is missing from {DEFAULT_MODEL_DIR}; "
                               f"reinstall edge-runtime or pass --model DIR")
    return DEFAULT_MODEL_DIR


def model_file(model_dir: Path, name: object, what: str = "file") -> Path:
    """The resolved path of `name` inside model_dir, refused unless it is a plain relative name that,
    with every symlink resolved, stays inside the (resolved) directory and is a regular file: no
    "../", no absolute path, no symlink out, no /dev/zero or FIFO."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ModelFormatError(f"{model_dir}/manifest.yaml: {what} name {name!r} is not a file name")
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise ModelFormatError(f"{model_dir}/manifest.yaml: {what} {name!r} points outside the model directory")
    root = Path(model_dir).resolve()
    try:
        path = (root / name).resolve(strict=True)
    except FileNotFoundError:
        raise ModelFormatError(f"{model_dir / name} is missing from the packed model") from None
    except (OSError, RuntimeError) as e:  # a symlink loop is a RuntimeError before 3.13
        raise ModelFormatError(f"cannot resolve {model_dir / name}: {e}") from None
    if not path.is_relative_to(root):
        raise ModelFormatError(f"{model_dir / name} resolves to {path}, outside the model directory")
    if not stat.S_ISREG(path.stat().st_mode):
        raise ModelFormatError(f"{model_dir / name} is not a regular file")
    return path

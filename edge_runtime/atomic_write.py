"""Files replaced whole: written under a temporary name in the same directory, then os.replace'd over the
target, so a reader (or a crash) sees the old file or the new one, never half of one. Several files that
must change together are staged first and renamed together (sparsity/calibration_files.py)."""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml


def staged(path: str | Path, write: Callable[[str], None], mode: int = 0o644) -> Path:
    """write(tmp_path) fills a temporary file beside `path` (returned, for the caller to os.replace over `path`
    or remove); on any error it is removed. mode: mkstemp (and safetensors) make files private."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno and not e.filename:
            # a write() into an open file (a full disk, a quota) names no file: name the one that was not written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    return Path(tmp)


def atomic_write(path: str | Path, write: Callable[[str], None], mode: int = 0o644) -> None:
    """`path` replaced by what write(tmp_path) writes; on any error `path` is untouched."""
    tmp = staged(path, write, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def yaml_text(data) -> str:
    """YAML in the layout the model directory's files use (keys in insertion order, 110 columns)."""
    return yaml.safe_dump(data, sort_keys=False, width=110)


def atomic_write_yaml(path: str | Path, data) -> None:
    atomic_write_text(path, yaml_text(data))


def atomic_write_csv(path: str | Path, rows: list[dict]) -> None:
    """One row per dict; the header is every key any row has, in first-seen order (empty cells elsewhere)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def save_arrays(arrays: dict, path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, its I/O failures (a full disk) raised as OSError, which the CLI reports as one
    line: SafetensorError is not an OSError, and a full disk ended convert or calibrate in a traceback."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    try:
        save_file(arrays, str(path), metadata=metadata)
    except SafetensorError as e:
        raise OSError(f"cannot write {path}: {e}") from None

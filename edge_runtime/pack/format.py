"""The packed model directory: manifest schema, checksums and the atomic directory write.

manifest.yaml:
  format: edge-runtime-packed      format_version: 1
  model:      ModelConfig fields (edge_runtime.model.config)
  encoding:   the encoding asked for at conversion (fp32 | fp16 | int8 | int4)
  tokenizer:  file name of the HF tokenizer.json inside the directory
  chat_template: Jinja text carried over from tokenizer_config.json, or null
  tensors:    logical name -> {file, encoding, shape, layout, group_size, keys: {part: safetensors key}}
              encoding "signbits" for sign planes; layout "row" (N, K) or "transposed" (down_proj^T)
  files:      file name -> {sha256, bytes} for every data file
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from edge_runtime.errors import ModelFormatError

FORMAT_NAME = "edge-runtime-packed"
FORMAT_VERSION = 1
MANIFEST = "manifest.yaml"
REQUIRED_KEYS = ("format", "format_version", "model", "encoding", "tokenizer", "tensors", "files")
TENSOR_KEYS = ("file", "encoding", "shape", "keys")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(model_dir: Path) -> dict[str, Any]:
    path = model_dir / MANIFEST
    if not model_dir.exists():
        raise ModelFormatError(f"model directory {model_dir} does not exist")
    if not path.is_file():
        raise ModelFormatError(f"{model_dir} is not a packed model (no {MANIFEST}); convert it with "
                               f"'edge-runtime convert'")
    try:
        manifest = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(manifest, dict):
        raise ModelFormatError(f"{path} is not a mapping")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ModelFormatError(f"{path} is missing key(s): {', '.join(missing)}")
    if manifest["format"] != FORMAT_NAME:
        raise ModelFormatError(f"{path}: format is {manifest['format']!r}, expected {FORMAT_NAME!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ModelFormatError(f"{path}: format_version {manifest['format_version']} is not supported "
                               f"(this runtime reads version {FORMAT_VERSION})")
    for name, t in manifest["tensors"].items():
        absent = [k for k in TENSOR_KEYS if k not in t]
        if absent:
            raise ModelFormatError(f"{path}: tensor {name} is missing {', '.join(absent)}")
        if t["file"] not in manifest["files"]:
            raise ModelFormatError(f"{path}: tensor {name} lives in {t['file']}, which has no checksum entry")
    return manifest


def verify_files(model_dir: Path, manifest: dict[str, Any]) -> None:
    """Size then sha256 of every data file; the first mismatch raises naming the file."""
    for name, entry in manifest["files"].items():
        path = model_dir / name
        if not path.is_file():
            raise ModelFormatError(f"{path} is missing from the packed model")
        size = path.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise ModelFormatError(f"{path} has {size} bytes, the manifest says {entry['bytes']}: "
                                   f"truncated or replaced; convert the model again")
        if sha256_file(path) != entry["sha256"]:
            raise ModelFormatError(f"{path} fails its sha256 checksum: the file is corrupt or was modified")


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_manifest(model_dir: Path, manifest: dict[str, Any]) -> None:
    with open(model_dir / MANIFEST, "w") as f:
        yaml.safe_dump(manifest, f, sort_keys=False, width=110)


@contextlib.contextmanager
def atomic_directory(out_dir: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces out_dir, on failure it is removed."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ModelFormatError(f"{out_dir} already exists and is not empty (pass --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model directory is meant to be shared read-only
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

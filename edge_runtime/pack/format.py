"""The packed model directory: manifest schema, checksums and the atomic directory write.

manifest.yaml:
  format: edge-runtime-packed      format_version: 1
  model:      ModelConfig fields (edge_runtime.config)
  encoding:   the encoding asked for at conversion (fp32 | fp16 | int8 | int4)
  tokenizer:  file name of the HF tokenizer.json inside the directory
  chat_template: Jinja text carried over from tokenizer_config.json, or null
  tensors:    logical name -> {file, encoding, shape, layout, group_size, keys: {part: safetensors key}}
              encoding "signbits" for sign planes; layout "row" (N, K) or "transposed" (down_proj^T)
  files:      file name -> {sha256, bytes} for every data file, the calibration files included
              (calibration.yaml, predictor_thresholds.safetensors: `calibrate` records them)
  sparsity:   optional {default_alpha}

manifest.yaml itself is covered by nothing inside the directory: its digest (sha256 of its bytes, which
`edge-runtime info` prints) is what a deployment pins, and that digest covers every file's checksum.
read_manifest checks the manifest's structure and types, so that later code can index it freely.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from edge_runtime.atomic_write import atomic_write_yaml
from edge_runtime.errors import ModelFormatError
from edge_runtime.pack.quant import STORED_ENCODINGS
from edge_runtime.paths import model_file

FORMAT_NAME = "edge-runtime-packed"
FORMAT_VERSION = 1
MANIFEST = "manifest.yaml"
REQUIRED_KEYS = ("format", "format_version", "model", "encoding", "tokenizer", "tensors", "files")
TENSOR_KEYS = ("file", "encoding", "shape", "keys")
TENSOR_ENCODINGS = STORED_ENCODINGS + ("signbits",)
LAYOUTS = ("row", "transposed", "vector")
CALIBRATION_FILES = ("calibration.yaml", "predictor_thresholds.safetensors")  # sparsity/calibration_files.py
MAX_MANIFEST_BYTES = 64 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")
# libyaml's safe loader when PyYAML has it (as safe, ~10x faster on a 7B model's manifest)
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(model_dir: Path) -> tuple[dict[str, Any], str]:
    """(manifest, sha256 of the manifest's bytes): the digest of exactly the bytes that were parsed."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelFormatError(f"model directory {model_dir} does not exist")
    if not (model_dir / MANIFEST).is_file():
        raise ModelFormatError(f"{model_dir} is not a packed model (no {MANIFEST}); convert it with "
                               f"'edge-runtime convert'")
    path = model_file(model_dir, MANIFEST, "manifest")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise ModelFormatError(f"{path} is over {MAX_MANIFEST_BYTES >> 20} MiB: not a manifest")
    data = path.read_bytes()
    try:
        manifest = yaml.load(data.decode("utf-8"), Loader=SAFE_LOADER)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise ModelFormatError(f"{path} is not valid YAML: {(str(e).splitlines() or ['?'])[0]}") from None
    check_manifest(model_dir / MANIFEST, manifest)
    return manifest, hashlib.sha256(data).hexdigest()


def read_manifest(model_dir: Path) -> dict[str, Any]:
    return load_manifest(model_dir)[0]


def _fail(path: Path, msg: str) -> ModelFormatError:
    return ModelFormatError(f"{path}: {msg}")


def _check_tensor(path: Path, name: str, t: Any, files: dict) -> None:
    if not isinstance(t, dict):
        raise _fail(path, f"tensor {name} is not a mapping")
    absent = [k for k in TENSOR_KEYS if k not in t]
    if absent:
        raise _fail(path, f"tensor {name} is missing {', '.join(absent)}")
    if t["encoding"] not in TENSOR_ENCODINGS:
        raise _fail(path, f"tensor {name} has unknown encoding {t['encoding']!r}")
    if t.get("layout", "row") not in LAYOUTS:
        raise _fail(path, f"tensor {name} has unknown layout {t.get('layout')!r}")
    shape = t["shape"]
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
        raise _fail(path, f"tensor {name} has shape {shape!r}; expected 1 or 2 positive integers")
    keys = t["keys"]
    if not isinstance(keys, dict) or not keys or not all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in keys.items()):
        raise _fail(path, f"tensor {name} has malformed keys {keys!r}")
    group = t.get("group_size", 0)
    if isinstance(group, bool) or not isinstance(group, int) or group < 0 or group % 2:
        raise _fail(path, f"tensor {name} has group_size {group!r}; expected a non-negative even integer")
    if not isinstance(t["file"], str) or t["file"] not in files:
        raise _fail(path, f"tensor {name} lives in {t['file']!r}, which has no checksum entry")


def check_manifest(path: Path, manifest: Any) -> None:
    """Structure and types of every field the runtime reads (the model config is ModelConfig's)."""
    if not isinstance(manifest, dict):
        raise _fail(path, "not a mapping")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise _fail(path, f"missing key(s): {', '.join(missing)}")
    if manifest["format"] != FORMAT_NAME:
        raise _fail(path, f"format is {manifest['format']!r}, expected {FORMAT_NAME!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise _fail(path, f"format_version {manifest['format_version']!r} is not supported "
                          f"(this runtime reads version {FORMAT_VERSION})")
    if manifest["encoding"] not in STORED_ENCODINGS[:4]:
        raise _fail(path, f"encoding {manifest['encoding']!r} is not one of {', '.join(STORED_ENCODINGS[:4])}")
    for key in ("model", "tensors", "files"):
        if not isinstance(manifest[key], dict) or not manifest[key]:
            raise _fail(path, f"{key} must be a non-empty mapping, got {type(manifest[key]).__name__}")
    for name, entry in manifest["files"].items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not _SHA256.fullmatch(entry["sha256"]):
            raise _fail(path, f"file {name!r} has no valid sha256 (64 lowercase hex digits)")
        size = entry.get("bytes")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _fail(path, f"file {name!r} has bytes {size!r}; expected a non-negative integer")
    tokenizer = manifest["tokenizer"]
    if tokenizer is not None and (not isinstance(tokenizer, str) or tokenizer not in manifest["files"]):
        raise _fail(path, f"tokenizer {tokenizer!r} has no checksum entry in files")
    if not isinstance(manifest.get("chat_template"), (str, type(None))):
        raise _fail(path, "chat_template must be text or null")
    sparsity = manifest.get("sparsity")
    if sparsity is not None:
        alpha = sparsity.get("default_alpha", 1.0) if isinstance(sparsity, dict) else None
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
            raise _fail(path, f"sparsity must be a mapping with a finite default_alpha > 0, got {sparsity!r}")
    for name, t in manifest["tensors"].items():
        _check_tensor(path, name, t, manifest["files"])


def check_files(model_dir: Path, manifest: dict[str, Any]) -> dict[str, Path]:
    """Every file the manifest lists, resolved inside the directory, a regular file of the recorded
    size (no hashing: cheap, done even with --no-verify). Returns name -> resolved path."""
    out = {}
    for name, entry in manifest["files"].items():
        path = model_file(model_dir, name)
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ModelFormatError(f"{model_dir / name} has {size} bytes, the manifest says {entry['bytes']}: "
                                   f"truncated or replaced; {_remedy(name)}")
        out[name] = path
    return out


def verify_files(model_dir: Path, manifest: dict[str, Any]) -> dict[str, Path]:
    """Size then sha256 of every file the manifest lists; the first mismatch raises naming the file."""
    paths = check_files(model_dir, manifest)
    for name, path in paths.items():
        if sha256_file(path) != manifest["files"][name]["sha256"]:
            raise ModelFormatError(f"{model_dir / name} fails its sha256 checksum: the file is corrupt or was "
                                   f"modified; {_remedy(name)}")
    return paths


def _remedy(name: str) -> str:
    return "run 'edge-runtime calibrate' again" if name in CALIBRATION_FILES else "convert the model again"


def check_calibration_files(model_dir: Path, manifest: dict[str, Any], verify: bool) -> None:
    """The calibration files change decoding: when present they must be inside the directory (as every
    file) and, when verifying, covered by the manifest's checksums."""
    for name in CALIBRATION_FILES:
        if not os.path.lexists(Path(model_dir) / name):
            continue
        model_file(model_dir, name, "calibration file")
        if verify and name not in manifest["files"]:
            raise ModelFormatError(f"{Path(model_dir) / name} is not covered by the manifest's checksums; run "
                                   f"'edge-runtime calibrate' again (it records them) or load with --no-verify")


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_manifest(model_dir: Path, manifest: dict[str, Any]) -> None:
    """Atomically (readers see the old manifest or the new one, whole; 0o644: a model directory is meant to be
    shared read-only)."""
    atomic_write_yaml(Path(model_dir) / MANIFEST, manifest)


def record_files(model_dir: Path, names: list[str]) -> str:
    """Add (or refresh) the checksum entries of `names` in the manifest; returns the new manifest digest."""
    manifest = read_manifest(model_dir)
    for name in names:
        manifest["files"][name] = file_entry(model_file(model_dir, name))
    write_manifest(model_dir, manifest)
    return load_manifest(model_dir)[1]


def check_replaceable(out_dir: Path, overwrite: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse an output that would destroy what it is made from (out_dir is, or holds, a source) or what is
    not ours to delete: overwrite replaces an empty directory or a packed model, never a folder of other files."""
    for src in sources if out_dir.exists() else ():  # compared as files (samefile): symlinks, bind mounts
        here = Path(src).resolve()
        if any(os.path.samefile(out_dir, d) for d in (here, *here.parents) if d.exists()):
            raise ModelFormatError(f"the output {out_dir} is or contains the input {src}: choose another output "
                                   "directory")
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return
    if not overwrite:
        raise ModelFormatError(f"{out_dir} already exists and is not empty (pass --overwrite to replace it)")
    if not (out_dir / MANIFEST).is_file():
        raise ModelFormatError(f"{out_dir} is not a packed model (no {MANIFEST}), and --overwrite only replaces "
                               "a packed model: choose another output directory")


@contextlib.contextmanager
def atomic_directory(out_dir: Path, overwrite: bool = False, sources: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces out_dir, on failure it is removed.
    sources: what the contents are made from (check_replaceable)."""
    out_dir = Path(out_dir)
    check_replaceable(out_dir, overwrite, sources)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as e:  # a parent is a file, read-only, ...
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(out_dir) else ""
        raise ModelFormatError(f"cannot create {out_dir}: {e.strerror or e}{where}") from None
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

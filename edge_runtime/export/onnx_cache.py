"""The prefill export cached next to its packed model, checksummed like the model's own files.

Files, for one set of export options (key = sha256 of the options, the exporter version and the
manifest's digest, which covers every weight file):
  prefill-{dtype}-{key[:16]}.onnx        the graph (ExportOptions.logits = "last")
  prefill-{dtype}-{key[:16]}.onnx.data   its weights, when external
  prefill-{dtype}-{key[:16]}.json        the record: key, options, manifest digest, {file: sha256, bytes}
The record is written last (temp file then os.replace): an interrupted export has no record and is
rebuilt; a record whose files differ in size or sha256 (stale or tampered) is rebuilt too.
A model directory that is not writable (an installed package) caches under $XDG_CACHE_HOME.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.export.onnx_export import export_onnx, manifest_digest
from edge_runtime.export.onnx_graph import ExportOptions
from edge_runtime.pack.format import sha256_file
from edge_runtime.pack.loader import PackedModel


def cache_key(digest: str, opts: ExportOptions) -> str:
    return hashlib.sha256(json.dumps({"manifest_sha256": digest, **opts.as_dict()}, sort_keys=True).encode()
                          ).hexdigest()


def default_cache_dir(model: PackedModel, digest: str) -> Path:
    if os.access(model.path, os.W_OK):
        return model.path
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edge-runtime" / "onnx" / digest[:16]


def _check_writable(folder: Path, model: PackedModel, chosen: bool) -> None:
    """The export needs a folder it can write; say which and how to give one (a read-only install run by a
    user without a writable home ended in a bare "Permission denied (/nonexistent)")."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return
        why = "not writable"
    except OSError as e:
        why = e.strerror or type(e).__name__
    where = "" if chosen else (f": {model.path} is read-only, so the export goes under $XDG_CACHE_HOME (else "
                               f"~/.cache); set XDG_CACHE_HOME to a writable folder")
    raise EdgeRuntimeError(f"cannot keep the ONNX prefill export in {folder} ({why}){where}")


def _stale_reason(record_path: Path, key: str, verify: bool) -> str | None:
    """Why the cached export cannot be used, or None when it can."""
    if not record_path.is_file():
        return "no cached export"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{record_path.name} is unreadable"
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("files"), dict):
        return f"{record_path.name} belongs to other options or another model"
    for name, entry in record["files"].items():
        path = record_path.parent / name
        if not path.is_file() or path.stat().st_size != entry.get("bytes"):
            return f"{name} is missing or has changed size"
        if verify and sha256_file(path) != entry.get("sha256"):
            return f"{name} fails its sha256 checksum"
    return None


def cached_export(model: PackedModel, opts: ExportOptions, cache_dir: str | Path | None = None,
                  verify: bool = True) -> tuple[Path, str]:
    """The path of a valid export of `model` with `opts`, exporting when needed; and a note saying
    what happened ("reused", or "exported: <why the cache could not be used>")."""
    digest = manifest_digest(model)
    key = cache_key(digest, opts)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(model, digest)
    stem = f"prefill-{opts.dtype}-{key[:16]}"
    onnx_path, record_path = folder / f"{stem}.onnx", folder / f"{stem}.json"
    reason = _stale_reason(record_path, key, verify)
    if reason is None:
        return onnx_path, "reused"
    _check_writable(folder, model, chosen=cache_dir is not None)
    record_path.unlink(missing_ok=True)  # from here until the new record lands, the export is invalid
    info = export_onnx(model, onnx_path, opts)
    record = {"key": key, "options": opts.as_dict(), "manifest_sha256": digest, "files": info["files"]}
    tmp = record_path.with_name(f".{record_path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, record_path)
    return onnx_path, f"exported in {info['seconds']:.1f} s ({reason})"

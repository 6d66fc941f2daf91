"""Write the ONNX graph of a packed model to a file: atomic, checked, external data when large."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.export.onnx_builder import GraphBuilder
from edge_runtime.export.onnx_graph import ExportOptions, build
from edge_runtime.pack.format import MANIFEST, file_entry, sha256_file
from edge_runtime.pack.loader import PackedModel
from edge_runtime.version import __version__

# Weights above this go to an external data file, streamed tensor by tensor (bounded memory, and
# protobuf's 2 GB limit never reached); below it the .onnx file is self-contained.
EXTERNAL_MIN_BYTES = 64 << 20
_BYTES_PER_VALUE = {"fp32": 4.0, "fp16": 2.0}


def manifest_digest(model: PackedModel) -> str:
    """sha256 of manifest.yaml, which holds the sha256 of every weight file: one digest for the model."""
    return sha256_file(model.path / MANIFEST)


def estimated_weight_bytes(model: PackedModel, dtype: str) -> int:
    """Initialiser bytes the export will hold: fp32/fp16 per value, packed about as stored."""
    if dtype in _BYTES_PER_VALUE:
        return int(sum(_BYTES_PER_VALUE[dtype] * m.shape[0] * m.shape[1] for m in model.matrices.values()))
    return sum(m.nbytes for m in model.matrices.values())


def _tmp_path(out: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    os.chmod(name, 0o644)  # mkstemp makes it private; the exported graph is shared like the model it comes from
    return Path(name)


def export_onnx(model: PackedModel, out: str | Path, opts: ExportOptions, external: bool | None = None
                ) -> dict[str, Any]:
    """Write `out` (+ `out`.data when external; None = when the weights exceed EXTERNAL_MIN_BYTES),
    each file through a temporary name and os.replace, after onnx.checker.check_model(full_check).
    Returns {"files": {file name: {sha256, bytes}}, "external": bool, "seconds": wall time}."""
    t0 = time.perf_counter()
    out = Path(out)
    if out.is_dir():
        raise EdgeRuntimeError(f"{out} is a directory; give the file to write, such as {out / 'model.onnx'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if external is None:
        external = estimated_weight_bytes(model, opts.dtype) > EXTERNAL_MIN_BYTES
    data = out.with_name(out.name + ".data")  # referenced from the graph by this name, relative
    tmp_data, tmp_onnx = _tmp_path(data), _tmp_path(out)
    try:
        with open(tmp_data, "wb") as f:
            g = GraphBuilder(opts.opset, f if external else None, data.name)
            build(g, model, opts)
        metadata = {"edge_runtime.version": __version__, "edge_runtime.export": json.dumps(opts.as_dict()),
                    "edge_runtime.manifest_sha256": manifest_digest(model),
                    "edge_runtime.model": model.path.resolve().name}
        proto = g.model(f"{model.config.arch}-prefill", metadata)
        tmp_onnx.write_bytes(proto.SerializeToString())
        del proto, g
        if external:
            os.replace(tmp_data, data)  # the graph names the final data file; it must be there to check
        try:
            onnx.checker.check_model(str(tmp_onnx), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise EdgeRuntimeError(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None
        os.replace(tmp_onnx, out)
    finally:
        for p in (tmp_data, tmp_onnx):
            p.unlink(missing_ok=True)
    if not external:
        data.unlink(missing_ok=True)  # a data file left by an earlier, larger export of the same name
    files = {out.name: file_entry(out)}
    if external:
        files[data.name] = file_entry(data)
    return {"files": files, "external": external, "seconds": time.perf_counter() - t0}

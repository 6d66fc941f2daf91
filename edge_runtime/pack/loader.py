"""Open a packed model directory: validate the manifest, verify checksums, map the weights.

Order matters: the manifest's structure, every path it names (resolved, inside the directory, regular
files of the recorded sizes), the config, then every safetensors header and every tensor against the
config (pack/validate.py); only then are views made and handed to a backend that allocates from the
config. Nothing outside the directory is opened and nothing is sized by an unchecked number."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.config import ModelConfig
from edge_runtime.errors import EdgeRuntimeError, ModelFormatError
from edge_runtime.pack.format import check_calibration_files, check_files, load_manifest, verify_files
from edge_runtime.pack.quant import PackedTensor
from edge_runtime.pack.safetensors_mmap import SafetensorsFile
from edge_runtime.pack.validate import check_tensors
from edge_runtime.paths import model_file


@dataclass
class PackedModel:
    """Host-side view of a packed model. Arrays are read-only views of the mmapped files."""

    path: Path
    config: ModelConfig
    manifest: dict[str, Any]
    matrices: dict[str, PackedTensor]  # 2-D weights, embeddings included
    vectors: dict[str, np.ndarray]  # norms and biases, fp16 or fp32
    sign_planes: dict[str, np.ndarray]  # "layers.{i}.ffn.gate_signs" -> (N, ceil(K/32)) uint32
    manifest_sha256: str = ""  # sha256 of the manifest.yaml bytes this model was read from
    # Runtimes built on this object and not yet closed: the arrays go with the last one (two runtimes may
    # share one model's weights, e.g. with different settings)
    users: int = field(default=0, repr=False, compare=False)
    released: bool = field(default=False, repr=False, compare=False)
    _users_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def tokenizer_path(self) -> Path | None:
        name = self.manifest.get("tokenizer")
        return model_file(self.path, name, "tokenizer") if name else None

    @property
    def weight_bytes(self) -> int:
        return (sum(t.nbytes for t in self.matrices.values()) + sum(v.nbytes for v in self.vectors.values())
                + sum(p.nbytes for p in self.sign_planes.values()))

    def layer(self, i: int, name: str) -> PackedTensor:
        return self.matrices[f"layers.{i}.{name}"]

    def check_not_released(self) -> None:
        if self.released:
            raise EdgeRuntimeError(f"{self.path}: this model's weights were released when the last runtime using "
                                   "it was closed; load it again")

    def acquire(self) -> None:
        """A runtime starts using these arrays."""
        with self._users_lock:
            self.check_not_released()
            self.users += 1

    def release(self) -> None:
        """A runtime stops using these arrays (once per acquire). With the last, drop them (views of the mapped
        files, and the cpu backend's fp32 copies): the files are unmapped once nothing else holds them. The
        model is unusable after."""
        with self._users_lock:
            self.users = max(0, self.users - 1)
            if self.users == 0:
                self.matrices, self.vectors, self.sign_planes = {}, {}, {}
                self.released = True


def model_config(path: Path, manifest: dict[str, Any]) -> ModelConfig:
    try:
        return ModelConfig.from_dict(manifest["model"])
    except (TypeError, ModelFormatError) as e:
        raise ModelFormatError(f"{path}/manifest.yaml: bad model config: {e}") from None


def load_packed(path: str | Path, verify: bool = True) -> PackedModel:
    path = Path(path)
    manifest, digest = load_manifest(path)
    resolved = verify_files(path, manifest) if verify else check_files(path, manifest)
    check_calibration_files(path, manifest, verify)
    config = model_config(path, manifest)
    files = {name: SafetensorsFile(str(resolved[name]))
             for name in sorted({t["file"] for t in manifest["tensors"].values()})}
    check_tensors(path, config, manifest["tensors"], files)
    matrices: dict[str, PackedTensor] = {}
    vectors: dict[str, np.ndarray] = {}
    planes: dict[str, np.ndarray] = {}
    for name, entry in manifest["tensors"].items():
        f = files[entry["file"]]
        arrays = {part: f.tensor(key) for part, key in entry["keys"].items()}
        if entry["encoding"] == "signbits":
            planes[name] = arrays["bits"]
        elif entry.get("layout") == "vector":
            vectors[name] = arrays["w"]
        else:
            matrices[name] = PackedTensor(entry["encoding"], tuple(entry["shape"]), arrays,
                                          group_size=int(entry.get("group_size", 0)),
                                          meta={"layout": entry.get("layout", "row")})
    return PackedModel(path, config, manifest, matrices, vectors, planes, digest)

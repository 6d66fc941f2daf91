"""Open a packed model directory: validate the manifest, verify checksums, map the weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import ModelFormatError
from edge_runtime.model.config import ModelConfig
from edge_runtime.pack.format import read_manifest, verify_files
from edge_runtime.pack.quant import STORED_ENCODINGS, PackedTensor
from edge_runtime.pack.safetensors_mmap import SafetensorsFile


@dataclass
class PackedModel:
    """Host-side view of a packed model. Arrays are read-only views of the mmapped files."""

    path: Path
    config: ModelConfig
    manifest: dict[str, Any]
    matrices: dict[str, PackedTensor]  # 2-D weights, embeddings included
    vectors: dict[str, np.ndarray]  # norms and biases, fp16 or fp32
    sign_planes: dict[str, np.ndarray]  # "layers.{i}.ffn.gate_signs" -> (N, ceil(K/32)) uint32

    @property
    def tokenizer_path(self) -> Path | None:
        name = self.manifest.get("tokenizer")
        return self.path / name if name else None

    @property
    def weight_bytes(self) -> int:
        return (sum(t.nbytes for t in self.matrices.values()) + sum(v.nbytes for v in self.vectors.values())
                + sum(p.nbytes for p in self.sign_planes.values()))

    def layer(self, i: int, name: str) -> PackedTensor:
        return self.matrices[f"layers.{i}.{name}"]


def load_packed(path: str | Path, verify: bool = True) -> PackedModel:
    path = Path(path)
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    try:
        config = ModelConfig.from_dict(manifest["model"])
    except TypeError as e:
        raise ModelFormatError(f"{path}/manifest.yaml: bad model config: {e}") from None
    files: dict[str, SafetensorsFile] = {}
    matrices: dict[str, PackedTensor] = {}
    vectors: dict[str, np.ndarray] = {}
    planes: dict[str, np.ndarray] = {}
    for name, entry in manifest["tensors"].items():
        fname = entry["file"]
        if fname not in files:
            files[fname] = SafetensorsFile(str(path / fname))
        arrays = {part: files[fname].tensor(key) for part, key in entry["keys"].items()}
        enc = entry["encoding"]
        if enc == "signbits":
            planes[name] = arrays["bits"]
        elif entry.get("layout") == "vector":
            vectors[name] = arrays["w"]
        elif enc in STORED_ENCODINGS:
            shape = tuple(entry["shape"])
            if len(shape) != 2:
                raise ModelFormatError(f"{path}/manifest.yaml: tensor {name} has shape {shape}, expected 2-D")
            matrices[name] = PackedTensor(enc, shape, arrays, group_size=int(entry.get("group_size", 0)),
                                          meta={"layout": entry.get("layout", "row")})
        else:
            raise ModelFormatError(f"{path}/manifest.yaml: tensor {name} has unknown encoding {enc!r}")
    _check_complete(path, config, matrices, planes)
    return PackedModel(path, config, manifest, matrices, vectors, planes)


def _check_complete(path: Path, cfg: ModelConfig, matrices: dict, planes: dict) -> None:
    need = ["embed"] + [f"layers.{i}.{t}" for i in range(cfg.n_layers)
                        for t in ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.down_t")]
    if cfg.gated:
        need += [f"layers.{i}.ffn.up" for i in range(cfg.n_layers)]
    if not cfg.tie_embeddings:
        need.append("lm_head")
    absent = [n for n in need if n not in matrices]
    if absent:
        raise ModelFormatError(f"{path} lacks tensor(s) {', '.join(absent[:3])}: the model is incomplete")
    for i in range(cfg.n_layers):
        if f"layers.{i}.ffn.gate_signs" not in planes:
            raise ModelFormatError(f"{path} lacks the sign plane of layer {i}'s gate")

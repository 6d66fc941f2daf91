"""Read tensors of a Hugging Face checkpoint as float32 numpy: safetensors (single or sharded, bf16
without torch) or, when torch is installed, a legacy pytorch_model.bin loaded with weights_only=True."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_runtime.errors import ModelFormatError
from edge_runtime.pack.safetensors_mmap import SafetensorsFile


class CheckpointReader:
    def __init__(self, hf_dir: Path):
        self.hf_dir = hf_dir
        self._where: dict[str, SafetensorsFile] = {}
        self._torch_state: dict[str, np.ndarray] | None = None
        index = hf_dir / "model.safetensors.index.json"
        single = hf_dir / "model.safetensors"
        if index.is_file():
            self._open_sharded(index)
        elif single.is_file():
            f = SafetensorsFile(str(single))
            self._where = dict.fromkeys(f.keys(), f)
        elif (hf_dir / "pytorch_model.bin").is_file():
            self._torch_state = self._load_torch_bin(hf_dir / "pytorch_model.bin")
        else:
            raise ModelFormatError(f"{hf_dir} has no model.safetensors, model.safetensors.index.json "
                                   f"or pytorch_model.bin")

    def _open_sharded(self, index: Path) -> None:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ModelFormatError(f"{index} is not a valid safetensors index (no weight_map)") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v for k, v in weight_map.items()):
            raise ModelFormatError(f"{index}: weight_map must map tensor names to shard file names in {self.hf_dir}")
        shards: dict[str, SafetensorsFile] = {}
        for name, shard in weight_map.items():
            if shard not in shards:
                shards[shard] = SafetensorsFile(str(self.hf_dir / shard))
            self._where[name] = shards[shard]

    @staticmethod
    def _load_torch_bin(path: Path) -> dict[str, np.ndarray]:
        try:
            import torch
        except ImportError:
            raise ModelFormatError(f"{path} is a PyTorch pickle; install torch to read it, or save the "
                                   f"model as safetensors") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise ModelFormatError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
        return {k: v.float().numpy() for k, v in state.items()}

    def _resolve(self, name: str) -> str | None:
        names = self._torch_state if self._torch_state is not None else self._where
        for candidate in (name, name.removeprefix("model."), "model." + name):
            if candidate in names:
                return candidate
        return None

    def has(self, name: str) -> bool:
        return self._resolve(name) is not None

    def get(self, name: str) -> np.ndarray:
        key = self._resolve(name)
        if key is None:
            raise ModelFormatError(f"checkpoint in {self.hf_dir} has no tensor {name}")
        if self._torch_state is not None:
            return self._torch_state[key]
        return self._where[key].tensor_f32(key)

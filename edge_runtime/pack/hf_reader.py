"""Read tensors of a Hugging Face checkpoint as float32 numpy: safetensors (single or sharded, bf16
without torch) or, when torch is installed, legacy pytorch_model.bin files (single or sharded) loaded with
weights_only=True. A weight stored as integers (a pre-quantised checkpoint's) is refused: widened to float it
would be read as the weight itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_runtime.errors import ModelFormatError
from edge_runtime.pack.safetensors_mmap import SafetensorsFile

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


class CheckpointReader:
    def __init__(self, hf_dir: Path):
        self.hf_dir = hf_dir
        self._where: dict[str, SafetensorsFile] = {}
        self._torch_state: dict | None = None  # name -> torch.Tensor, in the checkpoint's dtype until asked for
        index = hf_dir / "model.safetensors.index.json"
        single = hf_dir / "model.safetensors"
        if index.is_file():
            self._open_sharded(index)
        elif single.is_file():
            f = SafetensorsFile(str(single))
            self._where = dict.fromkeys(f.keys(), f)
        elif (hf_dir / "pytorch_model.bin").is_file():
            self._torch_state = self._load_torch_bin(hf_dir / "pytorch_model.bin")
        elif (hf_dir / "pytorch_model.bin.index.json").is_file():
            self._torch_state = {}
            for shard in sorted(set(self._weight_map(hf_dir / "pytorch_model.bin.index.json").values())):
                self._torch_state.update(self._load_torch_bin(hf_dir / shard))
        else:
            raise ModelFormatError(f"{hf_dir} has no model.safetensors, model.safetensors.index.json, "
                                   f"pytorch_model.bin or pytorch_model.bin.index.json")

    def _weight_map(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise ModelFormatError(f"{index} is not a valid checkpoint index (no weight_map)") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v for k, v in weight_map.items()):
            raise ModelFormatError(f"{index}: weight_map must map tensor names to shard file names in {self.hf_dir}")
        return weight_map

    def _open_sharded(self, index: Path) -> None:
        shards: dict[str, SafetensorsFile] = {}
        for name, shard in self._weight_map(index).items():
            if shard not in shards:
                shards[shard] = SafetensorsFile(str(self.hf_dir / shard))
            self._where[name] = shards[shard]

    @staticmethod
    def _load_torch_bin(path: Path) -> dict:
        try:
            import torch
        except ImportError:
            raise ModelFormatError(f"{path} is a PyTorch pickle; install torch to read it, or save the "
                                   f"model as safetensors") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise ModelFormatError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(state, dict):
            raise ModelFormatError(f"{path} does not hold a state dict (name -> tensor)")
        return state

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
            t = self._torch_state[key]
            if not t.is_floating_point():
                raise self._quantised(key, str(t.dtype).removeprefix("torch."))
            return t.float().numpy()
        dtype = self._where[key].dtype_of(key)
        if dtype not in FLOAT_DTYPES:
            raise self._quantised(key, dtype)
        return self._where[key].tensor_f32(key)

    def _quantised(self, name: str, dtype: str) -> ModelFormatError:
        return ModelFormatError(f"tensor {name} in {self.hf_dir} is stored as {dtype}, not as floats: a "
                                f"pre-quantised checkpoint (bitsandbytes, GPTQ, AWQ, compressed-tensors) or a "
                                f"damaged one; convert the original fp16, bf16 or fp32 weights")

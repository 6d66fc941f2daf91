"""Hugging Face checkpoint -> packed model directory (quantise, sign planes, transpose down, checksums)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from edge_runtime.atomic_write import save_arrays
from edge_runtime.errors import ModelFormatError
from edge_runtime.pack.colnorms import COLNORM_OF, column_norms
from edge_runtime.pack.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    atomic_directory,
    file_entry,
    write_manifest,
)
from edge_runtime.pack.hf_config import TensorSource, hf_layout, model_config_from_hf, read_hf_config, tensor_plan
from edge_runtime.pack.hf_reader import CheckpointReader
from edge_runtime.pack.loader import PackedModel
from edge_runtime.pack.quant import DEFAULT_INT4_GROUP, ENCODINGS, PackedTensor, quantize
from edge_runtime.pack.signbits import pack_signs
from edge_runtime.pack.sparse_weights import compress, prune_mask
from edge_runtime.pack.storable import check_compressed, check_finite, check_stored
from edge_runtime.pack.validate import logical_shape

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _file_for(name: str) -> str:
    return f"layer_{int(name.split('.')[1]):03d}.safetensors" if name.startswith("layers.") else "model.safetensors"


def _chat_template(hf_dir: Path) -> str | None:
    jinja = hf_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    cfg = hf_dir / "tokenizer_config.json"
    if cfg.is_file():
        try:
            template = json.loads(cfg.read_text()).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            raise ModelFormatError(f"{cfg} is not valid JSON") from None
        return template if isinstance(template, str) else None
    return None


PRUNABLE = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.up", "ffn.down_t")


def _encode(src: TensorSource, w: np.ndarray, encoding: str, group: int, mask: np.ndarray | None = None
            ) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays to store for one tensor and its manifest entry (without file and keys). `mask` (HF
    orientation) stores the matrix pruned, in the compressed row format."""
    if src.kind == "vector":
        # A folded offset (Gemma's 1 + w) stays fp32: near 1, fp16 keeps ~3 digits of w (1.7e-3 of the logits)
        enc = "fp32" if encoding == "fp32" or src.offset else "fp16"
        return {"w": w.astype(np.float32 if enc == "fp32" else np.float16)}, {"encoding": enc, "shape": list(w.shape),
                                                                            "layout": "vector"}
    if src.kind == "embedding":
        enc = "fp32" if encoding == "fp32" else "fp16"
        pt = quantize(w, enc)
        return pt.arrays, {"encoding": enc, "shape": list(w.shape), "layout": "row"}
    layout = "row"
    if src.kind == "matrix_t":
        w, layout = np.ascontiguousarray(w.T), "transposed"
        mask = None if mask is None else np.ascontiguousarray(mask.T)
    if mask is not None:
        enc = "sparse-int8" if encoding == "int8" else "sparse-fp16"
        arrays = compress(w, mask, enc)
        return arrays, {"encoding": enc, "shape": list(w.shape), "layout": layout,
                        "density": float(mask.mean())}
    pt = quantize(w, encoding, group)
    entry = {"encoding": encoding, "shape": list(pt.shape), "layout": layout}
    if encoding == "int4":
        entry["group_size"] = group
    return pt.arrays, entry


def _check_storable(hf_dir: Path, src: TensorSource, w: np.ndarray, arrays: dict[str, np.ndarray], entry: dict,
                    encoding: str) -> None:
    """The stored tensor still stands for w (HF orientation): nothing overflowed or underflowed fp16."""
    enc = entry["encoding"]
    if entry["layout"] == "vector":
        stored = arrays["w"]
    elif enc.startswith("sparse-"):
        check_compressed(str(hf_dir), src.hf_name, arrays)
        return
    else:
        stored = PackedTensor(enc, tuple(entry["shape"]), arrays, entry.get("group_size", 0))
        if entry["layout"] == "transposed":
            w = w.T
    check_stored(str(hf_dir), src.hf_name, w, stored, encoding)


def _check_shape(hf_dir: Path, src: TensorSource, w: np.ndarray, cfg) -> None:
    """A config.json that disagrees with its tensors would pack a model that cannot load: refuse it here,
    before the output directory replaces anything."""
    want = logical_shape(cfg, src.name)
    if src.kind == "matrix_t":
        want = want[::-1]  # the HF orientation (stored transposed)
    if tuple(w.shape) != tuple(want):
        raise ModelFormatError(f"{hf_dir}: tensor {src.hf_name} has shape {list(w.shape)} but config.json implies "
                               f"{list(want)}; the config does not belong to these weights")


def _save(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    save_arrays({k: np.ascontiguousarray(v) for k, v in arrays.items()}, path, metadata={"format": FORMAT_NAME})
    os.chmod(path, 0o644)  # safetensors writes files private; a model is meant to be shared read-only
    return file_entry(path)


def check_options(encoding: str, weight_sparsity: float, prune: str) -> None:
    """The conversion options alone, checked before any expensive work."""
    if encoding not in ENCODINGS:
        raise ModelFormatError(f"unknown --dtype {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    if not 0 <= weight_sparsity < 1:
        raise ModelFormatError(f"--weight-sparsity must be in [0, 1), got {weight_sparsity}")
    if weight_sparsity and encoding == "int4":
        raise ModelFormatError("weight sparsity stores fp16 or int8 values; use --dtype fp16 or int8 with it")
    if prune not in ("magnitude", "wanda"):
        raise ModelFormatError(f"unknown --prune {prune!r}; choose magnitude or wanda")


def checkpoint_model(hf_dir: Path, encoding: str = "fp16") -> PackedModel:
    """A checkpoint as an in-memory packed model (nothing written), one tensor at a time through the same
    encoding as convert: for passes over the unconverted model such as Wanda's activation norms."""
    hf_dir = Path(hf_dir)
    hf_cfg = read_hf_config(hf_dir)
    cfg = model_config_from_hf(hf_cfg)
    reader = CheckpointReader(hf_dir)
    matrices, vectors, planes = {}, {}, {}
    for src in tensor_plan(cfg, hf_layout(hf_cfg)):
        w = src.read(reader)
        arrays, entry = _encode(src, w, encoding, DEFAULT_INT4_GROUP)
        if entry["layout"] == "vector":
            vectors[src.name] = arrays["w"]
        else:
            matrices[src.name] = PackedTensor(entry["encoding"], tuple(entry["shape"]), arrays,
                                              entry.get("group_size", 0))
        if src.name.endswith("ffn.gate"):
            planes[src.name + "_signs"] = pack_signs(w)
    tokenizer = "tokenizer.json" if (hf_dir / "tokenizer.json").is_file() else None
    manifest = {"model": cfg.to_dict(), "encoding": encoding, "tokenizer": tokenizer,
                "chat_template": _chat_template(hf_dir)}
    return PackedModel(hf_dir, cfg, manifest, matrices, vectors, planes)


def convert(hf_dir: Path, out_dir: Path, encoding: str = "int8", group_size: int = DEFAULT_INT4_GROUP,
            overwrite: bool = False, progress: bool = True, default_alpha: float | None = None,
            weight_sparsity: float = 0.0, prune: str = "magnitude",
            input_norms: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Write the packed directory atomically and return its manifest. weight_sparsity > 0 prunes the
    attention and FFN projections ("magnitude", or "wanda" with input_norms, the per-matrix input
    activation norms from sparsity.wanda.input_norms) and stores them compressed."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    check_options(encoding, weight_sparsity, prune)
    if weight_sparsity and prune == "wanda" and input_norms is None:
        raise ModelFormatError("--prune wanda needs --calib-text FILE (activation norms come from it)")
    hf_cfg = read_hf_config(hf_dir)
    cfg = model_config_from_hf(hf_cfg)
    reader = CheckpointReader(hf_dir)
    plan = tensor_plan(cfg, hf_layout(hf_cfg))
    missing = [s.hf_name for s in plan if not reader.has(s.hf_name)]
    if missing:
        raise ModelFormatError(f"checkpoint in {hf_dir} lacks {len(missing)} tensor(s) the {cfg.arch} "
                               f"architecture needs, first {missing[0]}")
    norms = input_norms if (weight_sparsity and prune == "wanda") else None
    with atomic_directory(out_dir, overwrite, sources=(hf_dir,)) as tmp:
        tensors: dict[str, dict] = {}
        files: dict[str, dict] = {}
        by_file: dict[str, dict[str, np.ndarray]] = {}
        for src in tqdm(plan, desc="convert", unit="tensor", disable=not progress, leave=False):
            w = src.read(reader)
            _check_shape(hf_dir, src, w, cfg)
            check_finite(str(hf_dir), src.hf_name, w)
            mask = None
            if weight_sparsity and src.name.split(".", 2)[-1] in PRUNABLE:
                # kept-weight mask in the HF orientation: per output row, as magnitude and Wanda define
                mask = prune_mask(w, weight_sparsity, None if norms is None else norms[src.name])
                w = np.where(mask, w, 0.0).astype(np.float32)  # the sign plane sees the pruned gate
            with np.errstate(over="ignore"):  # an overflow to fp16 inf is reported by _check_storable, by name
                arrays, entry = _encode(src, w, encoding, group_size, mask)
            _check_storable(hf_dir, src, w, arrays, entry, encoding)
            fname = _file_for(src.name)
            entry["file"] = fname
            entry["keys"] = {part: f"{src.name}.{part}" for part in arrays}
            tensors[src.name] = entry
            store = by_file.setdefault(fname, {})
            store.update({f"{src.name}.{part}": a for part, a in arrays.items()})
            leaf = src.name.split(".", 2)[-1]
            if src.name.startswith("layers.") and leaf in COLNORM_OF:  # WINA's column norms, from fp32 weights
                cn = src.name[:-len(leaf)] + COLNORM_OF[leaf]
                store[f"{cn}.w"] = column_norms(w)
                tensors[cn] = {"encoding": "fp32", "shape": list(store[f"{cn}.w"].shape), "layout": "vector",
                               "file": fname, "keys": {"w": f"{cn}.w"}}
            if src.name.endswith("ffn.gate"):
                signs = src.name + "_signs"
                store[f"{signs}.bits"] = pack_signs(w)  # (N, ceil(K/32)) uint32 from fp32 weights
                tensors[signs] = {"encoding": "signbits", "shape": list(w.shape), "layout": "row",
                                  "file": fname, "keys": {"bits": f"{signs}.bits"}}
            # A layer's file is complete once the plan moves on: write it now so that memory holds
            # one layer, not the model.
            for done in [f for f in by_file if f != fname and f.startswith("layer_")]:
                files[done] = _save(tmp / done, by_file.pop(done))
        for fname in list(by_file):
            files[fname] = _save(tmp / fname, by_file.pop(fname))
        for name in TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copyfile(hf_dir / name, tmp / name)
                files[name] = file_entry(tmp / name)
        tokenizer = "tokenizer.json" if "tokenizer.json" in files else None
        manifest = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": cfg.to_dict(),
            "encoding": encoding, "tokenizer": tokenizer, "chat_template": _chat_template(hf_dir),
            "source": hf_dir.name, "tensors": tensors, "files": files,
        }
        if default_alpha is not None:
            manifest["sparsity"] = {"default_alpha": float(default_alpha)}
        if weight_sparsity:
            manifest["weight_sparsity"] = {"target": float(weight_sparsity), "prune": prune}
        write_manifest(tmp, manifest)
    return manifest

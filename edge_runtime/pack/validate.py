"""One pass over a packed model's tensors before anything is allocated: the tensor set the config
implies, each tensor's logical shape from the config, and each stored array's dtype and shape from
its encoding, compared with the safetensors headers (which SafetensorsFile has already bounded by the
file sizes). After this pass every size the backends allocate from is a size some file holds.

Stored arrays per encoding, for a logical (N, K) matrix (see pack/quant.py, pack/sparse_weights.py):
  fp32 / fp16   w (N, K) F32 / F16
  int8          q (N, K) I8, scale (N,) F16
  int4          q (N, Kp/2) U8, scale (N, Kp/g) F16, Kp = K rounded up to the group g
  sparse-fp16   bitmap (N, ceil(K/8)) U8, row_offsets (N+1,) I64, values (nnz,) F16
  sparse-int8   as sparse-fp16 with values I8, and scale (N,) F16
  signbits      bits (N, ceil(K/32)) U32
  vector        w (n,) F16 / F32
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.config import ModelConfig
from edge_runtime.errors import ModelFormatError
from edge_runtime.pack.colnorms import COLNORM_OF
from edge_runtime.pack.hf_config import tensor_plan
from edge_runtime.pack.safetensors_mmap import SafetensorsFile

ENCODINGS_BY_KIND = {"vector": ("fp16", "fp32"), "embedding": ("fp16", "fp32"),
                     "matrix": ("fp32", "fp16", "int8", "int4", "sparse-fp16", "sparse-int8"),
                     "matrix_t": ("fp32", "fp16", "int8", "int4", "sparse-fp16", "sparse-int8"),
                     "signs": ("signbits",), "colnorm": ("fp32",)}
LAYOUT_BY_KIND = {"vector": "vector", "embedding": "row", "matrix": "row", "matrix_t": "transposed", "signs": "row",
                  "colnorm": "vector"}


def logical_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """The shape the config implies for a packed tensor (names as pack/hf_config.tensor_plan)."""
    d, q_rows, kv_rows = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    leaf = name.split(".", 2)[-1] if name.startswith("layers.") else name
    shapes = {
        "embed": (cfg.vocab_size, d), "lm_head": (cfg.vocab_size, d),
        "pos_embed": (cfg.max_positions + cfg.pos_offset, d),
        "attn.q": (q_rows, d), "attn.k": (kv_rows, d), "attn.v": (kv_rows, d), "attn.o": (d, q_rows),
        "attn.q_bias": (q_rows,), "attn.k_bias": (kv_rows,), "attn.v_bias": (kv_rows,), "attn.o_bias": (d,),
        "ffn.gate": (cfg.ffn_dim, d), "ffn.up": (cfg.ffn_dim, d), "ffn.down_t": (cfg.ffn_dim, d),
        "ffn.gate_signs": (cfg.ffn_dim, d),
        "ffn.gate_bias": (cfg.ffn_dim,), "ffn.up_bias": (cfg.ffn_dim,), "ffn.down_bias": (d,),
        "attn.o_colnorm": (q_rows,), "ffn.down_colnorm": (cfg.ffn_dim,),  # WINA: one norm per input channel
    }
    return shapes.get(leaf, (d,))  # the rest are norms' weights and biases


def expected_tensors(cfg: ModelConfig) -> dict[str, str]:
    """Logical name -> kind, for every tensor the model must have."""
    out = {s.name: s.kind for s in tensor_plan(cfg)}
    out.update({f"layers.{i}.ffn.gate_signs": "signs" for i in range(cfg.n_layers)})
    return out


def optional_tensors(cfg: ModelConfig) -> dict[str, str]:
    """Logical name -> kind, for the tensors a model may have: WINA's column norms of each layer matrix
    (packs converted before them compute the norms when WINA is first used)."""
    matrices = [s.name for s in tensor_plan(cfg) if s.name.startswith("layers.")]
    return {m[:-len(leaf)] + COLNORM_OF[leaf]: "colnorm" for m in matrices
            if (leaf := m.split(".", 2)[-1]) in COLNORM_OF}


def stored_arrays(encoding: str, shape: tuple[int, ...], group: int, nnz: int | None) -> dict[str, tuple]:
    """part -> (safetensors dtype tags allowed, shape) for one tensor; nnz: the values' length (sparse)."""
    if len(shape) == 1:
        return {"w": (("F16",) if encoding == "fp16" else ("F32",), shape)}
    n, k = shape
    if encoding in ("fp32", "fp16"):
        return {"w": (("F32",) if encoding == "fp32" else ("F16",), (n, k))}
    if encoding == "int8":
        return {"q": (("I8",), (n, k)), "scale": (("F16",), (n,))}
    if encoding == "int4":
        kp = -(-k // group) * group
        return {"q": (("U8",), (n, kp // 2)), "scale": (("F16",), (n, kp // group))}
    if encoding == "signbits":
        return {"bits": (("U32",), (n, -(-k // 32)))}
    parts = {"bitmap": (("U8",), (n, -(-k // 8))), "row_offsets": (("I64",), (n + 1,)),
             "values": (("F16",) if encoding == "sparse-fp16" else ("I8",), (nnz,))}
    if encoding == "sparse-int8":
        parts["scale"] = (("F16",), (n,))
    return parts


def check_tensors(path: Path, cfg: ModelConfig, tensors: dict[str, Any], files: dict[str, SafetensorsFile]) -> None:
    where = f"{path}/manifest.yaml"
    expected = expected_tensors(cfg)
    absent = [n for n in expected if n not in tensors]
    if absent:
        raise ModelFormatError(f"{path} lacks tensor(s) {', '.join(absent[:3])}: the model is incomplete")
    expected.update({n: kind for n, kind in optional_tensors(cfg).items() if n in tensors})
    extra = [n for n in tensors if n not in expected]
    if extra:
        raise ModelFormatError(f"{where}: unexpected tensor(s) {', '.join(extra[:3])} for this config")
    for name, kind in expected.items():
        t = tensors[name]
        shape = logical_shape(cfg, name)
        if t["encoding"] not in ENCODINGS_BY_KIND[kind]:
            raise ModelFormatError(f"{where}: tensor {name} has encoding {t['encoding']!r}; expected one of "
                                   f"{', '.join(ENCODINGS_BY_KIND[kind])}")
        if t.get("layout", "row") != LAYOUT_BY_KIND[kind]:
            raise ModelFormatError(f"{where}: tensor {name} has layout {t.get('layout', 'row')!r}, "
                                   f"expected {LAYOUT_BY_KIND[kind]!r}")
        if tuple(t["shape"]) != shape:
            raise ModelFormatError(f"{where}: tensor {name} has shape {t['shape']}, the config implies {list(shape)}")
        group = t.get("group_size", 0)
        if t["encoding"] == "int4" and group < 2:
            raise ModelFormatError(f"{where}: int4 tensor {name} needs an even group_size >= 2, got {group}")
        f = files[t["file"]]
        nnz = f.shape_of(t["keys"]["values"])[0] if "values" in t["keys"] and t["keys"]["values"] in f else None
        parts = stored_arrays(t["encoding"], shape, group, nnz)
        if set(t["keys"]) != set(parts):
            raise ModelFormatError(f"{where}: tensor {name} stores parts {sorted(t['keys'])}, its encoding "
                                   f"{t['encoding']} needs {sorted(parts)}")
        for part, (dtypes, part_shape) in parts.items():
            key = t["keys"][part]
            if key not in f:
                raise ModelFormatError(f"{f.path} has no tensor {key!r} (part {part} of {name})")
            if f.dtype_of(key) not in dtypes or f.shape_of(key) != part_shape:
                raise ModelFormatError(f"{f.path}: {key} is {f.dtype_of(key)} {list(f.shape_of(key))}; tensor {name} "
                                       f"needs {dtypes[0]} {list(part_shape)}")
        if t["encoding"].startswith("sparse-"):
            _check_sparse(f, name, t["keys"], shape)
        if t["encoding"] == "signbits" and shape[1] % 32:
            _check_sign_padding(f, name, t["keys"]["bits"], shape[1])


def _check_sign_padding(f: SafetensorsFile, name: str, key: str, k: int) -> None:
    """Bits past column k of a sign plane are 0, as pack_signs writes them: SparseInfer's popcount would count
    them as negative products on every backend, and the projection predictor reads them on none."""
    if (f.tensor(key)[:, -1] >> np.uint32(k % 32)).any():
        raise ModelFormatError(f"{f.path}: tensor {name} has sign bits set past column {k}")


def _check_sparse(f: SafetensorsFile, name: str, keys: dict[str, str], shape: tuple[int, int]) -> None:
    """Row segments that tile `values` exactly, each as long as its row's bitmap says, padding bits 0:
    what GEMV indexes by (reads N+1 offsets and the bitmap once)."""
    n, k = shape
    offsets = f.tensor(keys["row_offsets"])
    lengths = np.diff(offsets)
    nnz = f.shape_of(keys["values"])[0]
    if offsets[0] != 0 or offsets[-1] != nnz or (lengths < 0).any() or (lengths > k).any():
        raise ModelFormatError(f"{f.path}: tensor {name} has row offsets that do not tile its {nnz} values")
    bitmap = f.tensor(keys["bitmap"])
    pad = (-k) % 8
    if pad and (bitmap[:, -1] >> (8 - pad)).any():
        raise ModelFormatError(f"{f.path}: tensor {name} has bitmap bits set past column {k}")
    for r0 in range(0, n, 4096):  # in blocks: popcount of (4096, K/8) bytes at a time
        counts = np.bitwise_count(bitmap[r0:r0 + 4096]).sum(axis=1, dtype=np.int64)
        if (counts != lengths[r0:r0 + 4096]).any():
            raise ModelFormatError(f"{f.path}: tensor {name} has a bitmap that disagrees with its row offsets")

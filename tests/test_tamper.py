"""A tampered model: every manifest, config and safetensors header field dropped, of the wrong type,
zero, negative, huge; every path pointed outside the directory, or at a symlink out, a device, a FIFO.
The attacker is consistent: a data file they change gets a matching checksum in the manifest.

Each case runs `generate` in this process. It must end in exit status 2 with one error line that names
the model (or, for the few changes that leave a valid model, listed in ACCEPTED, generate normally);
no case may open a file under the `outside` directory (whose files are valid copies, so a loader that
followed a path there would succeed), /dev/zero or /etc/passwd; no case may trace more memory than the
model's files plus 200 MB.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct
import sys
import tracemalloc
from pathlib import Path

import pytest
import yaml

from edge_runtime.cli import main
from edge_runtime.config import ModelConfig

MIB = 1 << 20
HUGE = 2**40
Q = "layers.0.attn.q"
# every field of a matrix's entry; of the other kinds (a vector, a sign plane, the embedding), the
# fields whose checks depend on the kind
TENSOR_FIELDS = {Q: ("file", "encoding", "shape", "layout", "keys"),
                 "layers.0.attn_norm.weight": ("encoding", "shape", "layout"),
                 "layers.0.ffn.gate_signs": ("encoding", "shape"), "embed": ("shape",)}
LAYER = "layer_000.safetensors"
HEADER_KEY = "layers.0.attn.q.q"


# ---- the models and the audit of opened paths --------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """int8, int4 and sparse-int8 packings of one tiny Llama, and outside/ with valid copies of their files."""
    pytest.importorskip("torch")
    from edge_runtime.pack.convert import convert
    from tests.helpers import make_llama

    root = tmp_path_factory.mktemp("tamper")
    make_llama(root / "hf", act="relu", seed=5)
    convert(root / "hf", root / "int8", "int8", progress=False, default_alpha=1.1)
    convert(root / "hf", root / "int4", "int4", group_size=16, progress=False)
    convert(root / "hf", root / "sparse", "int8", progress=False, weight_sparsity=0.5)
    (root / "outside").mkdir()
    for f in (root / "int8").iterdir():
        shutil.copy(f, root / "outside" / f.name)
    shutil.copy(root / "int8" / "manifest.yaml", root / "outside" / "manifest.yaml")
    return root


OPENED: list[str] = []
_AUDITING = [False]


def _audit(event: str, args: tuple) -> None:
    if _AUDITING[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one records only while _AUDITING is set


# ---- file surgery --------------------------------------------------------------------------------------
def sha(path: Path) -> dict:
    return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "bytes": path.stat().st_size}


def load_manifest(m: Path) -> dict:
    return yaml.load((m / "manifest.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def save_manifest(m: Path, manifest: dict) -> None:
    (m / "manifest.yaml").write_text(yaml.dump(manifest, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                                                        sort_keys=False))


def rewrite_header(path: Path, change) -> None:
    """Apply change(header dict) to a safetensors file's JSON header, keeping the data bytes."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


def rehash(m: Path, *names: str) -> None:
    manifest = load_manifest(m)
    for name in names:
        manifest["files"][name] = sha(m / name)
    save_manifest(m, manifest)


def mutate(value, how: str):
    """The value a generic mutation puts in a field of this value's type."""
    if how == "wrong_type":
        return ["x"] if isinstance(value, (str, int, float, type(None))) else "x"
    if isinstance(value, list) and value:  # shapes, offsets, id lists: mutate the first element
        return [mutate(value[0], how), *value[1:]]
    if isinstance(value, dict):
        return {} if how == "zero" else {"x": -1}
    if isinstance(value, str):
        return {"zero": "", "negative": "-1", "huge": "x" * 5000}[how]
    return {"zero": 0, "negative": -1, "huge": HUGE}[how]


def set_path(d: dict, path: tuple, how: str) -> None:
    *parents, last = path
    for p in parents:
        d = d[p]
    if how == "drop":
        d.pop(last, None)
    else:
        d[last] = mutate(d.get(last), how)


# ---- the cases -------------------------------------------------------------------------------------------
GENERIC = ("drop", "wrong_type", "zero", "negative", "huge")


def manifest_cases():
    out = [("int8", ("format",)), ("int8", ("format_version",)), ("int8", ("model",)), ("int8", ("encoding",)),
           ("int8", ("tokenizer",)), ("int8", ("chat_template",)), ("int8", ("source",)), ("int8", ("tensors",)),
           ("int8", ("files",)), ("int8", ("sparsity",)), ("int8", ("sparsity", "default_alpha"))]
    out += [("int8", ("model", f.name)) for f in dataclasses.fields(ModelConfig)]
    out += [("int8", ("tensors", t, k)) for t, fields in TENSOR_FIELDS.items() for k in fields]
    out += [("int8", ("tensors", Q, "keys", "scale")), ("int4", ("tensors", Q, "group_size")),
            ("sparse", ("tensors", Q, "keys", "row_offsets"))]
    out += [("int8", ("files", LAYER, k)) for k in ("sha256", "bytes")] + [("int8", ("files", LAYER))]
    return [(model, path, how) for model, path in out for how in GENERIC]


def header_cases():
    out = [("int8", (HEADER_KEY, k)) for k in ("dtype", "shape", "data_offsets")]
    out += [("int8", ("__metadata__",)), ("int8", (HEADER_KEY,)), ("sparse", ("layers.0.attn.q.row_offsets", "shape"))]
    return [(model, path, how) for model, path in out for how in GENERIC]


def _config(m, key, value):
    manifest = load_manifest(m)
    manifest["model"][key] = value
    save_manifest(m, manifest)


def _tensor_file(m, outside, value, entry_name=None):
    manifest = load_manifest(m)
    manifest["tensors"][Q]["file"] = value
    manifest["files"][entry_name or value] = sha(outside / LAYER)
    save_manifest(m, manifest)


def _tokenizer(m, value, entry: dict | None = None):
    manifest = load_manifest(m)
    manifest["tokenizer"] = value
    manifest["files"][value] = entry or manifest["files"]["tokenizer.json"]
    save_manifest(m, manifest)


def _replace_with_link(m, name, target):
    (m / name).unlink()
    (m / name).symlink_to(target)


def _offsets(m, begin, end):
    def change(h):
        h[HEADER_KEY]["data_offsets"] = [begin, end]
    rewrite_header(m / LAYER, change)
    rehash(m, LAYER)


def _sparse_data(m, part, change):
    """Overwrite the bytes of one sparse array in place (header intact), rehash."""
    from edge_runtime.pack.safetensors_mmap import SafetensorsFile

    path = m / LAYER
    f = SafetensorsFile(str(path))
    key = f"{Q}.{part}"
    arr = f.tensor(key).copy()
    begin = f._base + f._entries[key]["data_offsets"][0]
    del f
    change(arr)
    data = bytearray(path.read_bytes())
    data[begin:begin + arr.nbytes] = arr.tobytes()
    path.write_bytes(bytes(data))
    rehash(m, LAYER)


def _fifo(m):
    (m / "tokenizer.json").unlink()
    os.mkfifo(m / "tokenizer.json")


# name -> (model, change(m, outside)); the issue's own examples first
SPECIAL = {
    "tensor file ../outside": ("int8", lambda m, o: _tensor_file(m, o, f"../outside/{LAYER}")),
    "tensor file absolute": ("int8", lambda m, o: _tensor_file(m, o, str(o / LAYER))),
    "tensor file symlinked out": ("int8", lambda m, o: _replace_with_link(m, LAYER, o / LAYER)),
    "tensor file symlink loop": ("int8", lambda m, o: _replace_with_link(m, LAYER, m / LAYER)),
    "tokenizer ../../etc/passwd": ("int8", lambda m, o: _tokenizer(m, "../../../../../../etc/passwd")),
    "tokenizer /dev/zero": ("int8", lambda m, o: _tokenizer(m, "/dev/zero")),
    "tokenizer ../outside": ("int8", lambda m, o: _tokenizer(m, "../outside/tokenizer.json")),
    "tokenizer symlinked out": ("int8", lambda m, o: _replace_with_link(m, "tokenizer.json", o / "tokenizer.json")),
    "tokenizer symlink to /dev/zero": ("int8", lambda m, o: _replace_with_link(m, "tokenizer.json", "/dev/zero")),
    "tokenizer is a FIFO": ("int8", lambda m, o: _fifo(m)),
    "manifest symlinked out": ("int8", lambda m, o: _replace_with_link(m, "manifest.yaml", o / "manifest.yaml")),
    "calibration symlinked out": ("int8", lambda m, o: (m / "calibration.yaml").symlink_to(o / "manifest.yaml")),
    "calibration not in checksums": ("int8", lambda m, o: (m / "calibration.yaml").write_text(
        "calibration_version: 2")),
    "offsets [-64, ...]": ("int8", lambda m, o: _offsets(m, -64, 192 * 64 - 64)),
    "offsets past the end": ("int8", lambda m, o: _offsets(m, 10**9, 10**9 + 192 * 64)),
    "offsets overlong": ("int8", lambda m, o: _offsets(m, 0, HUGE)),
    "n_kv_heads 0": ("int8", lambda m, o: _config(m, "n_kv_heads", 0)),
    "n_heads 0": ("int8", lambda m, o: _config(m, "n_heads", 0)),
    "n_heads 2**31": ("int8", lambda m, o: _config(m, "n_heads", 2**31)),
    "n_heads and n_kv_heads 2**30": ("int8", lambda m, o: (_config(m, "n_heads", 2**30),
                                                           _config(m, "n_kv_heads", 2**30))),
    "head_dim 2**30": ("int8", lambda m, o: _config(m, "head_dim", 2**30)),
    "head_dim odd": ("int8", lambda m, o: _config(m, "head_dim", 15)),
    "max_positions 2**31-1": ("int8", lambda m, o: _config(m, "max_positions", 2**31 - 1)),
    "vocab_size + 1": ("int8", lambda m, o: _config(m, "vocab_size", 301)),
    "n_layers 3": ("int8", lambda m, o: _config(m, "n_layers", 3)),
    "ffn_dim 2**24": ("int8", lambda m, o: _config(m, "ffn_dim", 2**24)),
    "norm_eps nan": ("int8", lambda m, o: _config(m, "norm_eps", float("nan"))),
    "rope_theta inf": ("int8", lambda m, o: _config(m, "rope_theta", float("inf"))),
    "rope_scaling llama3 without factor": ("int8", lambda m, o: _config(m, "rope_scaling", {
        "rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "rope_scaling linear factor 0": ("int8", lambda m, o: _config(m, "rope_scaling", {"rope_type": "linear",
                                                                                        "factor": 0})),
    "rope_scaling unknown type": ("int8", lambda m, o: _config(m, "rope_scaling", {"rope_type": "yarn", "factor": 2})),
    "eos_token_ids an int": ("int8", lambda m, o: _config(m, "eos_token_ids", 2)),
    "tensors as a list": ("int8", lambda m, o: (lambda mf: (mf.__setitem__("tensors", list(mf["tensors"].values())),
                                                            save_manifest(m, mf)))(load_manifest(m))),
    "manifest is a list": ("int8", lambda m, o: (m / "manifest.yaml").write_text("- 1\n- 2\n")),
    "manifest not YAML": ("int8", lambda m, o: (m / "manifest.yaml").write_text("a: [\n")),
    "header length huge": ("int8", lambda m, o: ((m / LAYER).write_bytes(struct.pack("<Q", HUGE)
                                                                         + (m / LAYER).read_bytes()[8:]),
                                                 rehash(m, LAYER))),
    "header not JSON": ("int8", lambda m, o: ((m / LAYER).write_bytes(struct.pack("<Q", 8) + b"{{{{{{{{"
                                                                      + (m / LAYER).read_bytes()[16:]),
                                              rehash(m, LAYER))),
    "sparse row offsets out of order": ("sparse", lambda m, o: _sparse_data(
        m, "row_offsets", lambda a: a.__setitem__(1, a[-1] + 5))),
    "sparse bitmap disagrees": ("sparse", lambda m, o: _sparse_data(m, "bitmap", lambda a: a.__setitem__(0, 255))),
    "int4 group_size 3": ("int4", lambda m, o: (lambda mf: (mf["tensors"][Q].__setitem__("group_size", 3),
                                                            save_manifest(m, mf)))(load_manifest(m))),
}

# Changes that leave a valid model: generate runs normally. Everything else must be refused.
ACCEPTED = {
    ("int8", ("chat_template",), "drop"),
    ("int8", ("source",), "drop"), ("int8", ("source",), "wrong_type"), ("int8", ("source",), "zero"),
    ("int8", ("source",), "negative"), ("int8", ("source",), "huge"),  # source is informative only
    # no default alpha ({} or {"x": -1}): the runtime's fallback alpha
    ("int8", ("sparsity",), "drop"), ("int8", ("sparsity",), "zero"), ("int8", ("sparsity",), "negative"),
    ("int8", ("sparsity",), "huge"),
    ("int8", ("sparsity", "default_alpha"), "drop"), ("int8", ("sparsity", "default_alpha"), "huge"),
    ("int8", ("model", "norm_eps"), "drop"), ("int8", ("model", "norm_eps"), "zero"),
    ("int8", ("model", "norm_eps"), "huge"),
    ("int8", ("model", "act_threshold"), "drop"), ("int8", ("model", "act_threshold"), "zero"),
    ("int8", ("model", "act_threshold"), "negative"), ("int8", ("model", "act_threshold"), "huge"),
    ("int8", ("model", "rope_theta"), "drop"), ("int8", ("model", "rope_theta"), "huge"),
    ("int8", ("model", "rope_scaling"), "drop"),
    ("int8", ("model", "attn_bias"), "drop"), ("int8", ("model", "mlp_bias"), "drop"),
    ("int8", ("model", "pos_offset"), "drop"), ("int8", ("model", "pos_offset"), "zero"),
    ("int8", ("model", "bos_token_id"), "drop"), ("int8", ("model", "bos_token_id"), "zero"),
    ("int8", ("model", "eos_token_ids"), "drop"), ("int8", ("model", "eos_token_ids"), "zero"),
    ("int8", ("model", "tie_embeddings"), "drop"),  # false, as stored
    # a Llama's max_positions sizes nothing: the context is min(--max-context or 2048, max_positions)
    ("int8", "max_positions 2**31-1", ""),
    ("int8", ("tensors", Q, "layout"), "drop"),  # "row" is the default layout
    # the family fields: dropped they take their defaults, which this model stores; zero caps and windows are "off"
    # as stored; a huge soft-cap is no cap, a huge embedding scale or query scalar a valid (odd) model
    *((("int8", ("model", f), "drop")) for f in ("qkv_bias", "embed_scale", "post_norms", "query_pre_attn_scalar",
                                                 "attn_softcap", "logit_softcap", "sliding_window", "sliding_layers")),
    *((("int8", ("model", f), "zero")) for f in ("attn_softcap", "logit_softcap", "sliding_window", "sliding_layers")),
    *((("int8", ("model", f), "huge")) for f in ("embed_scale", "query_pre_attn_scalar", "attn_softcap",
                                                 "logit_softcap")),
    ("int8", ("__metadata__",), "drop"), ("int8", ("__metadata__",), "wrong_type"),  # metadata is not read
    ("int8", ("__metadata__",), "zero"), ("int8", ("__metadata__",), "negative"), ("int8", ("__metadata__",), "huge"),
}


def _apply(kind: str, target, how: str, m: Path, outside: Path) -> None:
    if kind == "special":
        SPECIAL[target][1](m, outside)
    elif kind == "manifest":
        manifest = load_manifest(m)
        set_path(manifest, target, how)
        save_manifest(m, manifest)
    else:  # header: the file keeps a consistent checksum
        rewrite_header(m / LAYER, lambda h: set_path(h, target, how))
        rehash(m, LAYER)


CASES = ([("manifest", model, path, how) for model, path, how in manifest_cases()]
         + [("header", model, path, how) for model, path, how in header_cases()]
         + [("special", SPECIAL[name][0], name, "") for name in SPECIAL])


def _id(case) -> str:
    kind, model, target, how = case
    return f"{kind}:{model}:{target if isinstance(target, str) else '.'.join(target)}:{how}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_tampered_model(models, tmp_path, capsys, record_property, case):
    kind, model, target, how = case
    m = tmp_path / "m"
    shutil.copytree(models / model, m)
    outside = models / "outside"
    _apply(kind, target, how, m, outside)
    files_bytes = sum(f.stat().st_size for f in (models / model).iterdir())
    OPENED.clear()
    tracemalloc.start()
    _AUDITING[0] = True
    try:
        code = main(["generate", "--model", str(m), "--prompt", "the", "--max-new-tokens", "2", "--backend", "cpu",
                     "--profile", "cpu-generic"])
    finally:
        _AUDITING[0] = False
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    out, err = capsys.readouterr()
    record_property("exit", code)  # the figures behind the bar, in --junitxml's output
    record_property("traced_peak_mib", round(peak / MIB, 2))
    record_property("files_mib", round(files_bytes / MIB, 2))
    assert "Traceback" not in err
    escaped = [p for p in OPENED if Path(p).resolve().is_relative_to(outside.resolve())
               or p in ("/dev/zero", "/etc/passwd")]
    assert escaped == [], escaped
    assert peak <= files_bytes + 200 * MIB, f"traced {peak / MIB:.0f} MiB"
    accepted = (model, target, how) in ACCEPTED
    if accepted:
        assert code == 0 and out, err
        return
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("edge-runtime: error:"), err
    assert str(m) in lines[0] or "model config" in lines[0], lines[0]  # the loader refused it, nothing else

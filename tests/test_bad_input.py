"""Bad input: one line on stderr, exit status 2, no traceback, nothing half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from edge_runtime.cli import main
from edge_runtime.pack.convert import convert
from tests.helpers import make_llama


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("bad")
    make_llama(root / "hf", act="relu")
    convert(root / "hf", root / "packed", "int8", progress=False)
    return root


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edge-runtime: error:"), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_path(capsys, tmp_path, monkeypatch):
    """Even on the first run after an install (kernels not compiled yet), the error is the only line: nothing
    compiles for a path that holds no model, so the compiling notice is not printed."""
    monkeypatch.setattr("edge_runtime.backends.jit.compile_pending", lambda fn: True)
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert_one_line_error(code, err, "does not exist")
    assert err.count(str(tmp_path / "nope")) == 1  # named once


def test_calibrate_names_the_model_it_rewrites(capsys, tmp_path):
    """calibrate writes into its model: it never defaults to the embedded one inside the installed package."""
    text = tmp_path / "t.txt"
    text.write_text("The sea was calm. " * 50)
    with pytest.raises(SystemExit) as e:  # a usage error: argparse's exit, one line
        main(["calibrate", "--text", str(text)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "--model" in err


def test_truncated_safetensors(capsys, packed, tmp_path):
    m = copy_model(packed / "packed", tmp_path / "m")
    f = m / "layer_001.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, _, err = run_cli(capsys, "generate", "--model", str(m), "--prompt", "hi")
    assert_one_line_error(code, err, "layer_001.safetensors", "truncated")


def test_truncated_safetensors_without_checksums(capsys, packed, tmp_path):
    """--no-verify skips hashing; the safetensors reader still refuses the short file."""
    m = copy_model(packed / "packed", tmp_path / "m")
    f = m / "layer_000.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    code, _, err = run_cli(capsys, "generate", "--model", str(m), "--prompt", "hi", "--no-verify")
    assert_one_line_error(code, err, "layer_000.safetensors", "truncated")


def test_flipped_byte_fails_checksum(capsys, packed, tmp_path):
    m = copy_model(packed / "packed", tmp_path / "m")
    f = m / "layer_000.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) - 7] ^= 0x01
    f.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "generate", "--model", str(m), "--prompt", "hi")
    assert_one_line_error(code, err, "layer_000.safetensors", "checksum")


@pytest.mark.parametrize("key", ["files", "model", "tensors"])
def test_manifest_missing_key(capsys, packed, tmp_path, key):
    m = copy_model(packed / "packed", tmp_path / "m")
    manifest = yaml.safe_load((m / "manifest.yaml").read_text())
    del manifest[key]
    (m / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    code, _, err = run_cli(capsys, "info", str(m))
    assert_one_line_error(code, err, key)


def test_manifest_model_missing_field(capsys, packed, tmp_path):
    m = copy_model(packed / "packed", tmp_path / "m")
    manifest = yaml.safe_load((m / "manifest.yaml").read_text())
    del manifest["model"]["n_layers"]
    (m / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    code, _, err = run_cli(capsys, "generate", "--model", str(m), "--prompt", "hi")
    assert_one_line_error(code, err, "n_layers")


@pytest.mark.parametrize("field, value", [("bos_token_id", 10**5), ("eos_token_ids", [2, 10**5])])
def test_special_token_outside_the_vocabulary(capsys, packed, tmp_path, field, value):
    m = copy_model(packed / "packed", tmp_path / "m")
    manifest = yaml.safe_load((m / "manifest.yaml").read_text())
    manifest["model"][field] = value
    (m / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    code, _, err = run_cli(capsys, "generate", "--model", str(m), "--prompt", "hi", "--no-verify")
    assert_one_line_error(code, err, field, "outside the vocabulary")


@pytest.mark.parametrize("model_type", ["gpt2", "mistral"])
def test_unsupported_architecture_leaves_nothing(capsys, packed, tmp_path, model_type):
    hf = copy_model(packed / "hf", tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["model_type"] = model_type
    (hf / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "convert", str(hf), str(out))
    assert_one_line_error(code, err, model_type, "llama")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [hf]  # no temporary directory left behind either


def test_failed_convert_midway_leaves_nothing(capsys, packed, tmp_path):
    """A checkpoint whose safetensors is truncated fails during conversion, not before."""
    hf = copy_model(packed / "hf", tmp_path / "hf")
    f = hf / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-64])
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "convert", str(hf), str(out))
    assert_one_line_error(code, err, "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_full_disk_during_convert_is_one_line_and_leaves_nothing(capsys, packed, tmp_path, monkeypatch):
    """safetensors reports a full disk as SafetensorError, which is no OSError: convert ended in a traceback."""
    import safetensors.numpy
    from safetensors import SafetensorError

    def disk_full(*_args, **_kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    code, _, err = run_cli(capsys, "convert", str(packed / "hf"), str(tmp_path / "out"))
    assert_one_line_error(code, err, "cannot write", "No space left on device")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["hidden_size", "intermediate_size", "num_key_value_heads", "vocab_size"])
def test_config_that_disagrees_with_its_tensors_replaces_nothing(capsys, packed, tmp_path, key):
    """convert --overwrite with a config.json from another model must not swap a good pack for one that
    cannot load: the mismatch is found while converting and the old pack stays."""
    hf = copy_model(packed / "hf", tmp_path / "hf")
    cfg = json.loads((hf / "config.json").read_text())
    cfg[key] = cfg[key] * 2
    (hf / "config.json").write_text(json.dumps(cfg))
    out = copy_model(packed / "packed", tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run_cli(capsys, "convert", str(hf), str(out), "--overwrite")
    assert_one_line_error(code, err, "config.json implies")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"]


def test_convert_without_a_tokenizer_says_text_will_not_work(capsys, packed, tmp_path):
    hf = copy_model(packed / "hf", tmp_path / "hf")
    (hf / "tokenizer.json").unlink()
    code, _, err = run_cli(capsys, "convert", str(hf), str(tmp_path / "out"))
    assert code == 0 and "no tokenizer.json" in err and "token ids" in err


def test_convert_refuses_to_clobber(capsys, packed, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run_cli(capsys, "convert", str(packed / "hf"), str(out))
    assert_one_line_error(code, err, "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("where", ["same", "parent"])
def test_convert_overwrite_never_deletes_its_input(capsys, packed, tmp_path, where):
    hf = copy_model(packed / "hf", tmp_path / "models" / "hf")
    (tmp_path / "models" / "other-robot-model.bin").write_bytes(b"precious")
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    out = hf if where == "same" else tmp_path / "models"
    code, _, err = run_cli(capsys, "convert", str(hf), str(out), "--overwrite")
    assert_one_line_error(code, err, "is or contains the input")
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
    assert (tmp_path / "models" / "other-robot-model.bin").read_bytes() == b"precious"


def test_convert_overwrite_replaces_only_a_packed_model(capsys, packed, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run_cli(capsys, "convert", str(packed / "hf"), str(out), "--overwrite")
    assert_one_line_error(code, err, "only replaces a packed model")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    old = copy_model(packed / "packed", tmp_path / "old")
    (old / "stale.txt").write_text("from the old pack")
    code, _, err = run_cli(capsys, "convert", str(packed / "hf"), str(old), "--overwrite")
    assert code == 0, err
    assert not (old / "stale.txt").exists() and (old / "manifest.yaml").is_file()


def _sharded(packed, dst):
    """The HF checkpoint split into two safetensors shards with its index, as save_pretrained shards it."""
    from safetensors.numpy import load_file, save_file

    hf = copy_model(packed / "hf", dst)
    tensors = load_file(hf / "model.safetensors")
    (hf / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, part in shards.items():
        save_file({n: tensors[n] for n in part}, hf / shard, metadata={"format": "pt"})
    weight_map = {n: shard for shard, part in shards.items() for n in part}
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return hf, weight_map


@pytest.mark.parametrize("weight_map", [[], {"model.embed_tokens.weight": 3},
                                        {"model.embed_tokens.weight": "../elsewhere.safetensors"}])
def test_malformed_shard_index_is_one_line(capsys, packed, tmp_path, weight_map):
    hf, good = _sharded(packed, tmp_path / "hf")
    assert run_cli(capsys, "convert", str(hf), str(tmp_path / "ok"))[0] == 0  # the index as written converts
    bad = weight_map if isinstance(weight_map, list) else {**good, **weight_map}
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": bad}))
    code, _, err = run_cli(capsys, "convert", str(hf), str(tmp_path / "out"))
    assert_one_line_error(code, err, "weight_map")
    assert not (tmp_path / "out").exists()


def test_prompt_longer_than_context(capsys, packed):
    code, _, err = run_cli(capsys, "generate", "--model", str(packed / "packed"), "--prompt", "the lazy dog " * 80,
                           "--max-context", "64")
    assert_one_line_error(code, err, "context")


def test_sparsity_on_silu_model_is_refused(capsys, tmp_path):
    pytest.importorskip("torch")
    make_llama(tmp_path / "hf", act="silu")
    convert(tmp_path / "hf", tmp_path / "p", "fp16", progress=False)
    capsys.readouterr()
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path / "p"), "--prompt", "hi", "--sparsity", "on")
    assert_one_line_error(code, err, "silu")
    text = tmp_path / "held-out.txt"
    text.write_text("the robot opens the door and looks at the sea. " * 40)
    code, _, err = run_cli(capsys, "eval", "--model", str(tmp_path / "p"), "--text", str(text))  # sparsity on
    assert_one_line_error(code, err, "--sparsity teal")


def test_not_a_model_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "info", str(tmp_path))
    assert_one_line_error(code, err, "manifest.yaml")


def test_malformed_pinned_digest_is_refused_before_loading(capsys):
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--manifest-sha256", "abc123")
    assert_one_line_error(code, err, "'abc123' is not a sha256 digest")
    assert "changed" not in err  # a mistyped digest is not reported as a changed model


def test_missing_extra_names_the_checkout_install(capsys):
    """edge-runtime is not on a package index: the hint installs the extra from the checkout."""
    from edge_runtime.backends import cuda_available

    if cuda_available():
        pytest.skip("a GPU is here")
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--backend", "cuda")
    assert_one_line_error(code, err, "pip install '.[cuda]' in the edge-runtime checkout")


def test_threads_above_the_pool_are_reported(capsys, monkeypatch):
    import edge_runtime.backends.jit as jit

    monkeypatch.setattr(jit, "max_threads", lambda: 1)
    code, _, err = run_cli(capsys, "generate", "--prompt", "hi", "--max-new-tokens", "2", "--backend", "cpu",
                           "--threads", "3")
    assert code == 0
    assert "--threads 3: the cpu kernels run on at most 1 thread here" in err


def test_eval_on_a_short_text_says_the_figure_is_noise(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The old man looked at the sea. " * 6)
    code, out, err = run_cli(capsys, "eval", "--text", str(text), "--backend", "cpu", "--json")
    assert code == 0 and json.loads(out)["tokens"] < 1000
    assert "tokens scored; a perplexity change" in err


def test_bench_tokens_beyond_the_context_are_cut_to_it(capsys):
    """The bytes per token (and the projection) must be those of a KV cache the runtime can hold."""
    code, out, err = run_cli(capsys, "bench", "--tokens", "100000", "--repeats", "1", "--backend", "cpu",
                             "--max-context", "64", "--profile", "cpu-generic", "--json")
    res = json.loads(out)
    assert code == 0 and res["tokens_asked"] == 100000 and 0 < res["tokens"] < 64
    assert "more than the 64-token context holds" in err


def test_numba_threads_zero_is_one_line(capsys, monkeypatch):
    """numba itself stops with a ValueError traceback when first imported under NUMBA_NUM_THREADS=0."""
    monkeypatch.setenv("NUMBA_NUM_THREADS", "0")
    code, _, err = run_cli(capsys, "info")
    assert_one_line_error(code, err, "NUMBA_NUM_THREADS=0")


def test_reader_gone_away_is_silent():
    """`edge-runtime info | true`: the pipe is closed before the first write; no message, exit 0 (BrokenPipeError
    is an OSError, and was reported as 'error: Broken pipe', exit 2)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # long before the interpreter has imported the package
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err


def test_chat_with_stdin_closed(capsys, monkeypatch):
    """`edge-runtime chat <&-`: Python sets sys.stdin to None, and input() raised RuntimeError after the load."""
    monkeypatch.setattr("sys.stdin", None)
    code, _, err = run_cli(capsys, "chat")
    assert_one_line_error(code, err, "standard input, which is closed")


def test_sign_bits_past_the_last_column_are_refused(tmp_path):
    """hidden 48: each gate sign row ends in a word with 16 padding bits, which must be 0 (pack_signs writes 0;
    SparseInfer's popcount would count set ones as negative products)."""
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from edge_runtime.errors import ModelFormatError
    from edge_runtime.pack.loader import load_packed

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, hidden_act="relu")
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    m = convert(tmp_path / "hf", tmp_path / "p", "int8", progress=False)
    load_packed(tmp_path / "p")  # as converted: valid
    entry = m["tensors"]["layers.0.ffn.gate_signs"]
    path = tmp_path / "p" / entry["file"]
    with safe_open(path, "np") as f:
        meta = f.metadata()
    arrays = load_file(path)
    bits = arrays[entry["keys"]["bits"]]
    assert bits.shape[1] == 2 and (bits[:, -1] >> 16 == 0).all()
    bits[3, -1] |= np.uint32(1 << 20)  # one padding bit, in one row
    save_file(arrays, path, metadata=meta)  # the same bytes but one
    with pytest.raises(ModelFormatError, match="sign bits set past column 48"):
        load_packed(tmp_path / "p", verify=False)  # sizes unchanged; checksums would catch it first

"""Memory at load (the profile's usable memory and the memory free now) and convert --for-device."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import yaml

import edge_runtime
from edge_runtime import cli
from edge_runtime.config import ModelConfig
from edge_runtime.devices.planner import KVBudgetWarning, plan_load, plan_memory, split_encoding
from edge_runtime.devices.profile import load_profile
from edge_runtime.devices.shapes import SHAPES
from edge_runtime.devices.sizes import cpu_f32_copy_bytes, kv_cache_bytes, model_bytes
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.pack.format import read_manifest
from edge_runtime.pack.hf_config import model_config_from_hf, read_hf_config
from edge_runtime.paths import DEFAULT_MODEL_DIR

CFG_7B = SHAPES["llama2-7b"]


def test_plan_load_fits_shortens_or_refuses():
    nano = load_profile("jetson-orin-nano-8gb")
    int4 = model_bytes(CFG_7B, "int4")["total"]  # about 3.95 GB; a 2048-token fp16 KV cache is 1.07 GB
    full = plan_load(CFG_7B, "int4", int4, nano, 2048, free_now_gb=20.0)
    assert full.context == 2048 and full.needed_gb <= full.budget_gb == nano.usable_memory_gb()
    # 5.6 GB free now, 0.5 GB of it for the CUDA context on this unified-memory board: 5.1 GB for the model
    with pytest.warns(KVBudgetWarning, match="shortened from 2048 to 1536 tokens") as caught:
        short = plan_load(CFG_7B, "int4", int4, nano, 2048, free_now_gb=5.6)
    assert "\n" not in str(caught[0].message) and "CUDA context" in short.note
    assert short.context == 1536 and short.needed_gb <= short.budget_gb == pytest.approx(5.1)
    # the same free memory on a board whose GPU has its own memory: the context is not counted against it
    discrete = dataclasses.replace(nano, memory=dataclasses.replace(nano.memory, shared_with_cpu=False))
    assert plan_load(CFG_7B, "int4", int4, discrete, 2048, free_now_gb=5.6).context == 2048
    with pytest.raises(EdgeRuntimeError, match="even with a 256-token KV cache") as e:
        plan_load(CFG_7B, "int4", int4, nano, 2048, free_now_gb=4.3)
    assert "\n" not in str(e.value)


def fake_7b_fp16_pack(root):
    """A manifest of a 7B-shaped fp16 pack with no weights behind it: load must refuse from the manifest
    alone, before it maps (or checksums) anything."""
    manifest = read_manifest(DEFAULT_MODEL_DIR)
    tensors = {name: {**t, "file": "weights.safetensors"} for name, t in manifest["tensors"].items()}
    manifest.update(model=CFG_7B.to_dict(), encoding="fp16", tensors=tensors, tokenizer=None,
                    files={"weights.safetensors": {"sha256": "0" * 64, "bytes": model_bytes(CFG_7B, "fp16")["total"]}})
    root.mkdir()
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return root


def test_load_refuses_7b_fp16_on_orin_nano_naming_what_fits(tmp_path, capsys):
    """Bar 4 (load): one line, naming the encoding that fits. (psutil's free memory here is well above
    the profile's 6 GB, so the profile is the limit.)"""
    pack = fake_7b_fp16_pack(tmp_path / "7b-fp16")
    # the cpu backend keeps its KV cache in fp32: int4 with a 2,048-token one (2.1 GB) no longer fits in 6 GB, a
    # pruned int8 does (the suggestion used to assume fp16 KV, and loading what it named then shortened the context)
    with pytest.raises(EdgeRuntimeError, match="int8\\+ws0.7 fits with a 2048-token context") as e:
        edge_runtime.load(pack, profile="jetson-orin-nano-8gb", backend="cpu")
    assert str(e.value).startswith("fp16 weights need 14.") and "\n" not in str(e.value)  # 13.5 GB of weights
    rc = cli.main(["generate", "--model", str(pack), "--profile", "jetson-orin-nano-8gb", "--backend", "cpu",
                   "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "int8+ws0.7 fits" in err


def small_profile(tmp_path, kv_tokens: int):
    """cpu-generic with just enough memory for the default model and a `kv_tokens` float32 KV cache."""
    data = yaml.safe_load(load_profile_path("cpu-generic").read_text())
    manifest = read_manifest(DEFAULT_MODEL_DIR)
    cfg = ModelConfig.from_dict(manifest["model"])
    weights = sum(f["bytes"] for f in manifest["files"].values()) + cpu_f32_copy_bytes(cfg, manifest["encoding"])
    need_gb = (weights + kv_cache_bytes(cfg, kv_tokens, 4)) * 1.05 / 1e9
    m = data["memory"]
    data.update(name="tiny-box", memory_total_gb=m["reserve_gb"] + m["runtime_overhead_gb"] + need_gb)
    path = tmp_path / "tiny-box.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def load_profile_path(name):
    from edge_runtime.devices.profile import profile_dirs

    return next(d / f"{name}.yaml" for d in profile_dirs() if (d / f"{name}.yaml").is_file())


def test_load_shortens_the_kv_budget_with_a_warning(tmp_path, capsys):
    profile = small_profile(tmp_path, kv_tokens=300)  # the default model asks for 512 positions
    with pytest.warns(KVBudgetWarning, match="from 512 to 256 tokens"):
        rt = edge_runtime.load(None, profile=str(profile), backend="cpu")
    health = rt.health_info()
    assert rt.decoder.max_context == health["kv_budget_tokens"] == 256
    assert health["memory"]["asked_context"] == 512 and health["memory"]["context"] == 256
    assert health["selection"]["profile"] == "tiny-box"
    rt.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CLI turns the warning into its own line, not a Python warning
        rc = cli.main(["generate", "--profile", str(profile), "--backend", "cpu", "--prompt", "Alice",
                       "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "edge-runtime: warning: KV cache shortened from 512 to 256 tokens" in err.splitlines()[0]


def test_cpu_generic_loads_here_with_the_full_context():
    rt = edge_runtime.load(None, profile="cpu-generic", backend="cpu")
    plan = rt.health_info()["memory"]
    assert plan["context"] == plan["asked_context"] == rt.decoder.max_context
    assert plan["free_gb"] is not None and plan["needed_gb"] <= plan["budget_gb"]
    rt.close()


def test_convert_for_device_picks_the_planner_encoding(tmp_path, capsys):
    """Bar 4 (convert): a 7B-shaped config.json on Orin Nano 8GB plans int4 at 2048 tokens, int8 with
    70 % weight sparsity at 4096; a tiny checkpoint converts end to end with what the planner picks."""
    hf7b = tmp_path / "hf7b"
    hf7b.mkdir()
    (hf7b / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
        "hidden_act": "relu", "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2}))
    cfg, nano = model_config_from_hf(read_hf_config(hf7b)), load_profile("jetson-orin-nano-8gb")
    assert split_encoding(plan_memory(cfg, nano, 2048).encoding) == ("int4", 0.0)
    assert split_encoding(plan_memory(cfg, nano, 4096).encoding) == ("int8", 0.7)
    pytest.importorskip("torch")
    from tests.helpers import make_llama

    make_llama(tmp_path / "hf", act="relu")
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "p"), "--for-device",
                     "jetson-orin-nano-8gb"]) == 0
    assert read_manifest(tmp_path / "p")["encoding"] == "fp16"  # a tiny model fits unquantised
    assert "planned for jetson-orin-nano-8gb: fp16" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "q"), "--for-device", "auto",
                     "--dtype", "int4"]) == 2
    assert "leave out --dtype" in capsys.readouterr().err


def test_the_plan_counts_what_the_backend_builds_beside_the_weights():
    """A small model's fp32 copies on the cpu backend and prefill "onnx"'s fp32 session were not in the plan: the
    session alone held 435 MiB beside a 152 MB int8 model, a review measured."""
    from edge_runtime.runtime import _plan_memory

    manifest = read_manifest(DEFAULT_MODEL_DIR)
    cfg = ModelConfig.from_dict(manifest["model"])
    copies, session = cpu_f32_copy_bytes(cfg, manifest["encoding"]), model_bytes(cfg, "fp32")["total"]
    assert copies > 0
    profile = load_profile("cpu-generic")
    plain = _plan_memory(DEFAULT_MODEL_DIR, profile, None, "cpu")
    onnx = _plan_memory(DEFAULT_MODEL_DIR, profile, None, "cpu", prefill="onnx")
    assert "fp32 copies for prompts" in plain.note and "ONNX" not in plain.note
    assert "the fp32 ONNX prefill session" in onnx.note
    assert onnx.needed_gb - plain.needed_gb == pytest.approx(session * 1.05 / 1e9, rel=1e-6)
    assert plain.weights_gb == onnx.weights_gb  # the packed files as stored

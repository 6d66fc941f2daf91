"""Every convertible family against transformers in fp32 (Qwen2, Mistral, Phi-3, Gemma, Gemma-2, dReLU), on the
cpu backend: logits over a 32-token prompt and 16 decode steps through the KV cache, 32 greedy ids, the
tokenizer and chat template carried over, the refusals, dReLU sparse decode, TEAL end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import edge_runtime
from edge_runtime.cli import main
from edge_runtime.errors import UnsupportedModelError
from edge_runtime.model.sampling import SamplingParams
from edge_runtime.pack.convert import convert
from edge_runtime.pack.hf_config import model_config_from_hf
from edge_runtime.sparsity.predictor import Rule
from tests.families import CHAT_TEMPLATE, FAMILIES, TEAL_FAMILIES, WINDOW, make_family
from tests.helpers import CORPUS, hf_logits, rel_err

PROMPT, DECODED, GREEDY = 32, 16, 32


def _ids(n: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(3, 300, size=n).tolist()


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """family -> (packed fp32 directory, transformers model)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for fam in FAMILIES:
        model = make_family(root / fam / "hf", fam)
        convert(root / fam / "hf", root / fam / "p", "fp32", progress=False)
        out[fam] = (root / fam / "p", model)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_through_the_kv_cache(packed, family):
    path, model = packed[family]
    rt = edge_runtime.load(path, profile=None, backend="cpu")
    ids = _ids(PROMPT + DECODED)
    ref = hf_logits(model, ids)
    rt.decoder.reset()
    ours = np.concatenate([rt.decoder.forward(ids[:PROMPT])] + [rt.decoder.forward([t]) for t in ids[PROMPT:]])
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= 1e-4, rel_err(ours, ref)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "qwen2"])
def test_long_prompts_attend_a_block_of_rows_at_a_time(packed, family):
    """Prompts past PREFILL_QUERY_ROWS score their attention in blocks of query rows (the whole prompt at once
    took heads x T x T fp32: 861 MB at 1,983 tokens on a 120M model), here across three blocks, after an
    earlier prompt (positions not starting at 0), with a sliding window and soft-capping."""
    from edge_runtime.backends.base import PREFILL_QUERY_ROWS

    path, model = packed[family]
    rt = edge_runtime.load(path, profile=None, backend="cpu", max_context=512)
    first = 40
    ids = _ids(first + 2 * PREFILL_QUERY_ROWS + 37, seed=5)
    ref = hf_logits(model, ids)
    rt.decoder.reset()
    ours = np.concatenate([rt.decoder.forward(ids[:first]), rt.decoder.forward(ids[first:])])
    assert rel_err(ours, ref) <= 1e-4, rel_err(ours, ref)


@pytest.mark.parametrize("family", ["gemma", "gemma2"])
def test_gemma_fp16_keeps_its_folded_norms_exact(family, tmp_path):
    """Gemma's norms multiply by (1 + w), folded at conversion; transformers adds the 1 in fp32. Stored as fp16,
    1 + w kept ~3 digits of w: 1.7e-3 of the logits. The reference: transformers with every matrix rounded to
    fp16 as the packed file holds them, the norms as they are."""
    import torch

    model = make_family(tmp_path / "hf", family, seed=5)
    convert(tmp_path / "hf", tmp_path / "p", "fp16", progress=False)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if "norm" not in name:
                t.copy_(t.half().float())
    rt = edge_runtime.load(tmp_path / "p", profile=None, backend="cpu")
    seed = int(np.random.SeedSequence().entropy % 2**16)
    ids = _ids(PROMPT, seed=seed)
    rt.decoder.reset()
    assert rel_err(rt.decoder.forward(ids), hf_logits(model, ids)) <= 1e-4, f"seed {seed}"
    rt.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_ids_match_transformers(packed, family):
    import torch

    path, model = packed[family]
    rt = edge_runtime.load(path, profile=None, backend="cpu")
    prompt = _ids(12, seed=5)
    ours = [rt.decoder.start(prompt, SamplingParams(temperature=0.0))]
    ours += [rt.decoder.decode_step() for _ in range(GREEDY - 1)]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(GREEDY):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert ours == seq[len(prompt):]


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_and_chat_template_carried_over(packed, family):
    path, _ = packed[family]
    rt = edge_runtime.load(path, profile=None, backend="cpu")
    assert (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()
    assert rt.model.manifest["chat_template"] == CHAT_TEMPLATE
    ids, _ = rt.prepare_prompt([{"role": "user", "content": "open the door"}])  # the model's own template
    assert ids == rt.encode("<|user|>open the door\n<|assistant|>", add_special_tokens=False)


def test_family_configs_carry_their_particulars(packed):
    cfg = {f: edge_runtime.load(packed[f][0], profile=None, backend="cpu").config for f in FAMILIES}
    assert cfg["qwen2"].qkv_bias and not cfg["qwen2"].attn_bias
    assert cfg["mistral"].sliding_window == WINDOW and cfg["mistral"].sliding_layers == (0, 1)
    g2 = cfg["gemma2"]
    assert g2.post_norms and g2.attn_softcap == 1.5 and g2.logit_softcap == 4.0 and g2.sliding_layers == (0,)
    assert g2.attn_scale == pytest.approx(24 ** -0.5) and g2.embed_scale == pytest.approx(8.0)
    assert cfg["gemma"].activation == "gelu_tanh" and cfg["drelu"].activation == "drelu"


def test_the_sliding_window_matters(packed):
    """Mistral's 8-position window over a 48-token sequence: attending to everything is far off."""
    import torch

    path, model = packed["mistral"]
    rt = edge_runtime.load(path, profile=None, backend="cpu")
    ids = _ids(PROMPT + DECODED)
    ours = rt.decoder.forward(ids)
    model.config.sliding_window = None
    try:
        with torch.no_grad():
            full = model(torch.tensor([ids])).logits[0].double().numpy()
    finally:
        model.config.sliding_window = WINDOW
    assert rel_err(ours, full) > 1e-2


BASE = {"model_type": "phi3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 160, "vocab_size": 300}


@pytest.mark.parametrize("extra, named", [
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}}, "longrope"),
    ({"rope_scaling": {"type": "su", "short_factor": [1.0], "long_factor": [1.0]}}, "'su'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"model_type": "falcon"}, "falcon"),
    ({"model_type": "gemma2", "hidden_activation": "gelu"}, "gelu"),
    ({"model_type": "mistral", "hidden_act": "gelu"}, "gelu"),
])
def test_refusals_name_the_feature_and_what_is_supported(extra, named):
    with pytest.raises(UnsupportedModelError, match=named) as e:
        model_config_from_hf({**BASE, **extra})
    assert "supported: llama" in str(e.value) and "gemma2" in str(e.value) and "\n" not in str(e.value)


def test_keys_left_out_of_config_json_get_transformers_class_defaults():
    """A stripped or hand-written config.json: Gemma-2 without soft-caps ran uncapped (transformers: 50 and 30),
    Phi-3 without rms_norm_eps used 1e-6 (transformers: 1e-5), Mistral and Gemma-2 without sliding_window ran
    without a window (transformers: 4096). Null still turns a cap or a window off."""
    import transformers as tf

    gqa = {**BASE, "num_key_value_heads": 4}  # Mistral's and Gemma-2's KV-head defaults do not divide BASE's 4
    gemma2 = model_config_from_hf({**gqa, "model_type": "gemma2", "hidden_activation": "gelu_pytorch_tanh"})
    ref = tf.Gemma2Config()
    assert (gemma2.attn_softcap, gemma2.logit_softcap) == (ref.attn_logit_softcapping, ref.final_logit_softcapping)
    assert gemma2.sliding_window == ref.sliding_window
    assert model_config_from_hf({**BASE}).norm_eps == tf.Phi3Config().rms_norm_eps
    assert model_config_from_hf({**gqa, "model_type": "mistral"}).sliding_window == tf.MistralConfig().sliding_window
    assert not model_config_from_hf({**gqa, "model_type": "mistral", "sliding_window": None}).sliding_window
    uncapped = model_config_from_hf({**gqa, "model_type": "gemma2", "hidden_activation": "gelu_pytorch_tanh",
                                     "attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert (uncapped.attn_softcap, uncapped.logit_softcap) == (0.0, 0.0)


def test_family_defaults_are_transformers_own():
    """Every default the conversion takes for a key config.json leaves out is the config class's."""
    import transformers as tf

    from edge_runtime.pack.hf_families import FAMILY_DEFAULTS

    classes = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "phi3": tf.Phi3Config, "gemma": tf.GemmaConfig, "gemma2": tf.Gemma2Config}
    assert set(classes) == set(FAMILY_DEFAULTS)
    for family, defaults in FAMILY_DEFAULTS.items():
        reference = classes[family](use_sliding_window=True) if family == "qwen2" else classes[family]()
        for key, value in defaults.items():
            assert getattr(reference, key) == value, (family, key)
    gemma = model_config_from_hf({**BASE, "model_type": "gemma", "hidden_activation": "gelu_pytorch_tanh",
                                  "num_attention_heads": 16})
    assert (gemma.head_dim, gemma.n_kv_heads, gemma.max_positions) == (256, 16, 8192)


@pytest.mark.parametrize("value", ["false", 0, "no"])
def test_a_flag_that_is_not_a_boolean_is_refused(value):
    """bool("false") is True: a string tie_word_embeddings was read as tied."""
    from edge_runtime.errors import ModelFormatError

    with pytest.raises(ModelFormatError, match=f"tie_word_embeddings must be true or false, not {value!r}"):
        model_config_from_hf({**BASE, "model_type": "llama", "tie_word_embeddings": value})


def test_pre_quantised_checkpoints_are_refused(tmp_path):
    """A bitsandbytes or compressed-tensors int8 checkpoint converted without error, its int8 values read as the
    weights (argmax agreement 0 %); a 4-bit one failed on a shape that did not say why."""
    from safetensors.numpy import load_file, save_file

    from edge_runtime.errors import ModelFormatError

    quantised = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    with pytest.raises(UnsupportedModelError, match="pre-quantised checkpoint .* 'bitsandbytes'"):
        model_config_from_hf({**BASE, "model_type": "llama", "quantization_config": quantised})
    hf = tmp_path / "hf"
    make_family(hf, "qwen2")
    weights = load_file(hf / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    weights[name] = np.clip(np.round(weights[name] * 400), -127, 127).astype(np.int8)  # no quantization_config
    save_file(weights, hf / "model.safetensors")
    with pytest.raises(ModelFormatError, match=f"tensor {name} .* stored as I8, not as floats: a pre-quantised"):
        convert(hf, tmp_path / "p", "fp32", progress=False)
    assert not (tmp_path / "p").exists()


def test_end_of_turn_ids_in_generation_config_json_stop_generation(tmp_path):
    """Phi-3-instruct lists <|end|> in generation_config.json only: converted from config.json alone, a reply
    ran on past its turn into made-up ones (turn markers are special tokens, so nothing showed)."""
    from edge_runtime.errors import ModelFormatError

    hf = tmp_path / "hf"
    make_family(hf, "qwen2")
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 13], "do_sample": True}))
    convert(hf, tmp_path / "p", "fp32", progress=False)
    rt = edge_runtime.load(tmp_path / "p", profile=None, backend="cpu")
    assert rt.config.eos_token_ids == (2, 13)
    (hf / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ModelFormatError, match="generation_config.json is not a valid JSON object"):
        convert(hf, tmp_path / "q", "fp32", progress=False)


def test_sharded_pytorch_bin_checkpoint(tmp_path):
    """pytorch_model-0000N-of-0000M.bin with its index (older checkpoints such as vicuna-7b-v1.5): it said the
    directory had no pytorch_model.bin. Converted, it gives transformers' logits."""
    import torch

    hf = tmp_path / "hf"
    model = make_family(hf, "mistral")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    (hf / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for shard, keys in shards.items():
        torch.save({k: state[k].to(torch.bfloat16) if k.endswith("proj.weight") else state[k] for k in keys},
                   hf / shard)
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (hf / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with torch.no_grad():
        for k, v in model.state_dict().items():  # the reference holds what the shards hold
            if k.endswith("proj.weight"):
                v.copy_(v.to(torch.bfloat16).float())
    convert(hf, tmp_path / "p", "fp32", progress=False)
    rt = edge_runtime.load(tmp_path / "p", profile=None, backend="cpu")
    ids = _ids(PROMPT)
    assert rel_err(rt.decoder.forward(ids), hf_logits(model, ids)) <= 1e-4


def test_old_manifests_load_with_defaults():
    from edge_runtime.config import ModelConfig

    old = {"arch": "llama", "vocab_size": 10, "dim": 8, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1,
           "head_dim": 4, "ffn_dim": 16, "activation": "relu", "max_positions": 32}
    cfg = ModelConfig.from_dict(old)
    assert cfg.window(0) == 0 and cfg.embed_scale == 1.0 and not cfg.post_norms and cfg.extra_features() == []
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def _decode(rt, ids, setting):
    rt.decoder.set_sparsity(setting)
    rt.decoder.reset()
    return np.concatenate([rt.decoder.forward([t]) for t in ids])


def test_drelu_every_row_predicted_equals_dense_exactly(packed):
    rt = edge_runtime.load(packed["drelu"][0], profile=None, backend="cpu", threads=1)
    ids = _ids(20, seed=7)
    dense = _decode(rt, ids, None)
    every = _decode(rt, ids, [Rule("sparseinfer", alpha=1e9)] * rt.config.n_layers)
    assert np.array_equal(every, dense)
    s = rt.decoder.stats
    n = rt.config.ffn_dim * len(ids)
    assert (s.predicted == n).all() and (s.up_dropped > 0).all()
    assert (s.kept + s.up_dropped < n).all()  # some gates died, and some ups: both kinds of drop counted


def test_drelu_sparse_decode_counts_and_reads_only_survivors(packed):
    rt = edge_runtime.load(packed["drelu"][0], profile=None, backend="cpu")
    ids = _ids(20, seed=8)
    rules = [Rule("sparseinfer", alpha=1.0)] * rt.config.n_layers
    steps = _decode(rt, ids, rules)
    s = rt.decoder.stats
    for i, layer in enumerate(rt.backend.weights.layers):
        want = layer.ffn_read_bytes(s.steps[i], s.predicted[i], s.kept[i], 0, s.up_dropped[i])
        assert abs(int(s.bytes_read[i]) - want) <= s.steps[i]  # per-step rounding to whole bytes
    summary = s.summary()
    assert summary["up_dropped_density"] > 0 and summary["ffn_bytes_fraction"] < 1
    rt.decoder.reset()
    batched = rt.decoder.forward(ids, batched_sparse=True)  # evaluation's masked pass: the same function
    assert rel_err(batched, steps) <= 1e-4


@pytest.mark.parametrize("family", TEAL_FAMILIES)
def test_teal_at_25_percent_end_to_end(packed, family, tmp_path, capsys):
    import shutil

    path = tmp_path / "p"
    shutil.copytree(packed[family][0], path)
    text = tmp_path / "calib.txt"
    text.write_text(CORPUS)
    assert main(["calibrate", "--model", str(path), "--text", str(text), "--teal-targets", "0.25",
                 "--max-tokens", "256", "--window", "64", "--json"]) == 0
    kept = json.loads(capsys.readouterr().out)["teal"]  # the summary names what the TEAL calibration kept
    assert set(kept) == {"0.25"} and kept["0.25"]["criterion"] in ("teal", "wina")
    assert np.isfinite(kept["0.25"]["ppl"]) and kept["0.25"]["ppl_increase_pct"] > -50
    assert main(["eval", "--model", str(path), "--text", str(text), "--sparsity", "teal", "--teal-target", "0.25",
                 "--max-tokens", "128", "--window", "64", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.isfinite(res["ppl_teal"]) and np.isfinite(res["ppl_dense"])


def test_onnx_export_refuses_what_it_does_not_build_by_name(packed, tmp_path):
    pytest.importorskip("onnx")
    from edge_runtime.errors import EdgeRuntimeError
    from edge_runtime.export.onnx_export import export_onnx
    from edge_runtime.export.onnx_graph import ExportOptions

    model = edge_runtime.load(packed["gemma2"][0], profile=None, backend="cpu").model
    with pytest.raises(EdgeRuntimeError, match="embed_scale, post_norms, .*attn_softcap, logit_softcap, sliding"):
        export_onnx(model, tmp_path / "m.onnx", ExportOptions())
    assert not (tmp_path / "m.onnx").exists()

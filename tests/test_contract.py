"""The backend contract and the decoder split: decode does no per-token host work beyond the sampled id,
prefill + decode steps equal one batched pass, and every op keeps activations float32."""

from __future__ import annotations

import numpy as np
import pytest

import edge_runtime
from edge_runtime.backends.base import Backend
from edge_runtime.backends.cpu import CpuBackend
from edge_runtime.pack.convert import convert
from tests.helpers import make_llama


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("contract")
    make_llama(root / "hf", act="relu", seed=21)
    convert(root / "hf", root / "m", "int8", progress=False)
    return root / "m"


def test_cpu_backend_implements_every_op_of_the_contract():
    ops = [n for n, v in vars(Backend).items() if callable(v) and not n.startswith("_")]
    assert len(ops) > 15
    missing = [n for n in ops if not callable(getattr(CpuBackend, n, None))]
    assert not missing


def test_generation_reads_no_statistics_per_token(packed):
    rt = edge_runtime.load(packed, profile=None, backend="cpu")
    rt.set_sparsity(1.0)
    before = rt.backend.stats_reads
    res = rt.generate([1, 20, 30, 40], max_new_tokens=64, stop=())
    assert len(res.token_ids) >= 2
    assert rt.backend.stats_reads == before  # nobody asked: the counters stayed in the state
    s = rt.ffn_stats()
    assert rt.backend.stats_reads == before + 1
    assert s["decode_steps"] == len(res.token_ids) - 1  # yet every step was counted


def test_decode_steps_advance_the_state_and_equal_the_batched_pass(packed):
    rt = edge_runtime.load(packed, profile=None, backend="cpu")
    dec, st = rt.decoder, rt.backend.state
    ids = [1, 17, 42, 99, 7, 250, 3, 64]
    dec.reset()
    batched = dec.prefill(ids)
    dec.reset()
    steps = [dec.prefill(ids[:3])]
    for t in ids[3:]:
        pos = int(st.pos[0])
        dec.set_sparsity(None)
        rt.backend.set_token(t)
        dec.decode_step()
        assert int(st.pos[0]) == pos + 1  # the step moved the position itself
        steps.append(rt.backend.read_logits())
    steps = np.concatenate([steps[0]] + steps[1:])
    assert np.abs(steps - batched).max() <= 1e-4 * np.abs(batched).max()
    assert int(st.token[0]) == int(np.argmax(steps[-1]))  # greedy: the step sampled its own next id


def test_every_activation_is_float32(packed):
    rt = edge_runtime.load(packed, profile=None, backend="cpu")
    seen = []
    rt.decoder.observer = lambda i, point, a: seen.append((point, a.dtype))
    logits = rt.decoder.prefill([1, 5, 9, 13])
    rt.decoder.observer = None
    assert seen and all(dt == np.float32 for _, dt in seen), [s for s in seen if s[1] != np.float32]
    assert logits.dtype == np.float32
    rt.set_sparsity(1.0)
    rt.generate([1, 5, 9], max_new_tokens=4)
    b = rt.backend.buffers
    assert all(getattr(b, n).dtype == np.float32 for n in ("x", "h", "q", "k", "v", "a", "logits"))

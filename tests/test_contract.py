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


OPS = ("embed_tokens", "norm", "linear", "rope", "attention", "attention_inputs", "logits", "ffn_parts", "ffn_down",
       "ffn_masked", "ffn_step")


class DtypeCheckingCpu(CpuBackend):
    """The cpu backend with every activation op's output (returned, or written to out= / add_to=) recorded,
    so a test can assert they are all float32 (test-only subclass; the ops themselves are unchanged)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outputs: list[tuple[str, np.dtype]] = []

    def _record(self, name: str, result, kwargs: dict, args: tuple) -> None:
        arrays = list(result) if isinstance(result, tuple) else [result]
        arrays += [kwargs.get("out"), kwargs.get("add_to")]
        if name == "ffn_step":
            arrays.append(args[3])  # add_to
        self.outputs += [(name, a.dtype) for a in arrays if isinstance(a, np.ndarray)]


def _checked(name: str):
    def op(self, *args, **kwargs):
        result = getattr(CpuBackend, name)(self, *args, **kwargs)
        self._record(name, result, kwargs, args)
        return result

    return op


for _name in OPS:
    setattr(DtypeCheckingCpu, _name, _checked(_name))


def test_every_activation_is_float32(packed):
    from edge_runtime.model.decoder import Decoder
    from edge_runtime.model.sampling import SamplingParams
    from edge_runtime.pack.loader import load_packed
    from edge_runtime.sparsity.predictor import Rule

    ops = DtypeCheckingCpu(load_packed(packed), 64)
    dec = Decoder(ops)
    seen = []
    dec.observer = lambda i, point, a: seen.append((point, a.dtype))
    logits = dec.prefill([1, 5, 9, 13])
    dec.observer = None
    assert seen and all(dt == np.float32 for _, dt in seen), [s for s in seen if s[1] != np.float32]
    assert logits.dtype == np.float32
    theta = np.random.default_rng(0).standard_normal(ops.config.ffn_dim).astype(np.float32)
    settings = [None, 1.0, [Rule("projection", theta=theta)] * ops.config.n_layers]
    teal = [{p: 0.05 for p in ("q", "k", "v", "o", "gate", "up", "down")}] * ops.config.n_layers
    for setting in settings:
        dec.set_sparsity(setting)
        dec.start([1, 5, 9], SamplingParams())
        for _ in range(3):
            dec.decode_step()
        dec.reset()
        assert dec.prefill([1, 5, 9, 13], masked=True).dtype == np.float32
    dec.set_sparsity(None)
    dec.teal = teal
    dec.start([1, 5, 9], SamplingParams())
    dec.decode_step()
    assert dec.prefill([3, 4], masked=True).dtype == np.float32
    names = {n for n, _ in ops.outputs}
    assert names == set(OPS)  # every op ran, in prefill or decode
    bad = [(n, dt) for n, dt in ops.outputs if dt != np.float32]
    assert not bad, bad
    b = ops.buffers
    assert all(getattr(b, n).dtype == np.float32 for n in ("x", "h", "q", "k", "v", "a", "logits"))


def test_decode_steps_allocate_no_arrays():
    """After warm-up, decode steps (dense or sparse) allocate no vocabulary-sized array and no weights: peak
    traced memory over 16 steps of the default model stays under 8 KB (logits are 16 KB; what remains is
    Python's own per-call objects, about 5 KB, and the generated ids)."""
    import tracemalloc

    from edge_runtime.model.sampling import SamplingParams

    rt = edge_runtime.load(None, profile=None, backend="cpu")
    for setting in (None, 1.0):
        rt.set_sparsity(setting)
        dec = rt.decoder
        dec.start([1, 20, 30], SamplingParams())
        for _ in range(4):
            dec.decode_step()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(16):
            dec.decode_step()
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        assert peak < 8192, (setting, peak)

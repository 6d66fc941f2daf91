"""Golden output on a real trained model: stories260K, greedy, against transformers token for token."""

from __future__ import annotations

import pytest

from edge_runtime.pack.convert import convert
from edge_runtime.runtime import load
from tests.helpers import STORIES

pytestmark = pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/models/stories260K-hf is absent")


@pytest.fixture(scope="module")
def hf_greedy():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(STORIES)
    ids = tok("Once upon a time").input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False, min_new_tokens=64)
    return ids, out[0, len(ids):].tolist()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_greedy_64_tokens_equal_transformers(tmp_path, hf_greedy, dtype):
    prompt_ids, expected = hf_greedy
    convert(STORIES, tmp_path / "m", dtype, progress=False)
    rt = load(tmp_path / "m", backend="cpu")
    assert rt.encode("Once upon a time") == prompt_ids
    res = rt.generate("Once upon a time", max_new_tokens=64)
    assert res.token_ids == expected
    assert res.text.startswith(", there was a little girl named Lily.")

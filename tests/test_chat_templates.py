"""Model chat templates rendered in the sandbox against transformers' apply_chat_template, for what real
templates use beyond plain Jinja: loop controls, raise_exception (Gemma's refusal of a system message),
tojson on non-ASCII text, strftime_now (Llama-3.1's date line)."""

from __future__ import annotations

import datetime

import pytest

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.model.chat import render_template
from tests.helpers import make_tokenizer

pytest.importorskip("jinja2")

TEMPLATES = {
    "break": "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
             "<|{{ m['role'] }}|>{{ m['content'] }}\n{% if loop.index > 3 %}{% break %}{% endif %}{% endfor %}"
             "<|assistant|>",
    "tojson": "{% for m in messages %}{{ m | tojson }}\n{% endfor %}",
    "strftime": "Today: {{ strftime_now('%d %b %Y') }}\n{% for m in messages %}{{ m['content'] }}{% endfor %}",
}
MESSAGES = [{"role": "system", "content": "Réponds brièvement."}, {"role": "user", "content": "Où est la porte? 🚪"},
            {"role": "assistant", "content": "À gauche."}, {"role": "user", "content": "好的"},
            {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and then?"}]
GEMMA_LIKE = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
              "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}")


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    pytest.importorskip("transformers")
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tok")
    make_tokenizer(out)
    return PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))


@pytest.mark.parametrize("name", TEMPLATES)
def test_templates_render_as_transformers_renders_them(hf_tokenizer, name):
    """{% break %} was a syntax error, tojson escaped non-ASCII, strftime_now was undefined."""
    ours = render_template(TEMPLATES[name], MESSAGES)
    theirs = hf_tokenizer.apply_chat_template(MESSAGES, chat_template=TEMPLATES[name], tokenize=False,
                                              add_generation_prompt=True)
    if name == "strftime" and ours != theirs:  # the date may turn between the two renders
        today = datetime.date.today().strftime("%d %b %Y")
        assert ours.startswith(f"Today: {today}") or theirs.startswith(f"Today: {today}")
        return
    assert ours == theirs


def test_a_template_that_refuses_the_messages_says_why():
    """Gemma's template refuses a system message with raise_exception: the client read "'raise_exception' is
    undefined" instead of the template's reason."""
    with pytest.raises(EdgeRuntimeError, match="refused these messages: System role not supported"):
        render_template(GEMMA_LIKE, MESSAGES)
    assert render_template(GEMMA_LIKE, MESSAGES[1:2]) == "<start_of_turn>user\nOù est la porte? 🚪<end_of_turn>\n"

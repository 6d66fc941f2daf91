"""A rendered chat prompt -> token ids, with special-token text typed inside a message kept as text.

A tokenizer reads "</s>" or "<|im_end|>" anywhere in its input as the control token. In a rendered chat those
strings come from the template (the turn boundaries the model was trained on) and may also come from a
message: a user who types them can end their own turn and write the assistant's. So when a message holds
such text, the rendered prompt is cut at the template's own special tokens only, the way the tokenizer itself
cuts a text at every special token, and each piece between them that holds typed special text is encoded by
a copy of the tokenizer that reads special tokens as text. Pieces without any are encoded as before: a chat
whose messages hold no special text gets exactly the tokenizer's ids.

Which characters of the rendered text are a message's: the template is rendered once more with each content
replaced by a marker (private-use characters no template or tokenizer gives meaning to); the marked text is the
template's own text with markers between, which must match the real text with each content (or the content
trimmed, as templates trim) in place of its marker. A template that moves a content in another way is refused
for a message holding special text, rather than guessed at.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.model.tokenizer import Tokenizer, check_utf8

_MARKER = "\ue000{}\ue001"
_MARKER_RE = re.compile("\ue000(\\d+)\ue001")

Render = Callable[[list[dict[str, str]]], str]  # messages -> the template's text


def encode_chat(tok: Tokenizer, text: str, messages: Sequence[dict[str, str]], render: Render,
                add_special_tokens: bool) -> list[int]:
    check_utf8(text)
    suspect = [i for i, m in enumerate(messages) if tok.may_form_special(m["content"])]
    if not suspect:
        return tok.encode(text, add_special_tokens)
    spans = content_spans(text, messages, render)
    if spans is None:
        raise EdgeRuntimeError(f"message {suspect[0]} contains special-token text (or part of one), which this "
                               f"model's chat template would read as a control token; remove it")
    ids: list[int] = []
    at, after_rstrip = 0, False
    for own in [*_template_specials(tok, text, spans), None]:
        a, b = own.span() if own else (len(text), len(text))
        lstrip, rstrip = tok.strips.get(own.group(), (False, False)) if own else (False, False)
        piece = text[at:a]
        piece = piece.lstrip() if after_rstrip else piece  # whitespace an AddedToken takes beside it
        piece = piece.rstrip() if lstrip else piece
        encoder = tok.as_text if tok.special_re.search(piece) else tok.raw  # a piece without any: the same ids
        ids += encoder.encode(piece, add_special_tokens=False).ids
        ids += tok.raw.encode(text[a:b], add_special_tokens=False).ids  # the template's control token
        at, after_rstrip = b, rstrip
    if add_special_tokens:
        ids = tok.without_doubled_prefix(tok.added_prefix + ids + tok.added_suffix, True)
    return ids


def _template_specials(tok: Tokenizer, text: str, spans: list[tuple[int, int]]) -> list[re.Match]:
    """The special-token matches in text that touch no content: the template's own. One pass over both sorted
    lists (a match per typed special and a span per message: quadratic would let one request stall)."""
    own, j = [], 0
    for m in tok.special_re.finditer(text):
        while j < len(spans) and spans[j][1] <= m.start():
            j += 1
        if j == len(spans) or spans[j][0] >= m.end():
            own.append(m)
    return own


def content_spans(text: str, messages: Sequence[dict[str, str]], render: Render) -> list[tuple[int, int]] | None:
    """[start, end) of every place a message's content sits in text, in order; None where the template did
    something else with a content than write it whole or trimmed. An empty content gets no marker: templates
    skip empty messages ({% if message['content'] %})."""
    marked = render([{**m, "content": _MARKER.format(i) if m["content"] else ""} for i, m in enumerate(messages)])
    parts = _MARKER_RE.split(marked)  # the template's text, a message index, the template's text, ...
    spans: list[tuple[int, int]] = []
    pos = 0
    for k, part in enumerate(parts):
        if k % 2 == 0:
            if not text.startswith(part, pos):
                return None
            pos += len(part)
            continue
        content, after = messages[int(part)]["content"], parts[k + 1]
        form = next((f for f in (content, content.strip(), content.rstrip(), content.lstrip())
                     if text.startswith(f, pos) and text.startswith(after, pos + len(f))), None)
        if form is None:
            return None
        spans.append((pos, pos + len(form)))
        pos += len(form)
    return spans if pos == len(text) else None

"""Text <-> ids through a Hugging Face tokenizer.json, with incremental detokenisation for streaming."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from edge_runtime.errors import EdgeRuntimeError, ModelFormatError


class Tokenizer:
    def __init__(self, path: Path):
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a bad file
            raise ModelFormatError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None
        added = self._tok.get_added_tokens_decoder().values()
        self._special_texts = frozenset(t.content for t in added if t.special and t.content)
        # longest first, so that of two special tokens where one begins the other, the longer one is matched
        alternatives = sorted(self._special_texts, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        self._as_text: HFTokenizer | None = None  # a copy that reads special-token text as text (made on use)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer's own post-processor decides about BOS, as in transformers; a text that already begins
        with the BOS it adds ("<s>[INST] ...", pasted) gets one, not two. Text that cannot be UTF-8 (a lone
        surrogate: how Python carries undecodable bytes of argv or stdin) is refused here, where the tokenizer
        would raise a bare TypeError."""
        _check_utf8(text)
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and len(ids) >= 2 and ids[0] == ids[1] and self._is_special(ids[0]):
            del ids[0]
        return ids

    def encode_chat(self, text: str, contents: Sequence[str], add_special_tokens: bool) -> list[int]:
        """A rendered chat prompt: the template's special tokens stay control tokens, while special-token text
        typed inside a message ("</s>", "<|end|>") is encoded as the text it is. Otherwise a user could end
        their own turn and write the assistant's. Contents are found in the text in order, trimmed as
        templates trim them; one that holds such text but cannot be found is refused."""
        spans = self._typed_specials(text, contents)
        if not spans:
            return self.encode(text, add_special_tokens)
        if self._as_text is None:  # a second tokenizer, so that no other thread sees the switch
            self._as_text = HFTokenizer.from_str(self._tok.to_str())
            self._as_text.encode_special_tokens = True
        ids: list[int] = []
        at = 0
        for a, b in spans:
            ids += self._tok.encode(text[at:a], add_special_tokens=add_special_tokens and at == 0).ids
            ids += self._as_text.encode(text[a:b], add_special_tokens=False).ids
            at = b
        return ids + self._tok.encode(text[at:], add_special_tokens=False).ids

    def _typed_specials(self, text: str, contents: Sequence[str]) -> list[tuple[int, int]]:
        """[start, end) in text of each special token's text that lies inside a message's content."""
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i, content in enumerate(contents):
            core = content.strip()
            hits = list(self._special_re.finditer(core)) if self._special_re else []
            if not hits:
                continue
            where = text.find(core, cursor)
            if where < 0:
                raise EdgeRuntimeError(f"message {i} contains the special token {hits[0].group()!r}, which this "
                                       f"model's chat template would read as a control token; remove it")
            spans += [(where + m.start(), where + m.end()) for m in hits]
            cursor = where + len(core)
        return spans

    def _is_special(self, token_id: int) -> bool:
        return self._tok.id_to_token(token_id) in self._special_texts

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


def _check_utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise EdgeRuntimeError("the text is not valid UTF-8 (an undecodable byte, or a lone surrogate)") from None


class IncrementalDecoder:
    """Emits text as ids arrive, never a partial UTF-8 character; decodes a short window per token
    (from `prefix` to the end), so the cost does not grow with the length of the output.

    `context`: the last few prompt ids, decoded in front of the first generated ones and never emitted. A
    SentencePiece decoder strips the leading space of whatever it decodes first: without the prompt in front,
    "Once upon a" + "▁time" came out as "Once upon atime"."""

    CONTEXT = 5  # prompt ids enough for any tokenizer to place the first generated token's spaces

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()):
        self.tok = tokenizer
        self.ids: list[int] = list(context[-self.CONTEXT:])
        self.prefix = 0  # window start: context so that the tokenizer places spaces right
        self.read = len(self.ids)  # ids up to here have been emitted (or are the prompt's)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self.tok.decode(self.ids[self.prefix:self.read])
        full = self.tok.decode(self.ids[self.prefix:])
        if full.endswith("\ufffd") or len(full) <= len(done):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return full[len(done):]

    def flush(self) -> str:
        """At the end: what push still holds back, a character whose last bytes never came, as decode(ids)
        shows it (U+FFFD)."""
        done = self.tok.decode(self.ids[self.prefix:self.read])
        full = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return full[len(done):] if len(full) > len(done) else ""

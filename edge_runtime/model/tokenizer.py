"""Text <-> ids through a Hugging Face tokenizer.json, with incremental detokenisation for streaming."""

from __future__ import annotations

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

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer's own post-processor decides about BOS, as in transformers. Text that cannot be
        UTF-8 (a lone surrogate: how Python carries undecodable bytes of argv or stdin) is refused here,
        where the tokenizer would raise a bare TypeError."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise EdgeRuntimeError("the text is not valid UTF-8 (an undecodable byte, or a lone surrogate)") from None
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)


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

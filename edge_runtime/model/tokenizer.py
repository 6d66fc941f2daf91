"""Text <-> ids through a Hugging Face tokenizer.json, with incremental detokenisation for streaming."""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from edge_runtime.errors import EdgeRuntimeError, ModelFormatError


class Tokenizer:
    def __init__(self, path: Path):
        try:
            self.raw = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a bad file
            raise ModelFormatError(f"cannot read tokenizer {path}: {str(e).splitlines()[0]}") from None
        added = self.raw.get_added_tokens_decoder().values()
        # the special tokens' texts, and which of them take the whitespace beside them (AddedToken lstrip, rstrip)
        self.strips = {t.content: (t.lstrip, t.rstrip) for t in added if t.special and t.content}
        self._special_texts = frozenset(self.strips)
        # longest first, so that of two special tokens where one begins the other, the longer one is matched
        alternatives = sorted(self._special_texts, key=len, reverse=True)
        self.special_re = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        # the ends of special tokens, to see text that joins with its neighbour into one ("...</" + "s>...")
        self._special_heads = {t[:k] for t in self._special_texts for k in range(1, len(t))}
        self._special_tails = {t[k:] for t in self._special_texts for k in range(1, len(t))}
        self._longest_special = max(map(len, self._special_texts), default=0)
        # what the post-processor adds around a text (Llama: [BOS] before, nothing after)
        bare, full = self.raw.encode("a", add_special_tokens=False).ids, self.raw.encode("a").ids
        at = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), 0)
        self.added_prefix, self.added_suffix = full[:at], full[at + len(bare):]
        self._as_text: HFTokenizer | None = None
        self._as_text_lock = threading.Lock()

    @property
    def vocab_size(self) -> int:
        return self.raw.get_vocab_size()

    @property
    def as_text(self) -> HFTokenizer:
        """A copy that reads special-token text as text (a second tokenizer: no other thread sees the switch)."""
        with self._as_text_lock:
            if self._as_text is None:
                copy = HFTokenizer.from_str(self.raw.to_str())
                copy.encode_special_tokens = True
                self._as_text = copy
            return self._as_text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The tokenizer's own post-processor decides about BOS, as in transformers; a text that already begins
        with the BOS it adds ("<s>[INST] ...", pasted) gets one, not two. Text that cannot be UTF-8 (a lone
        surrogate: how Python carries undecodable bytes of argv or stdin) is refused here, where the tokenizer
        would raise a bare TypeError."""
        check_utf8(text)
        return self.without_doubled_prefix(self.raw.encode(text, add_special_tokens=add_special_tokens).ids,
                                           add_special_tokens)

    def may_form_special(self, text: str) -> bool:
        """Whether text holds a special token's text, or could make one with the text beside it: it ends with
        the start of one, begins with the end of one, or lies inside one."""
        if not self.special_re:
            return False
        for t in {text, text.strip()}:
            if self.special_re.search(t):
                return True
            n = min(len(t), self._longest_special - 1)
            if any(t[-k:] in self._special_heads or t[:k] in self._special_tails for k in range(1, n + 1)):
                return True
            if t and len(t) < self._longest_special and any(t in s for s in self._special_texts):
                return True
        return False

    def without_doubled_prefix(self, ids: list[int], add_special_tokens: bool) -> list[int]:
        n = len(self.added_prefix)
        if add_special_tokens and n and ids[:n] == ids[n:2 * n] == self.added_prefix:
            del ids[:n]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.raw.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str | None:
        return self.raw.id_to_token(token_id)


def check_utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise EdgeRuntimeError("the text is not valid UTF-8 (an undecodable byte, or a lone surrogate)") from None


_CONTINUATION_BYTE = re.compile(r"<0x[89AB][0-9A-F]>")  # a byte-fallback token inside a UTF-8 character


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
        # a window that starts inside a character made of byte tokens: a byte-fallback decoder renders the whole
        # run of bytes, generated ones included, as U+FFFD; start the window at a whole character instead
        while self.ids and _CONTINUATION_BYTE.fullmatch(tokenizer.token_text(self.ids[0]) or ""):
            del self.ids[0]
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

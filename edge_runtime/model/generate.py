"""The generation loop: prefill, then decode token by token until EOS, a stop string or the limit."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.model.decoder import Decoder
from edge_runtime.model.sampling import SamplingParams, is_int
from edge_runtime.model.tokenizer import IncrementalDecoder, Tokenizer


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise EdgeRuntimeError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        for s in self.stop:  # an empty stop string would match at once, ending every generation at one token
            if not isinstance(s, str) or not s:
                raise EdgeRuntimeError(f"stop strings must be non-empty strings, got {s!r}")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" | "stop" | "length" | "context" | "deadline" | "cancelled"
    prefill_s: float
    decode_s: float  # wall time of the decode steps after the first generated token

    @property
    def decode_tokens_per_s(self) -> float:
        steps = len(self.token_ids) - 1  # the first token comes from the prefill
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


@dataclass
class Piece:
    """One streamed step: the newest token id and the text released with it (may be empty)."""

    token_id: int
    text: str
    new_token: bool = True  # False for the final flush of held-back text (no new token)


def check_prompt(prompt_ids: Sequence[int], max_context: int) -> None:
    if not prompt_ids:
        raise EdgeRuntimeError("the prompt is empty after tokenisation")
    if len(prompt_ids) >= max_context:
        raise EdgeRuntimeError(f"prompt has {len(prompt_ids)} tokens; the context holds {max_context} "
                               f"(one more is needed to generate)")


def generate_stream(decoder: Decoder, tokenizer: Tokenizer | None, prompt_ids: Sequence[int],
                    config: GenerationConfig, should_stop: Callable[[], str | None] | None = None,
                    text_per_token: bool = True) -> Iterator[Piece | GenerationResult]:
    """Yields a Piece per generated token, then the GenerationResult. `should_stop` is asked before
    each decode step and returns a finish reason ("deadline", "cancelled") to end early.
    text_per_token=False (a caller that wants only the result): without stop strings, the text is decoded
    after the last step instead of between steps, and the Pieces carry none until a final one with all of
    it. The tokenizer's calls between steps cost the default model's decode about 5 % of its tokens/s (its
    tables pushed the step's weights out of cache); the text is the same, built by the same pushes."""
    cfg = decoder.cfg
    check_prompt(prompt_ids, decoder.max_context)
    detok = IncrementalDecoder(tokenizer, prompt_ids) if tokenizer else None
    incremental = detok is not None and (text_per_token or bool(config.stop))  # stops match the growing text
    out_ids: list[int] = []
    text = ""
    t0 = time.perf_counter()
    tok = decoder.start(prompt_ids, config.sampling)  # prefill, then the first token sampled
    prefill_s = time.perf_counter() - t0
    t_decode = time.perf_counter()
    reason = "length"
    # Text that could still turn out to be the start of a stop string is held back, never streamed.
    hold = max((len(s) for s in config.stop), default=1) - 1
    emitted = 0
    while True:
        if config.stop_at_eos and tok in cfg.eos_token_ids:
            reason = "eos"
            break
        out_ids.append(tok)
        piece = detok.push(tok) if incremental else ""
        text += piece
        hit = _find_stop(text, config.stop, len(text) - len(piece) - hold) if config.stop and piece else None
        if hit is not None:
            text, reason = text[:hit], "stop"
            break
        safe = max(emitted, len(text) - hold)
        yield Piece(tok, text[emitted:safe])
        emitted = safe
        if len(out_ids) >= config.max_new_tokens:
            break
        if decoder.pos >= decoder.max_context:
            reason = "context"
            break
        if should_stop is not None and (early := should_stop()):
            reason = early
            break
        tok = decoder.decode_step()  # the only value a step hands the host
    decode_s = time.perf_counter() - t_decode
    if detok is not None and not incremental:
        text = "".join(detok.push(t) for t in out_ids)
    if detok is not None and reason != "stop":
        text += detok.flush()
    if emitted < len(text):
        yield Piece(out_ids[-1], text[emitted:], new_token=False)
    yield GenerationResult(text, out_ids, len(prompt_ids), reason, prefill_s, decode_s)


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    hits = [i for s in stops if (i := text.find(s, max(start, 0))) >= 0]
    return min(hits) if hits else None


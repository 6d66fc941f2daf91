"""Request bodies of the OpenAI-compatible endpoints, and the OpenAI error body.

Validation happens here, at the edge: floats must be finite (JSON's NaN/Infinity and overflowing
literals such as 1e999 are refused), every string must be encodable as UTF-8 (a lone surrogate such
as "\\ud800" is refused with 422 instead of failing inside the tokenizer).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_validator


def _utf8(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text (a lone surrogate at position {e.start})") from None
    return s


def _one_or_list(v):
    """OpenAI's stop is a string or a list of them."""
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list):
        raise ValueError("must be a string or a list of strings")
    return v


Text = Annotated[str, AfterValidator(_utf8)]
StopStr = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_utf8)]
# One list type, not a union of str and list: a union's errors name its members in pydantic's own notation
# (validator reprs with memory addresses) where the client should read "stop.0".
Stops = Annotated[list[StopStr], BeforeValidator(_one_or_list, json_schema_input_type=StopStr | list[StopStr]),
                  Field(max_length=4)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


def _unsupported(neutral):
    """A field this server does not implement: null or a neutral value only (neutral(v) says which; clients send
    one by default). Any other value would be silently ignored, and the answer would not be the one asked for."""
    def check(v):
        if v is not None and not neutral(v):
            raise ValueError("is not supported by this server (leave it out, or send its neutral value)")
        return v
    return AfterValidator(check)


def _zero(v) -> bool:
    return v == 0


def _empty(v) -> bool:
    return not v


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False  # one more chunk before [DONE]: no choices, the request's token counts


class SamplingRequest(BaseModel):
    # Other OpenAI fields that change nothing in the answer (user, metadata, ...) are accepted and ignored, as
    # clients send them; those that would (penalties, logprobs, ...) are refused below unless neutral. Strict:
    # JSON types as OpenAI's schema gives them ("0.5" or true is no temperature; an integer is a number), as
    # the Python API refuses them.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, strict=True)

    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # extensions of vLLM and llama.cpp servers; top_k -1 or 0: off
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0)
    stop: Stops | None = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: Annotated[float | None, _unsupported(_zero)] = None
    frequency_penalty: Annotated[float | None, _unsupported(_zero)] = None
    logit_bias: Annotated[dict[str, float] | None, _unsupported(lambda d: all(b == 0 for b in d.values()))] = None
    logprobs: Annotated[bool | int | None, _unsupported(_zero)] = None  # chat: a bool; completions: a count
    top_logprobs: Annotated[int | None, _unsupported(_zero)] = None
    min_p: Annotated[float | None, _unsupported(_zero)] = None
    response_format: Annotated[dict | None, _unsupported(lambda f: f.get("type") == "text")] = None
    tools: Annotated[list | None, _unsupported(lambda t: not t)] = None
    # other servers' sampling extensions (vLLM, llama.cpp) that a client written for them may send
    typical_p: Annotated[float | None, _unsupported(lambda p: p == 1)] = None
    min_tokens: Annotated[int | None, _unsupported(_zero)] = None
    ignore_eos: Annotated[bool | None, _unsupported(_zero)] = None
    use_beam_search: Annotated[bool | None, _unsupported(_zero)] = None
    repeat_penalty: Annotated[float | None, _unsupported(lambda p: p == 1)] = None  # llama.cpp's repetition_penalty
    tfs_z: Annotated[float | None, _unsupported(lambda z: z == 1)] = None
    mirostat: Annotated[int | None, _unsupported(_zero)] = None
    dry_multiplier: Annotated[float | None, _unsupported(_zero)] = None
    xtc_probability: Annotated[float | None, _unsupported(_zero)] = None
    dynatemp_range: Annotated[float | None, _unsupported(_zero)] = None
    top_n_sigma: Annotated[float | None, _unsupported(lambda s: s <= 0)] = None  # llama.cpp: -1 is off
    stop_token_ids: Annotated[list | None, _unsupported(_empty)] = None
    bad_words: Annotated[list | None, _unsupported(_empty)] = None
    # constrained output (vLLM's guided decoding, llama.cpp's grammars): an answer in another shape entirely
    guided_json: Annotated[dict | str | None, _unsupported(_empty)] = None
    guided_regex: Annotated[str | None, _unsupported(_empty)] = None
    guided_choice: Annotated[list | None, _unsupported(_empty)] = None
    guided_grammar: Annotated[str | None, _unsupported(_empty)] = None
    grammar: Annotated[str | None, _unsupported(_empty)] = None
    json_schema: Annotated[dict | None, _unsupported(_empty)] = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:  # as OpenAI: said, not silently ignored
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        return list(self.stop or ())

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(SamplingRequest):
    prompt: Text  # "" starts from the tokenizer's BOS, as the API does (400 when it adds none)
    echo: Annotated[bool | None, _unsupported(_zero)] = None
    best_of: Annotated[int | None, _unsupported(lambda n: n == 1)] = None
    suffix: Annotated[str | None, _unsupported(lambda t: t == "")] = None


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}

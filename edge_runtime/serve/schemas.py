"""Request bodies of the OpenAI-compatible endpoints, and the OpenAI error body.

Validation happens here, at the edge: floats must be finite (JSON's NaN/Infinity and overflowing
literals such as 1e999 are refused), every string must be encodable as UTF-8 (a lone surrogate such
as "\\ud800" is refused with 422 instead of failing inside the tokenizer).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints


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


def _unsupported(default):
    """A field this server does not implement: its absent or neutral value only (clients send the neutral one by
    default). Any other value would be silently ignored, and the answer would not be the one asked for."""
    def check(v):
        if v is not None and v != default:
            raise ValueError(f"is not supported by this server (only {default!r}, or leave it out)")
        return v
    return AfterValidator(check)


class _Sampling(BaseModel):
    # Other OpenAI fields that change nothing in the answer (user, metadata, ...) are accepted and ignored, as
    # clients send them; those that would (penalties, logprobs, ...) are refused below unless neutral.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    # extensions of vLLM and llama.cpp servers; top_k -1 or 0: off
    top_k: int = Field(0, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    stop: Stops | None = None
    seed: Seed | None = None
    stream: bool = False
    n: Literal[1] = 1
    presence_penalty: Annotated[float | None, _unsupported(0.0)] = None
    frequency_penalty: Annotated[float | None, _unsupported(0.0)] = None
    logit_bias: Annotated[dict | None, _unsupported({})] = None
    logprobs: Annotated[bool | int | None, _unsupported(False)] = None
    top_logprobs: Annotated[int | None, _unsupported(0)] = None

    def stop_list(self) -> list[str]:
        return list(self.stop or ())


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: Text = Field(min_length=1)
    echo: Annotated[bool | None, _unsupported(False)] = None
    best_of: Annotated[int | None, _unsupported(1)] = None
    suffix: Annotated[str | None, _unsupported(None)] = None


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}

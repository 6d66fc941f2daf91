"""Request bodies of the OpenAI-compatible endpoints, and the OpenAI error body.

Validation happens here, at the edge: floats must be finite (JSON's NaN/Infinity and overflowing
literals such as 1e999 are refused), every string must be encodable as UTF-8 (a lone surrogate such
as "\\ud800" is refused with 422 instead of failing inside the tokenizer).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _utf8(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text (a lone surrogate at position {e.start})") from None
    return s


Text = Annotated[str, AfterValidator(_utf8)]
StopStr = Annotated[Text, Field(min_length=1, max_length=64)]
Seed = Annotated[int, Field(ge=0, le=2**63 - 1)]


class _Sampling(BaseModel):
    # Unknown OpenAI fields (presence_penalty, user, ...) are accepted and ignored, as clients send them.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Text | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: StopStr | list[StopStr] | None = Field(None, max_length=4)
    seed: Seed | None = None
    stream: bool = False
    n: Literal[1] = 1

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: Text = Field(min_length=1)


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}

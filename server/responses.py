"""OpenAI response models (chat completion, chunk, completion, model list) and builders from engine records.

Built with exactly the fields OpenAI sends and serialised with `exclude_unset`, so a field that OpenAI
sends as null is passed explicitly and one it leaves out is never set.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, model_validator

from server import __version__
from server.events import TokenLogprob, Usage

SYSTEM_FINGERPRINT = f"coder-serve-{__version__}"
FinishReason = Literal["stop", "length", "tool_calls"]


class _Out(BaseModel):
    """A response part: fields with a non-None default always appear; None-default ones only when passed."""

    @model_validator(mode="after")
    def _keep_constant_fields(self) -> _Out:
        for name, field in type(self).model_fields.items():
            if field.default is not None and not field.is_required():
                self.__pydantic_fields_set__.add(name)
        return self


class CompletionUsage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprobModel(_Out):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobModel(_Out):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprobModel]


class ChoiceLogprobs(_Out):
    content: list[TokenLogprobModel] | None
    refusal: list[TokenLogprobModel] | None = None


class FunctionCallOut(_Out):
    name: str
    arguments: str


class ToolCallOut(_Out):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessageOut(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Out):
    index: int
    message: AssistantMessageOut
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage
    system_fingerprint: str | None = None


class DeltaFunction(_Out):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Out):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction | None = None


class ChoiceDelta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(_Out):
    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    system_fingerprint: str | None = None
    usage: CompletionUsage | None = None


class CompletionLogprobs(_Out):
    text_offset: list[int]
    token_logprobs: list[float]
    tokens: list[str]
    top_logprobs: list[dict[str, float]]


class CompletionChoice(_Out):
    finish_reason: FinishReason | None
    index: int
    logprobs: CompletionLogprobs | None
    text: str


class Completion(_Out):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: CompletionUsage | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # ---- extensions ----
    meta: dict[str, Any] | None = None


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(_Out):
    status: Literal["ok"]
    model: str
    demo: bool
    context_size: int
    placement: dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_model(usage: Usage) -> CompletionUsage:
    return CompletionUsage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
    )


def chat_logprobs(records: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprobModel(
                token=r.token,
                logprob=r.logprob,
                bytes=list(r.bytes),
                top_logprobs=[TopLogprobModel(token=t.token, logprob=t.logprob, bytes=list(t.bytes)) for t in r.top],
            )
            for r in records
        ],
        refusal=None,
    )


def completion_logprobs(records: list[TokenLogprob] | tuple[TokenLogprob, ...], start: int) -> CompletionLogprobs:
    """Legacy completions format; `start` is where the generated text begins in the returned text (after
    an echoed prompt). Each offset is where the token's text begins, in characters."""
    return CompletionLogprobs(
        text_offset=[start + r.offset for r in records],
        token_logprobs=[r.logprob for r in records],
        tokens=[legacy_token(r.token, r.bytes) for r in records],
        top_logprobs=[{legacy_token(t.token, t.bytes): t.logprob for t in r.top} for r in records],
    )


def legacy_token(text: str, raw: tuple[int, ...]) -> str:
    """A token as the legacy format names it: its text, or for a piece of a UTF-8 character (which has
    no text of its own, and this format no bytes field) "bytes:" and its bytes escaped, as OpenAI writes it."""
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_unset=True)

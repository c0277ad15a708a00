"""What the engine tells a request while generating: text deltas, then Finished or Failed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TopLogprob:
    token: str
    bytes: tuple[int, ...]
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[TopLogprob, ...]
    offset: int = 0  # where the token's text begins in the generated text, in characters


@dataclass(frozen=True)
class TextDelta:
    text: str  # may be empty when it only carries the logprobs of held-back tokens
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    usage: Usage


@dataclass(frozen=True)
class Failed:
    usage: Usage  # the cause is logged by the engine, never sent to a client


Event = TextDelta | Finished | Failed

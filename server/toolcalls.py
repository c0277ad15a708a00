"""Tool calls in Qwen3-Coder's text format <-> OpenAI tool_calls.

PLACEHOLDER INTERFACE (being replaced by the real parser): passes text through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgs:
    index: int
    fragment: str


Event = ContentDelta | ToolCallStart | ToolCallArgs


@dataclass
class ParsedTurn:
    content: str | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


class StreamParser:
    """Incremental parser: feed generated text, get events; close() flushes."""

    def __init__(self, tools: list[dict[str, Any]] | None = None, enabled: bool = True) -> None:
        self.tools = tools or []
        self.enabled = enabled and bool(self.tools)

    def feed(self, text: str) -> list[Event]:
        return [ContentDelta(text)] if text else []

    def close(self) -> list[Event]:
        return []

    @property
    def has_tool_calls(self) -> bool:
        return False


def parse_turn(text: str, tools: list[dict[str, Any]] | None = None) -> ParsedTurn:
    return ParsedTurn(content=text, tool_calls=[])

"""Tool calls in Qwen3-Coder's text format <-> OpenAI tool_calls, incrementally.

The model writes a call as (fixtures/qwen3-coder.jinja renders history the same way):

    <tool_call>
    <function=read_file>
    <parameter=path>
    src/app.py
    </parameter>
    </function>
    </tool_call>

`StreamParser` turns generated text into events (content deltas, a call's start, fragments of its
JSON arguments); `parse_turn` is the same parser run over a whole text, so a streamed turn and a
non-streamed one always agree. Values may contain markup of their own (code about tool calls), so a
`</parameter>` only closes a value when the block goes on with a parameter of the function not yet
given, `</function>` (then `</tool_call>` or the end) or `</tool_call>`. A call cut off by max_tokens
or an end-of-generation token still yields valid JSON with what was complete, and `incomplete` says so.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from server.grammars import (
    ToolChoice,
    ToolChoiceError,
    ToolRequestError,
    ToolSpec,
    convert_value,
    grammar_for,
    schema_types,
    tool_specs,
)

__all__ = [
    "ContentDelta", "Event", "ParsedTurn", "StreamParser", "ToolCallArgs", "ToolCallStart", "ToolChoiceError",
    "ToolRequestError", "accumulate", "convert_value", "finish_reason", "grammar_for", "parse_turn", "tools_active",
]  # fmt: skip

log = logging.getLogger(__name__)

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNC_OPEN, FUNC_CLOSE = "<function=", "</function>"
PARAM_OPEN, PARAM_CLOSE = "<parameter=", "</parameter>"
MAX_NAME = 128  # longest function / parameter name read from a tag

_YES, _NO, _MORE = "yes", "no", "more"  # a tag at a position: present, absent, not decidable yet
_WEAK = "weak"  # a plausible end of a value, used only when no better one follows
_WS = re.compile(r"\s*")


@dataclass(frozen=True)
class ContentDelta:
    text: str

    def delta(self) -> dict[str, Any]:
        return {"content": self.text}


@dataclass(frozen=True)
class ToolCallStart:
    index: int
    id: str
    name: str

    def delta(self) -> dict[str, Any]:
        call = {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": ""}}  # fmt: skip
        return {"tool_calls": [call]}


@dataclass(frozen=True)
class ToolCallArgs:
    index: int
    fragment: str

    def delta(self) -> dict[str, Any]:
        return {"tool_calls": [{"index": self.index, "function": {"arguments": self.fragment}}]}


Event = ContentDelta | ToolCallStart | ToolCallArgs


@dataclass(frozen=True)
class ParsedTurn:
    content: str | None  # None when the turn is only tool calls
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI message.tool_calls
    incomplete: bool = False  # the last call was cut off before </function>


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass
class _Call:
    index: int
    id: str
    name: str
    tagged: bool  # opened with <tool_call> (not a bare <function=...>)
    spec: ToolSpec | None
    used: set[str] = field(default_factory=set)
    opened: bool = False  # "{" of the arguments was emitted


@dataclass
class _Param:
    name: str
    schema: Any
    streamed: bool  # a plain string: emitted as it arrives; other types wait for the whole value
    parts: list[str] = field(default_factory=list)


class StreamParser:
    """Feed generated text, get events; close() at the end of generation flushes what is held back.

    Text that might still become markup ("<tool", "\\n</param") is held until decided. Content next to
    a call loses its adjacent whitespace; a disabled parser (no tools) passes text through untouched.
    """

    def __init__(
        self,
        tools: Sequence[Mapping[str, Any]] | None = None,
        enabled: bool = True,
        *,
        new_id: Callable[[], str] = new_call_id,
    ) -> None:
        self.tools = list(tools or [])
        self._specs = tool_specs(self.tools)
        self.enabled = enabled and bool(self._specs)
        self._new_id = new_id
        self._buf = ""
        self._state = "content"  # content | body | value | after_function
        self._strip_lead = False  # drop the whitespace that starts content after a call
        self._calls: list[_Call] = []
        self._param: _Param | None = None
        self._out: list[Event] = []
        self._closed = False
        self.incomplete = False

    @property
    def has_tool_calls(self) -> bool:
        return bool(self._calls)

    def feed(self, text: str) -> list[Event]:
        if self._closed:
            raise RuntimeError("feed() after close()")
        if not self.enabled:
            return [ContentDelta(text)] if text else []
        self._buf += text
        self._run(final=False)
        return self._drain()

    def close(self) -> list[Event]:
        if self._closed:
            return []
        self._closed = True
        if not self.enabled:
            return []
        self._run(final=True)
        if self._state in ("body", "value"):  # the call never reached </function>
            log.debug("tool call %d cut off", self._calls[-1].index)
            self.incomplete = True
            self._finish_call()
        return self._drain()

    # ---- the state machine; each step returns True when it made progress and should run again ----

    def _run(self, final: bool) -> None:
        steps = {"content": self._content, "body": self._body, "value": self._value, "after_function": self._after}
        while steps[self._state](final):
            pass

    def _content(self, final: bool) -> bool:
        buf = self._buf
        if self._strip_lead:
            buf = self._buf = buf.lstrip()
            if not buf:
                return False
            self._strip_lead = False
        pos = 0
        while (i := buf.find("<", pos)) != -1:
            state, end, name, tagged = self._call_start(buf, i)
            if state == _YES:
                self._emit_content(buf[:i].rstrip())
                self._buf = buf[end:]
                self._start_call(name, tagged)
                return True
            if state == _MORE and not final:
                head = buf[:i].rstrip()
                self._emit_content(head)
                self._buf = buf[len(head) :]
                return False
            pos = i + 1
        head = buf if final else buf.rstrip()  # trailing whitespace may turn out to precede a call
        self._emit_content(head)
        self._buf = buf[len(head) :]
        return False

    def _call_start(self, buf: str, i: int) -> tuple[str, int, str, bool]:
        state = _match(buf, i, CALL_OPEN)
        if state == _YES:
            state, name, end = _match_named(buf, _skip_ws(buf, i + len(CALL_OPEN)), FUNC_OPEN)
            return state, end, name, True
        if state == _MORE:
            return _MORE, i, "", True
        # Calls that forget the opening <tool_call> are accepted for functions the request declared, when
        # a parameter or </function> follows: prose that names a tool's tag is no call.
        state, name, end = _match_named(buf, i, FUNC_OPEN)
        if state == _YES:
            state = _bare_call_follows(buf, _skip_ws(buf, end)) if name in self._specs else _NO
        return state, end, name, False

    def _body(self, final: bool) -> bool:
        buf = self._buf
        j = _skip_ws(buf, 0)
        if j == len(buf):
            self._buf = ""
            return False
        state, name, end = _match_named(buf, j, PARAM_OPEN)
        if state == _YES and (end < len(buf) or final):
            end += buf.startswith("\n", end)  # the newline the format puts before a value
            self._buf = buf[end:]
            self._start_param(name)
            return True
        if state != _NO and not final:
            self._buf = buf[j:]
            return False
        for tag in (FUNC_CLOSE, CALL_CLOSE):
            state = _match(buf, j, tag)
            if state == _YES:
                self._buf = buf[j + len(tag) :]
                if tag == FUNC_CLOSE:
                    self._state = "after_function"
                else:
                    self._finish_call()
                return True
            if state == _MORE and not final:
                self._buf = buf[j:]
                return False
        k = buf.find("<", j + 1)  # not markup the format allows here: skip it
        log.debug("skipping unexpected text in tool call: %r", buf[j : k if k != -1 else len(buf)][:80])
        self._buf = buf[k:] if k != -1 else ""
        return k != -1

    def _value(self, final: bool) -> bool:
        buf = self._buf
        end, cut, resume = self._value_end(buf, final)
        self._value_text(buf[:cut])
        if end:
            self._buf = buf[resume:]
            self._finish_param(complete=True)
            return True
        if not final:
            self._buf = buf[cut:]
            return False
        self._buf = ""  # cut off inside the value: keep what is certain, drop a half-written closing tag
        self._finish_param(complete=False)
        return False

    def _after(self, final: bool) -> bool:
        buf = self._buf
        j = _skip_ws(buf, 0)
        if j == len(buf) and not final:
            self._buf = ""
            return False
        state = _match(buf, j, CALL_CLOSE)
        if state == _MORE and not final:
            self._buf = buf[j:]
            return False
        if state == _MORE:
            j = len(buf)  # a closing tag cut off at the very end
        elif state == _YES:
            j += len(CALL_CLOSE)
        self._buf = buf[j:]
        self._finish_call()
        return bool(self._buf)

    # ---- values ----

    def _value_end(self, buf: str, final: bool) -> tuple[bool, int, int]:
        """(True, value length, where parsing resumes) or (False, length safe to release, 0).

        A </parameter> that ends the call but is followed by more text than another call is a weak
        close: taken only when nothing better comes before the end (code often quotes such blocks).
        """
        pos, weak, held = 0, -1, len(buf)
        while (k := buf.find(PARAM_CLOSE, pos)) != -1:
            state = self._after_value(buf, k + len(PARAM_CLOSE))
            if state == _YES or (state == _MORE and final):
                return True, _before_newline(buf, k), k + len(PARAM_CLOSE)
            if state == _WEAK and weak < 0:
                weak = k
            if state == _MORE:
                held = k
                break
            pos = k + 1
        if weak >= 0 and final:
            return True, _before_newline(buf, weak), weak + len(PARAM_CLOSE)
        closing = "\n" + PARAM_CLOSE
        for n in range(min(len(buf), len(closing) - 1), 0, -1):  # a closing tag may be starting
            if closing.startswith(buf[-n:]) or PARAM_CLOSE.startswith(buf[-n:]):
                held = min(held, len(buf) - n)
                break
        if weak >= 0:
            held = min(held, weak)
        return False, _before_newline(buf, held) if held < len(buf) else held, 0

    def _after_value(self, buf: str, i: int) -> str:
        """Does the </parameter> ending at i close the value? Judged by what follows it."""
        j = _skip_ws(buf, i)
        if j == len(buf):
            return _MORE
        state, name, _ = _match_named(buf, j, PARAM_OPEN)
        if state == _YES:
            return _YES if self._accepts(name) else _NO
        if state == _MORE:
            return _MORE
        state = _match(buf, j, FUNC_CLOSE)
        if state == _YES:
            if not self._calls[-1].tagged:
                return _YES
            j = _skip_ws(buf, j + len(FUNC_CLOSE))
            if j == len(buf):
                return _MORE
            state = _match(buf, j, CALL_CLOSE)
            return self._after_call(buf, j + len(CALL_CLOSE)) if state == _YES else _MORE if state == _MORE else _WEAK
        if state == _MORE:
            return _MORE
        state = _match(buf, j, CALL_CLOSE)
        return self._after_call(buf, j + len(CALL_CLOSE)) if state == _YES else state

    @staticmethod
    def _after_call(buf: str, i: int) -> str:
        """After a call's closing tag only the end of the turn or another call is expected."""
        j = _skip_ws(buf, i)
        if j == len(buf):
            return _MORE
        state = _match(buf, j, CALL_OPEN)
        return _WEAK if state == _NO else state

    def _accepts(self, name: str) -> bool:
        call, param = self._calls[-1], self._param
        if (param is not None and name == param.name) or name in call.used:
            return False
        return call.spec is None or not call.spec.properties or name in call.spec.properties

    def _start_param(self, name: str) -> None:
        call = self._calls[-1]
        schema = call.spec.properties.get(name) if call.spec else None
        streamed = schema_types(schema) == ("string",)
        self._param = _Param(name, schema, streamed)
        if streamed:
            self._emit_args(self._key(name) + '"')
        self._state = "value"

    def _value_text(self, text: str) -> None:
        assert self._param is not None
        if not self._param.streamed:
            self._param.parts.append(text)
        elif text:
            self._emit_args(json.dumps(text, ensure_ascii=False)[1:-1])

    def _finish_param(self, complete: bool) -> None:
        param, call = self._param, self._calls[-1]
        assert param is not None
        if param.streamed:
            self._emit_args('"')
        elif complete:  # a typed value cut off is dropped: "12" may have been the start of "1234"
            value = convert_value("".join(param.parts), param.schema)
            self._emit_args(self._key(param.name) + json.dumps(value, ensure_ascii=False))
        call.used.add(param.name)
        self._param = None
        self._state = "body"

    def _key(self, name: str) -> str:
        call = self._calls[-1]
        prefix = ", " if call.opened else "{"
        call.opened = True
        return prefix + json.dumps(name, ensure_ascii=False) + ": "

    # ---- calls and output ----

    def _start_call(self, name: str, tagged: bool) -> None:
        call = _Call(len(self._calls), self._new_id(), name, tagged, self._specs.get(name))
        self._calls.append(call)
        self._out.append(ToolCallStart(call.index, call.id, name))
        self._state = "body"

    def _finish_call(self) -> None:
        if self._param is not None:
            self._finish_param(complete=False)
        call = self._calls[-1]
        self._emit_args("}" if call.opened else "{}")
        self._state, self._strip_lead = "content", True

    def _emit_content(self, text: str) -> None:
        if text:
            self._out.append(ContentDelta(text))

    def _emit_args(self, fragment: str) -> None:
        if fragment:
            self._out.append(ToolCallArgs(self._calls[-1].index, fragment))

    def _drain(self) -> list[Event]:
        """The events since the last call, neighbours of one kind merged (fewer, larger chunks)."""
        merged: list[Event] = []
        for event in self._out:
            last = merged[-1] if merged else None
            if isinstance(event, ContentDelta) and isinstance(last, ContentDelta):
                merged[-1] = ContentDelta(last.text + event.text)
            elif isinstance(event, ToolCallArgs) and isinstance(last, ToolCallArgs) and last.index == event.index:
                merged[-1] = ToolCallArgs(last.index, last.fragment + event.fragment)
            else:
                merged.append(event)
        self._out = []
        return merged


def _before_newline(buf: str, k: int) -> int:
    """Where a value ends when its closing tag starts at k: the format's newline is not part of it."""
    return k - 1 if k > 0 and buf[k - 1] == "\n" else k


def _bare_call_follows(buf: str, pos: int) -> str:
    """Whether the format's next markup, a parameter or </function>, is at pos."""
    states = (_match_named(buf, pos, PARAM_OPEN)[0], _match(buf, pos, FUNC_CLOSE))
    return _YES if _YES in states else _MORE if _MORE in states else _NO


def _skip_ws(buf: str, pos: int) -> int:
    return _WS.match(buf, pos).end()  # type: ignore[union-attr]


def _match(buf: str, pos: int, literal: str) -> str:
    part = buf[pos : pos + len(literal)]
    if part == literal:
        return _YES
    return _MORE if literal.startswith(part) else _NO


def _match_named(buf: str, pos: int, prefix: str) -> tuple[str, str, int]:
    """`<prefix NAME>` at pos: (state, stripped name, index after '>')."""
    state = _match(buf, pos, prefix)
    if state != _YES:
        return state, "", pos
    start = pos + len(prefix)
    end = buf.find(">", start, start + MAX_NAME + 1)
    name = buf[start : end if end != -1 else start + MAX_NAME + 1]
    if "\n" in name or "<" in name or len(name) > MAX_NAME or (end != -1 and not name.strip()):
        return _NO, "", pos
    return (_YES, name.strip(), end + 1) if end != -1 else (_MORE, "", pos)


# ---- whole turns and finish reasons ----


def accumulate(events: Sequence[Event], incomplete: bool = False) -> ParsedTurn:
    """Events -> the message they add up to (what a client's stream accumulator rebuilds)."""
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
        elif isinstance(event, ToolCallStart):
            calls[event.index] = {"id": event.id, "type": "function",
                                  "function": {"name": event.name, "arguments": ""}}  # fmt: skip
        else:
            calls[event.index]["function"]["arguments"] += event.fragment
    text = "".join(content)
    tool_calls = [calls[i] for i in sorted(calls)]
    return ParsedTurn(text if text or not tool_calls else None, tool_calls, incomplete)


def parse_turn(
    text: str,
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    enabled: bool = True,
    new_id: Callable[[], str] = new_call_id,
) -> ParsedTurn:
    parser = StreamParser(tools, enabled, new_id=new_id)
    events = parser.feed(text) + parser.close()
    return accumulate(events, parser.incomplete)


def finish_reason(engine_reason: str, has_tool_calls: bool) -> str:
    """OpenAI's finish_reason: "length" wins (a call may be cut off), then "tool_calls"."""
    if engine_reason == "stop" and has_tool_calls:
        return "tool_calls"
    return engine_reason


def tools_active(tools: Sequence[Mapping[str, Any]] | None, tool_choice: ToolChoice) -> bool:
    """Whether to render `tools` into the prompt and parse calls: not for tool_choice "none"."""
    return bool(tools) and tool_choice != "none"

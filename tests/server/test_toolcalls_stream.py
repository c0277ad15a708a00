"""Streaming: for any chunking, the events add up to exactly what parse_turn gives for the whole text,
also through the OpenAI SDK's own stream accumulator, and no markup leaks into content."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from server.toolcalls import (
    ContentDelta,
    Event,
    ParsedTurn,
    StreamParser,
    ToolCallArgs,
    ToolCallStart,
    accumulate,
    finish_reason,
    parse_turn,
)
from tests.server.test_toolcalls import TOOLS, call


def ids() -> Callable[[], str]:
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def chunkings(text: str, rng: random.Random, n: int) -> Iterator[list[str]]:
    yield [text]
    yield list(text)
    for _ in range(n):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
        yield [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]


def stream(chunks: list[str], tools: Any = TOOLS) -> tuple[list[Event], StreamParser]:
    parser = StreamParser(tools, new_id=ids())
    events = [e for c in chunks for e in parser.feed(c)]
    return events + parser.close(), parser


def random_value(rng: random.Random) -> str:
    parts = ["x", " ", "\n", "    ", "<", "</", "</parameter>", "<parameter=path>", "</function>", "</tool_call>",
             "<tool_call>", '"', "\\", "é", "🐍", "\t", "def f():", "return 1"]  # fmt: skip
    return "".join(rng.choice(parts) for _ in range(rng.randint(0, 12)))


def random_turn(rng: random.Random) -> str:
    prose = rng.choice(["", "Let me check.", "Sure:\n\n", "a < b and <tool", "  ", "Done <tool_call> x"])
    text = prose
    for _ in range(rng.randint(0, 3)):
        name = rng.choice(["read_file", "write_file", "configure", "list_dir", "undeclared"])
        if name == "configure":
            params = {"ratio": rng.choice(["1.5", "x"]), "verbose": "true", "options": "{'a': [1, 2]}"}
        else:
            params = {"path": random_value(rng), "content": random_value(rng), "limit": rng.choice(["3", "4x"])}
        params = {k: v for k, v in params.items() if rng.random() < 0.7}
        text += rng.choice(["", "\n", "\n\n"]) + call(name, **params)
    text += rng.choice(["", "\n", " trailing words", "\n<tool_call>\n<function=read_file>\n<parameter=path>\nab"])
    return text


CASES = [
    "",
    "plain prose, no calls\n",
    "I'll read it.\n\n" + call("read_file", path="src/app.py", limit="20"),
    call("write_file", path="a.py", content="    x = '</parameter>'\n\n") + "\n" + call("list_dir"),
    call("write_file", path="q.py", content='s = "</parameter>\\n</function>\\n</tool_call>"\nmore()'),
    call("configure", ratio="2.5", verbose="False", options='{"k": "</parameter>"}', files="['a']"),
    "<tool_call>\n<function=read_file>\n<parameter=path>\nsrc/ap",
    "text then <tool_call>\n<function=read_file>\n<parameter=limit>\n12",
    "Sure.\n<function=read_file>\n<parameter=path>\nx\n</parameter>\n</function>\nDone.",
    call("read_file", path="a") + "\nAnything else?",
]


@pytest.mark.parametrize("text", CASES)
def test_any_chunking_adds_up_to_parse_turn(text: str) -> None:
    expected = parse_turn(text, TOOLS, new_id=ids())
    for chunks in chunkings(text, random.Random(text), 40):
        events, parser = stream(chunks)
        assert accumulate(events, parser.incomplete) == expected, chunks


def test_random_turns_add_up_to_parse_turn_for_random_chunkings() -> None:
    rng = random.Random(99)
    for _ in range(300):
        text = random_turn(rng)
        expected = parse_turn(text, TOOLS, new_id=ids())
        for chunks in chunkings(text, rng, 5):
            events, parser = stream(chunks)
            assert accumulate(events, parser.incomplete) == expected, (text, chunks)
        for tc in expected.tool_calls:
            assert isinstance(json.loads(tc["function"]["arguments"]), dict)


def sdk_accumulate(events: list[Event], reason: str) -> Any:
    """Events -> chunks one to one -> the OpenAI SDK's accumulator.

    As OpenAI does, the role travels with the first event (a tool-call-only turn then keeps content
    None, as in the non-streamed reply); a turn without events gets a role chunk with content "".
    """
    state = ChatCompletionStreamState()

    def chunk(delta: dict[str, Any], finish: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk.model_validate({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})  # fmt: skip

    deltas = [event.delta() for event in events] or [{"content": ""}]
    for i, delta in enumerate(deltas):
        state.handle_chunk(chunk({"role": "assistant", **delta} if i == 0 else delta))
    state.handle_chunk(chunk({}, reason))
    return state.get_final_completion().choices[0]


def test_openai_sdk_accumulator_rebuilds_the_non_streaming_message() -> None:
    rng = random.Random(5)
    texts = CASES + [random_turn(rng) for _ in range(60)]
    for text in texts:
        expected = parse_turn(text, TOOLS, new_id=ids())
        for chunks in chunkings(text, rng, 3):
            events, parser = stream(chunks)
            choice = sdk_accumulate(events, finish_reason("stop", parser.has_tool_calls))
            message = choice.message
            assert message.content == expected.content, text
            got = [{"id": tc.id, "type": tc.type, "function": {"name": tc.function.name,
                                                                "arguments": tc.function.arguments}}
                   for tc in message.tool_calls or []]  # fmt: skip
            assert got == expected.tool_calls, text
            assert choice.finish_reason == ("tool_calls" if expected.tool_calls else "stop")


def test_event_shapes_are_what_clients_expect() -> None:
    text = "Reading.\n" + call("read_file", path="a.py", limit="3") + "\n" + call("write_file", path="b", content="c")
    events, _ = stream(list(text))
    prose = list(itertools.takewhile(lambda e: isinstance(e, ContentDelta), events))
    assert "".join(e.text for e in prose) == "Reading."  # type: ignore[union-attr]
    started: set[int] = set()
    for event in events[len(prose) :]:
        assert not isinstance(event, ContentDelta)
        if isinstance(event, ToolCallStart):
            assert event.index == len(started) and event.delta()["tool_calls"][0]["function"]["arguments"] == ""
            started.add(event.index)
        else:
            assert isinstance(event, ToolCallArgs) and event.index in started
            assert set(event.delta()["tool_calls"][0]) == {"index", "function"}
            assert set(event.delta()["tool_calls"][0]["function"]) == {"arguments"}
    assert started == {0, 1}


def test_partial_tags_are_held_back_until_decided() -> None:
    parser = StreamParser(TOOLS, new_id=ids())
    assert parser.feed("Checking <tool") == [ContentDelta("Checking")]
    assert parser.feed("_call>\n<function=read_") == []
    assert parser.feed("file>\n") == [ToolCallStart(0, "call_0", "read_file")]
    assert parser.has_tool_calls
    parser = StreamParser(TOOLS, new_id=ids())
    assert parser.feed("a <tool") == [ContentDelta("a")]
    assert parser.feed("box> b") == [ContentDelta(" <toolbox> b")]
    assert parser.close() == [] and not parser.has_tool_calls


def test_string_arguments_stream_while_they_are_written() -> None:
    parser = StreamParser(TOOLS, new_id=ids())
    assert parser.feed("<tool_call>\n<function=write_file>\n<parameter=content>\n") == [
        ToolCallStart(0, "call_0", "write_file"), ToolCallArgs(0, '{"content": "')]  # fmt: skip
    assert parser.feed("def f():\n") == [ToolCallArgs(0, "def f():")]
    assert parser.feed("    return 1") == [ToolCallArgs(0, "\\n    return 1")]
    assert parser.feed("\n</parameter>") == []  # could still be code: decided by what follows
    assert parser.feed("\n</function>\n</tool_call>") == []  # a quoted block ends the same way
    assert parser.close() == [ToolCallArgs(0, '"}')]


def test_typed_values_wait_for_the_whole_value() -> None:
    parser = StreamParser(TOOLS, new_id=ids())
    parser.feed("<tool_call>\n<function=read_file>\n<parameter=limit>\n1")
    assert parser.feed("2") == []
    assert parser.feed("\n</parameter>\n<parameter=path>\n") == [ToolCallArgs(0, '{"limit": 12, "path": "')]


def test_no_markup_leaks_into_content_of_well_formed_turns() -> None:
    rng = random.Random(3)
    for _ in range(200):
        n = rng.randint(1, 3)
        text = "Prose first." + "".join("\n" + call("read_file", path=random_value(rng)) for _ in range(n))
        for chunks in chunkings(text, rng, 3):
            events, _ = stream(chunks)
            content = "".join(e.text for e in events if isinstance(e, ContentDelta))
            assert content == "Prose first."
            assert sum(isinstance(e, ToolCallStart) for e in events) == n


def test_disabled_parser_passes_everything_through() -> None:
    parser = StreamParser(TOOLS, enabled=False)
    assert parser.feed("<tool_call>") == [ContentDelta("<tool_call>")]
    assert parser.close() == [] and not parser.has_tool_calls


def test_close_is_idempotent_and_feed_after_close_is_an_error() -> None:
    parser = StreamParser(TOOLS)
    assert parser.feed("x \n") == [ContentDelta("x")]
    assert parser.close() == [ContentDelta(" \n")] and parser.close() == []
    with pytest.raises(RuntimeError):
        parser.feed("y")


def test_truncated_turn_is_flagged() -> None:
    events, parser = stream(["<tool_call>\n<function=read_file>\n<parameter=path>\nsrc"])
    assert parser.incomplete and accumulate(events, parser.incomplete) == ParsedTurn(
        None, [{"id": "call_0", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "src"}'}}],
        incomplete=True,
    )
    assert finish_reason("length", parser.has_tool_calls) == "length"

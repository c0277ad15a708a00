"""The tool-call parser on whole texts, request checks, and history through the real chat template."""

from __future__ import annotations

import functools
import itertools
import json
import random
from typing import Any

import pytest

from server.templates import ChatTemplate
from server.toolcalls import StreamParser, accumulate, convert_value, finish_reason, parse_turn, tools_active


def fn(name: str, properties: dict[str, Any] | None = None, required: list[str] | None = None) -> dict[str, Any]:
    params = {"type": "object", "properties": properties or {}, "required": required or []}
    return {"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": params}}


TOOLS = [
    fn("read_file", {"path": {"type": "string"}, "limit": {"type": "integer"}}, ["path"]),
    fn("write_file", {"path": {"type": "string"}, "content": {"type": "string"}}, ["path", "content"]),
    fn("configure", {
        "ratio": {"type": "number"}, "verbose": {"type": "boolean"}, "nothing": {"type": "null"},
        "options": {"type": "object"}, "files": {"type": "array", "items": {"type": "string"}},
        "maybe": {"type": ["integer", "null"]}, "either": {"anyOf": [{"type": "boolean"}, {"type": "string"}]},
        "mode": {"enum": ["fast", "slow"]}, "level": {"enum": [1, 2, 3]},
    }),  # fmt: skip
    fn("list_dir"),
]


def call(name: str, **params: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def args_of(turn: Any, i: int = 0) -> Any:
    return json.loads(turn.tool_calls[i]["function"]["arguments"])


def test_single_call_is_an_openai_tool_call() -> None:
    turn = parse_turn(call("read_file", path="src/app.py"), TOOLS)
    assert turn.content is None and not turn.incomplete
    [tc] = turn.tool_calls
    assert tc["type"] == "function" and tc["id"].startswith("call_") and len(tc["id"]) > 10
    assert tc["function"] == {"name": "read_file", "arguments": '{"path": "src/app.py"}'}


def test_text_before_the_first_call_is_content_and_calls_keep_their_order() -> None:
    text = "Reading both files.\n\n" + call("read_file", path="a.py") + "\n" + call("read_file", path="b.py")
    turn = parse_turn(text, TOOLS)
    assert turn.content == "Reading both files."
    assert [args_of(turn, i)["path"] for i in range(2)] == ["a.py", "b.py"]
    assert len({tc["id"] for tc in turn.tool_calls}) == 2


def test_values_are_typed_by_the_schema() -> None:
    text = call(
        "configure", ratio="0.25", verbose="True", nothing="null", options='{"a": [1, 2], "b": null}',
        files="['x.py', 'y.py']", maybe="None", either="false", mode="fast", level="2",
    )  # fmt: skip
    assert args_of(parse_turn(text, TOOLS)) == {
        "ratio": 0.25, "verbose": True, "nothing": None, "options": {"a": [1, 2], "b": None},
        "files": ["x.py", "y.py"], "maybe": None, "either": False, "mode": "fast", "level": 2,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("schema", "text", "expected"),
    [
        ({"type": "integer"}, " 42 ", 42),
        ({"type": "integer"}, "3.0", 3),
        ({"type": "integer"}, "three", "three"),  # does not fit: the text, as written
        ({"type": "integer"}, "3.5", "3.5"),
        ({"type": "integer"}, "9" * 5000, "9" * 5000),
        ({"type": "number"}, "-1.5e3", -1500.0),
        ({"type": "number"}, "7", 7),
        ({"type": "number"}, "nan", "nan"),
        ({"type": "boolean"}, "FALSE", False),
        ({"type": "object"}, "{'k': (1, 2)}", {"k": [1, 2]}),
        ({"type": "object"}, "[1]", "[1]"),
        ({"type": "array"}, "(1, 'a')", [1, "a"]),
        ({"type": "array"}, "__import__('os')", "__import__('os')"),
        ({"type": "string"}, " null ", " null "),
        ({"type": ["string", "null"]}, "null", None),
        ({"type": ["string", "null"]}, "nil", "nil"),
        ({"oneOf": [{"type": "integer"}, {"type": "array"}]}, "[1, 2]", [1, 2]),
        ({"type": "unknown-type"}, "x", "x"),
        ({}, "5", "5"),
        (None, "5", "5"),
    ],
)
def test_convert_value(schema: Any, text: str, expected: Any) -> None:
    value = convert_value(text, schema)
    assert value == expected and type(value) is type(expected)


def test_string_values_are_byte_exact_apart_from_the_format_newlines() -> None:
    code = "\n\n    def f(x):  \n\treturn x\t\n\n"
    turn = parse_turn(call("write_file", path=" spaced name.py ", content=code), TOOLS)
    assert args_of(turn) == {"path": " spaced name.py ", "content": code}
    # Without the format's newlines the value is taken as it stands.
    bare = "<tool_call><function=write_file><parameter=path>p</parameter><parameter=content>x\n</parameter></function></tool_call>"
    assert args_of(parse_turn(bare, TOOLS)) == {"path": "p", "content": "x"}


def test_unicode_and_json_escapes_round_trip() -> None:
    value = 'naïve "quotes" \\ back\u2028slash \x01 ✓ 🐍'
    assert args_of(parse_turn(call("read_file", path=value), TOOLS)) == {"path": value}


def test_code_that_talks_about_tool_calls_stays_inside_the_value() -> None:
    code = (
        'PROMPT = """<tool_call>\n<function=read_file>\n<parameter=path>\nx\n</parameter>\n'
        '</function>\n</tool_call>"""\n'
        "END = '</parameter>'\n"
        "</parameter>\n<parameter=path>\nalready given, so still code\n"
        "</parameter>\n<parameter=undeclared>\nnot a parameter of write_file\n"
        "</parameter> followed by prose\n</function>\nnot followed by </tool_call>"
    )
    turn = parse_turn(call("write_file", path="gen.py", content=code), TOOLS)
    assert args_of(turn) == {"path": "gen.py", "content": code}
    assert len(turn.tool_calls) == 1 and turn.content is None


def test_unknown_function_and_parameters_are_reported_as_strings() -> None:
    turn = parse_turn(call("not_declared", count="3", flag="true"), TOOLS)
    assert turn.tool_calls[0]["function"]["name"] == "not_declared"
    assert args_of(turn) == {"count": "3", "flag": "true"}


def test_call_without_parameters_has_empty_object_arguments() -> None:
    turn = parse_turn("<tool_call>\n<function=list_dir>\n</function>\n</tool_call>", TOOLS)
    assert turn.tool_calls[0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize(
    ("text", "content", "args", "incomplete"),
    [
        ("Let me look.\n<tool", "Let me look.\n<tool", None, False),
        ("Let me look.\n<tool_call>\n<function=rea", "Let me look.\n<tool_call>\n<function=rea", None, False),
        ("<tool_call>\n<function=read_file>", None, {}, True),
        ("<tool_call>\n<function=read_file>\n<parameter=path>\nsrc/ap", None, {"path": "src/ap"}, True),
        ("<tool_call>\n<function=read_file>\n<parameter=path>\nsrc/app.py\n</param", None, {"path": "src/app.py"}, True),
        ("<tool_call>\n<function=read_file>\n<parameter=path>\na\n</parameter>\n<parameter=limit>\n12", None,
         {"path": "a"}, True),
        ("<tool_call>\n<function=read_file>\n<parameter=path>\na\n</parameter>\n", None, {"path": "a"}, True),
        ("<tool_call>\n<function=read_file>\n<parameter=path>\na\n</parameter>\n</function>", None, {"path": "a"}, False),
        ("<tool_call>\n<function=read_file>\n<parameter=path>\na\n</parameter>\n</function>\n</tool", None,
         {"path": "a"}, False),
    ],
)  # fmt: skip
def test_cut_off_text_never_raises(text: str, content: str | None, args: Any, incomplete: bool) -> None:
    turn = parse_turn(text, TOOLS)
    assert turn.content == content and turn.incomplete is incomplete
    if args is None:
        assert turn.tool_calls == []
    else:
        assert args_of(turn) == args


def test_malformed_calls_are_recovered() -> None:
    no_function_close = "<tool_call>\n<function=read_file>\n<parameter=path>\na.py\n</parameter>\n</tool_call>"
    assert args_of(parse_turn(no_function_close, TOOLS)) == {"path": "a.py"}
    junk = "<tool_call>\n<function=read_file>\nI think\n<parameter=path>\na.py\n</parameter>\n</function>\n</tool_call>"
    assert args_of(parse_turn(junk, TOOLS)) == {"path": "a.py"}
    no_open_tag = "Sure.\n<function=read_file>\n<parameter=path>\na.py\n</parameter>\n</function>\nDone."
    turn = parse_turn(no_open_tag, TOOLS)
    assert args_of(turn) == {"path": "a.py"} and turn.content == "Sure.Done."
    prose_after = call("read_file", path="a.py") + "\nAnything else?"
    turn = parse_turn(prose_after, TOOLS)
    assert args_of(turn) == {"path": "a.py"} and turn.content == "Anything else?"


def test_markup_that_is_not_a_call_is_content() -> None:
    text = "Use <tool_call> tags, <function=unknown_fn> or a < b <tool_call>\nplain text</tool_call>"
    turn = parse_turn(text, TOOLS)
    assert turn.tool_calls == [] and turn.content == text


def streamed_turn(text: str) -> Any:
    """The text fed one character at a time, as a stream arrives."""
    parser = StreamParser(TOOLS, True)
    events = [e for ch in text for e in parser.feed(ch)] + parser.close()
    return accumulate(events, parser.incomplete)


@pytest.mark.parametrize("parse", [lambda t: parse_turn(t, TOOLS), streamed_turn])
def test_prose_naming_a_declared_tools_tag_is_content(parse: Any) -> None:
    for text in ("To read, write <function=read_file> then the path.",
                 "The tag <function=list_dir>\nopens a call.", "It ends with <function=read_file>"):
        turn = parse(text)
        assert turn.tool_calls == [] and turn.content == text and not turn.incomplete
    bare = "Sure. <function=read_file>\n<parameter=path>\na.py\n</parameter>\n</function>"
    assert args_of(parse(bare)) == {"path": "a.py"}
    assert parse("<function=list_dir>\n</function>").tool_calls[0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize("tools", [None, []])
def test_without_tools_text_passes_through(tools: Any) -> None:
    text = "  " + call("read_file", path="x") + "  "
    assert parse_turn(text, tools).content == text
    assert parse_turn(text, TOOLS, enabled=False).content == text


def test_fuzzed_markup_always_yields_json_object_arguments() -> None:
    pieces = ["<tool_call>", "</tool_call>", "<function=read_file>", "<function=configure>", "</function>",
              "<parameter=path>", "<parameter=limit>", "<parameter=options>", "<parameter=files>", "</parameter>",
              "\n", " ", "x", "12", "{'a': 1}", "[", "<", "</", "<tool", "\"", "\\", "é"]  # fmt: skip
    rng = random.Random(1234)
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 40)))
        turn = parse_turn(text, TOOLS)
        for tc in turn.tool_calls:
            assert isinstance(json.loads(tc["function"]["arguments"]), dict), text


def test_finish_reason() -> None:
    assert finish_reason("stop", True) == "tool_calls"
    assert finish_reason("stop", False) == "stop"
    assert finish_reason("length", True) == "length"


def test_tool_choice_none_disables_tools() -> None:
    assert tools_active(TOOLS, "auto") and tools_active(TOOLS, None) and tools_active(TOOLS, "required")
    assert not tools_active(TOOLS, "none") and not tools_active([], "auto") and not tools_active(None, None)


# ---- history through the real template ----


@functools.cache
def chat_template(source: str) -> ChatTemplate:
    return ChatTemplate(source)


def render(template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """The server's own rendering (server.templates), which turns argument JSON into objects."""
    return chat_template(template).render(messages, tools=tools)


AGENT_EXCHANGE = [
    {"role": "user", "content": "What does src/app.py print?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "read_file", "arguments": '{"path": "src/app.py", "limit": 5}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "print('hi')"},
    {"role": "assistant", "content": "It prints `hi`."},
    {"role": "user", "content": "Thanks"},
]  # fmt: skip

EXPECTED_TURNS = (
    "<|im_start|>user\nWhat does src/app.py print?<|im_end|>\n"
    "<|im_start|>assistant\n<tool_call>\n<function=read_file>\n<parameter=path>\nsrc/app.py\n</parameter>\n"
    "<parameter=limit>\n5\n</parameter>\n</function>\n</tool_call><|im_end|>\n"
    "<|im_start|>user\n<tool_response>\nprint('hi')\n</tool_response>\n<|im_end|>\n"
    "<|im_start|>assistant\nIt prints `hi`.<|im_end|>\n"
    "<|im_start|>user\nThanks<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_agent_exchange_renders_to_the_text_the_model_family_expects(qwen3_coder_template: str) -> None:
    prompt = render(qwen3_coder_template, AGENT_EXCHANGE, TOOLS[:1])
    assert prompt.startswith("<|im_start|>system\nYou are Qwen, a helpful AI assistant")
    assert "<function>\n<name>read_file</name>\n<description>read_file tool</description>" in prompt
    assert "<parameter>\n<name>limit</name>\n<type>integer</type>\n</parameter>" in prompt
    assert prompt.endswith("</IMPORTANT><|im_end|>\n" + EXPECTED_TURNS)


def test_rendered_calls_parse_back_to_the_same_arguments(qwen3_coder_template: str) -> None:
    """What the template writes for a call, the parser reads back: for many argument sets."""
    rng = random.Random(7)
    strings = ["src/app.py", "", "  indented\n    code  \n", "a </parameter> b", "<tool_call>", "x\n\n", "✓"]
    values = {
        "ratio": [0.5, 2.0, -1e-05], "verbose": [True, False], "nothing": [None],
        "options": [{"a": 1}, {"nested": {"k": [1, "</parameter>"]}}], "files": [[], ["a", "b"]],
        "maybe": [3, None], "either": [True, "text"], "mode": ["fast", "slow"], "level": [1, 3],
    }  # fmt: skip
    for _ in range(200):
        name = rng.choice(["write_file", "configure"])
        if name == "write_file":
            args: dict[str, Any] = {"path": rng.choice(strings), "content": rng.choice(strings)}
        else:
            args = {k: rng.choice(v) for k, v in values.items() if rng.random() < 0.6}
        message = {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}  # fmt: skip
        prompt = render(qwen3_coder_template, [{"role": "user", "content": "go"}, message])
        generated = prompt.split("<|im_start|>assistant\n")[-2].removesuffix("<|im_end|>\n")
        turn = parse_turn(generated, TOOLS)
        assert args_of(turn) == args, generated
        assert turn.tool_calls[0]["function"]["name"] == name and not turn.incomplete


def test_parallel_calls_render_and_parse_back(qwen3_coder_template: str) -> None:
    ids = itertools.count()
    calls = [{"id": f"call_{i}", "type": "function",
              "function": {"name": "read_file", "arguments": json.dumps({"path": f"f{i}.py"})}} for i in range(3)]  # fmt: skip
    message = {"role": "assistant", "content": "Reading three files.", "tool_calls": calls}
    prompt = render(qwen3_coder_template, [{"role": "user", "content": "go"}, message])
    generated = prompt.split("<|im_start|>assistant\n")[-2].removesuffix("<|im_end|>\n")
    turn = parse_turn(generated, TOOLS, new_id=lambda: f"call_{next(ids)}")
    assert turn.content == "Reading three files."
    assert turn.tool_calls == calls

"""/v1/responses through the whole path: real server, real GGUF, the OpenAI SDK's responses client."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.server.conftest import LiveServer
from tests.server.test_tool_grammar import BOUNDED

ASK = "Open src/app.py and show the first lines."
TOOLS = [{"type": "function", **t["function"]} for t in BOUNDED]  # the Responses API's flat tool shape
# A JSON schema ends the answer through its grammar, so the response completes rather than hitting a limit.
SCHEMA = {"format": {"type": "json_schema", "name": "flag", "strict": True,
                     "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}}  # fmt: skip


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def create(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.responses.create(**{"model": "m", "input": ASK, "temperature": 0, "max_output_tokens": 12, **kwargs})


def prompt_tokens(server: LiveServer, messages: list[dict[str, Any]], tools: Any = None) -> int:
    return len(server.engine.tokenize(server.app.state.server.template().render(messages, tools=tools)))


def test_text_answer_matches_the_chat_path(client: openai.OpenAI, server: LiveServer) -> None:
    out = create(client, instructions="Answer briefly.")
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": ASK}]
    chat = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=12)
    assert out.object == "response" and out.id.startswith("resp_")
    [message] = out.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [part.type for part in message.content] == ["output_text"]
    assert out.output_text == chat.choices[0].message.content
    assert out.usage.input_tokens == prompt_tokens(server, messages) == chat.usage.prompt_tokens
    assert out.usage.total_tokens == out.usage.input_tokens + out.usage.output_tokens
    if chat.choices[0].finish_reason == "length":
        assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
        assert message.status == "incomplete" and out.usage.output_tokens == 12
    assert out.instructions == "Answer briefly." and out.max_output_tokens == 12 and out.store is False


def test_stream_events_come_in_order_and_add_up(client: openai.OpenAI) -> None:
    whole = create(client, text=SCHEMA, max_output_tokens=64)
    assert whole.status == "completed" and json.loads(whole.output_text) in ({"ok": True}, {"ok": False})
    events = list(create(client, text=SCHEMA, max_output_tokens=64, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    n = kinds.count("response.output_text.delta")
    assert n >= 1 and kinds == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * n, "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    item_id = events[2].item.id
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert {e.item_id for e in deltas} == {item_id} and {(e.output_index, e.content_index) for e in deltas} == {(0, 0)}
    text = "".join(e.delta for e in deltas)
    assert text == events[-4].text == whole.output_text
    final = events[-1].response
    assert final.status == "completed" and final.output_text == text and final.output[0].id == item_id
    assert final.usage.output_tokens == whole.usage.output_tokens and final.id == events[0].response.id


def test_sdk_stream_helper_accumulates_a_function_call(client: openai.OpenAI) -> None:
    kwargs = {"tools": TOOLS, "tool_choice": {"type": "function", "name": "read_file"},
              "parallel_tool_calls": False, "max_output_tokens": 160}  # fmt: skip
    whole = create(client, **kwargs)
    with client.responses.stream(model="m", input=ASK, temperature=0, **kwargs) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    n = kinds.count("response.function_call_arguments.delta")
    assert n >= 1 and kinds == [
        "response.created", "response.in_progress", "response.output_item.added",
        *["response.function_call_arguments.delta"] * n, "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]  # fmt: skip
    for out in (whole, final):
        assert out.status == "completed"
        [call] = out.output
        assert call.type == "function_call" and call.name == "read_file" and call.status == "completed"
        assert call.call_id.startswith("call_") and call.id.startswith("fc_")
        assert set(json.loads(call.arguments)) == {"path", "limit"}
    assert final.output[0].arguments == whole.output[0].arguments


def test_function_call_round_trip_renders_like_chat(client: openai.OpenAI, server: LiveServer) -> None:
    first = create(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_output_tokens=160)
    [call] = first.output
    history = [
        {"role": "user", "content": ASK},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "print('hello')\n"},
    ]
    answer = create(client, input=history, tools=TOOLS)
    assert answer.status in ("completed", "incomplete")
    chat = [
        {"role": "user", "content": ASK},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "print('hello')\n"},
    ]  # fmt: skip
    prompt = server.app.state.server.template().render(chat, tools=BOUNDED)
    assert f"<function={call.name}>" in prompt and "<tool_response>\nprint('hello')\n" in prompt
    assert answer.usage.input_tokens == len(server.engine.tokenize(prompt))
    # An assistant message with text, then its call: one assistant turn holding both.
    with_text = [history[0], {"role": "assistant", "content": [{"type": "output_text", "text": "Reading it."}]},
                 *history[1:]]  # fmt: skip
    chat[1]["content"] = "Reading it."
    assert create(client, input=with_text, tools=TOOLS).usage.input_tokens == prompt_tokens(server, chat, BOUNDED)


def test_raw_stream_is_named_events_without_done(server: LiveServer) -> None:
    body = {"model": "m", "input": "hi", "max_output_tokens": 3, "temperature": 0, "stream": True}
    with server.client() as http, http.stream("POST", "/v1/responses", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    blocks = text.rstrip("\n").split("\n\n")
    for block in blocks:
        event, data = block.split("\n")
        assert event.startswith("event: ") and data.startswith("data: {")
        assert json.loads(data[6:])["type"] == event[7:]
    assert blocks[-1].startswith("event: response.incomplete\n")  # three tokens: cut by max_output_tokens


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"input": []}, "input"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "read_file", "arguments": "{oops"}]}, "input"),
        ({"temperature": 3}, "temperature"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_bad_requests_get_a_400_naming_the_field(client: openai.OpenAI, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        create(client, **kwargs)
    assert err.value.body["param"] == param  # type: ignore[index]


def test_an_empty_input_list_is_named_as_such(client: openai.OpenAI) -> None:
    """Of the union's two failures (not a string; a list too short), the constraint is the message."""
    with pytest.raises(openai.BadRequestError) as err:
        create(client, input=[])
    assert "at least 1 item" in err.value.body["message"]  # type: ignore[index]


def test_ignored_fields_are_accepted(client: openai.OpenAI) -> None:
    out = create(client, store=True, include=["reasoning.encrypted_content"], reasoning={"effort": "low"},
                 truncation="auto", prompt_cache_key="k", metadata={"a": "b"}, max_output_tokens=2,
                 input=[{"type": "reasoning", "id": "rs_1", "summary": []}, {"role": "user", "content": "hi"}])  # fmt: skip
    assert out.metadata == {"a": "b"} and out.store is False and out.usage.output_tokens <= 2

"""Server-Sent Events framing, read as raw bytes: what any SSE client (not only the SDK) sees."""

from __future__ import annotations

import json

from tests.server.conftest import LiveServer


def raw_stream(server: LiveServer, path: str, body: dict) -> tuple[str, str]:
    with server.client() as client, client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        return response.headers["content-type"], response.read().decode()


def events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    blocks = text[:-2].split("\n\n")
    for block in blocks:
        assert block.startswith("data: ") and "\n" not in block, repr(block)
    return [block[len("data: "):] for block in blocks]


def test_chat_stream_is_data_events_ending_with_done(server: LiveServer) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0,
            "stream": True}
    content_type, text = raw_stream(server, "/v1/chat/completions", body)
    assert content_type.startswith("text/event-stream")
    data = events(text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"][0]["delta"] == {}
    for chunk in chunks[1:-1]:
        assert chunk["choices"][0]["finish_reason"] is None
        assert set(chunk["choices"][0]["delta"]) == {"content"}


def test_completion_stream_with_usage(server: LiveServer) -> None:
    body = {"model": "m", "prompt": "def f():", "max_tokens": 3, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    _, text = raw_stream(server, "/v1/completions", body)
    data = events(text)
    assert data[-1] == "[DONE]"
    last = json.loads(data[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] <= 3
    assert all(json.loads(d)["object"] == "text_completion" for d in data[:-1])

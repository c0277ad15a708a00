"""Requests run one at a time in arrival order; one never cuts another's stream; a client that leaves
stops its generation and frees the engine for the next request."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any

from tests.server.conftest import LiveServer, no_eog_bias

CHAT = "/v1/chat/completions"
LONG = 3000  # tokens a cancelled request would have produced


def long_chat(live: LiveServer, **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "Count."}], "temperature": 0,
            "max_tokens": LONG, "logit_bias": no_eog_bias(live.engine), **fields}


def short_chat() -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 2}


def streamed_text(live: LiveServer, body: dict[str, Any]) -> tuple[str, str | None]:
    text, finish = "", None
    with live.client() as client, client.stream("POST", CHAT, json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
    return text, finish


def test_streaming_disconnect_cancels_and_frees_the_engine(start_server: Any) -> None:
    live: LiveServer = start_server()
    before = live.engine.stats()
    with live.client() as client, client.stream("POST", CHAT, json=long_chat(live, stream=True)) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # role chunk
        next(lines), next(lines)  # generation is under way
        assert live.engine.stats().busy
    # leaving the block closed the connection mid-stream
    live.wait_until(lambda: live.engine.stats().cancellations == before.cancellations + 1, "the cancellation")
    live.wait_until(lambda: not live.engine.stats().busy, "the engine to be free")
    with live.client() as client:
        assert client.post(CHAT, json=short_chat()).status_code == 200
    after = live.engine.stats()
    assert after.generated_tokens - before.generated_tokens < LONG  # the long one stopped early
    metrics = live.client().get("/metrics").text
    assert "coder_serve_cancellations_total 1.0" in metrics


def test_non_streaming_disconnect_cancels_too(start_server: Any) -> None:
    live: LiveServer = start_server()
    before = live.engine.stats()
    body = json.dumps(long_chat(live)).encode()
    request = (f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(request)
        live.wait_until(lambda: live.engine.stats().busy, "the generation to start")
    live.wait_until(lambda: live.engine.stats().cancellations == before.cancellations + 1, "the cancellation")
    live.wait_until(lambda: not live.engine.stats().busy, "the engine to be free")
    assert live.engine.stats().generated_tokens - before.generated_tokens < LONG


def test_a_new_request_never_cuts_a_running_stream(server: LiveServer) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "Write a sorting function."}],
            "temperature": 0, "max_tokens": 24, "logit_bias": no_eog_bias(server.engine)}
    expected = streamed_text(server, body)
    assert expected[1] == "length"
    results: list[tuple[str, str | None]] = []
    threads = [threading.Thread(target=lambda: results.append(streamed_text(server, body))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 3  # every stream complete and identical to the one run alone


def test_a_waiting_request_that_leaves_is_dropped_from_the_queue(start_server: Any) -> None:
    live: LiveServer = start_server(max_queue=2)
    with live.client() as client, client.stream("POST", CHAT, json=long_chat(live, stream=True)) as running:
        lines = running.iter_lines()  # kept: dropping the iterator would close the connection
        next(lines)
        with live.client() as other, other.stream("POST", CHAT, json=long_chat(live, stream=True)) as waiting:
            assert waiting.status_code == 200
            live.wait_until(lambda: live.engine.stats().queue_depth == 1, "the second request to queue")
        live.wait_until(lambda: live.engine.stats().queue_depth == 0, "the queue to drop it")
        assert live.engine.stats().busy  # the first one is untouched

"""Every error the server sends: OpenAI's envelope, the right status, the offending parameter named."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import pytest

from server.app import model_factory
from server.engine import Engine
from tests.server.conftest import LiveServer, make_settings, no_eog_bias

CHAT = "/v1/chat/completions"


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0, **fields}


def assert_error(response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"n": 2}, "n"),
        ({"top_k": -1}, "top_k"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"seed": 2**70}, "seed"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[0]"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logit_bias": {"999999": 1}}, "logit_bias"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),
        # 30,000 nested grammar groups overflowed llama.cpp's parser and killed the process
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "string", "maxLength": 30000}}}}, "response_format.json_schema.schema"),
    ],
)
def test_bad_values_are_400_naming_the_parameter(server: LiveServer, fields: dict, param: str) -> None:
    with server.client() as client:
        error = assert_error(client.post(CHAT, json=chat_body(**fields)), 400, param=param)
    assert error["type"] == "invalid_request_error"


def test_missing_field_and_bad_json_are_400(server: LiveServer) -> None:
    with server.client() as client:
        assert_error(client.post(CHAT, json={"model": "m"}), 400, param="messages")
        assert_error(client.post(CHAT, content=b"{not json", headers={"content-type": "application/json"}), 400)
        assert_error(client.post("/v1/completions", json={"model": "m", "prompt": 5}), 400, param="prompt")


def test_template_failure_is_400_not_500(server: LiveServer) -> None:
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                                      "function": {"name": "f", "arguments": "{broken"}}]}]
    with server.client() as client:
        assert_error(client.post(CHAT, json=chat_body(messages=messages)), 400, param="messages")


def test_prompt_plus_max_tokens_beyond_the_context_is_context_length_exceeded(server: LiveServer) -> None:
    n_ctx = server.engine.info.n_ctx
    with server.client() as client:
        error = assert_error(client.post(CHAT, json=chat_body(max_tokens=n_ctx)), 400, code="context_length_exceeded",
                             param="messages")
        assert str(n_ctx) in error["message"]
        long_prompt = "word " * (n_ctx + 10)
        assert_error(client.post("/v1/completions", json={"model": "m", "prompt": long_prompt, "max_tokens": 1}), 400,
                     code="context_length_exceeded", param="prompt")
        assert_error(client.post("/v1/responses", json={"model": "m", "input": long_prompt}), 400,
                     code="context_length_exceeded", param="input")


def test_unknown_path_and_method_use_the_envelope(server: LiveServer) -> None:
    with server.client() as client:
        assert_error(client.get("/v1/nothing"), 404)
        assert_error(client.get(CHAT), 405)


def test_api_key_is_required_when_set(start_server: Any) -> None:
    live: LiveServer = start_server(api_key="s3cret")
    with live.client() as client:
        assert_error(client.post(CHAT, json=chat_body()), 401, code="invalid_api_key")
        assert_error(client.post(CHAT, json=chat_body(), headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(client.get("/metrics"), 401)
        assert client.post(CHAT, json=chat_body(), headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/health").status_code == 200  # liveness probes need no key


def test_foreign_host_header_is_refused_on_loopback(server: LiveServer) -> None:
    with server.client() as client:
        error = assert_error(client.get("/v1/models", headers={"Host": "attacker.example"}), 403)
        assert error["code"] == "forbidden"
        assert_error(client.get("/v1/models", headers={"Host": "127.0.0.1.attacker.example:80"}), 403)
        for host in ("localhost", "localhost:8080", "127.0.0.1:1", "[::1]:8080"):
            assert client.get("/v1/models", headers={"Host": host}).status_code == 200


def test_oversized_body_is_413(start_server: Any) -> None:
    live: LiveServer = start_server(max_body_bytes=4096)
    big = chat_body(messages=[{"role": "user", "content": "x" * 5000}])
    with live.client() as client:
        assert_error(client.post(CHAT, json=big), 413)

        def chunks():  # no Content-Length: the limit still holds while reading
            for _ in range(5):
                yield b" " * 1000

        assert_error(client.post(CHAT, content=chunks(), headers={"content-type": "application/json"}), 413)
        assert client.post(CHAT, json=chat_body()).status_code == 200


def test_full_queue_is_429_with_retry_after(start_server: Any) -> None:
    live: LiveServer = start_server(max_queue=1)
    long_run = chat_body(max_tokens=4000, logit_bias=no_eog_bias(live.engine), stream=True)
    with live.client() as client, client.stream("POST", CHAT, json=long_run) as running:
        lines = running.iter_lines()  # kept: dropping the iterator would close the connection
        next(lines)  # the first one is admitted
        with client.stream("POST", CHAT, json=long_run) as waiting:
            assert waiting.status_code == 200  # admitted: it waits in the queue
            live.wait_until(lambda: live.engine.stats().busy and live.engine.stats().queue_depth == 1, "one waiting")
            response = client.post(CHAT, json=chat_body())
            error = assert_error(response, 429, code="queue_full")
            assert error["type"] == "rate_limit_error"
            assert int(response.headers["Retry-After"]) >= 1
    live.wait_until(lambda: not live.engine.stats().busy, "the cancelled requests to free the engine")
    with live.client() as client:
        assert client.post(CHAT, json=chat_body()).status_code == 200


def test_503_while_the_model_loads(start_server: Any, test_gguf: Any) -> None:
    gate = threading.Event()
    settings = make_settings(test_gguf)
    load = model_factory(settings)

    def gated_load() -> Any:  # the real loader, held back until the test has seen the 503s
        gate.wait()
        return load()

    engine = Engine(gated_load, max_queue=settings.max_queue)
    live: LiveServer = start_server(engine=engine, wait_loaded=False)
    try:
        with live.client() as client:
            for reply in (client.get("/health"), client.post(CHAT, json=chat_body())):
                assert_error(reply, 503, code="model_not_ready")
                assert reply.headers["Retry-After"] == "5"  # OpenAI's SDKs wait that long and retry
            assert client.get("/v1/models").status_code == 200
            gate.set()
            assert engine.wait_loaded(120) == "ready"
            health = client.get("/health").json()
            assert health["status"] == "ok" and health["context_size"] >= 4096
            assert "preset_requested" in health["placement"]
    finally:
        gate.set()
        engine.close()


def test_cors_is_off_unless_origins_are_given(server: LiveServer, start_server: Any) -> None:
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    with server.client() as client:
        assert "access-control-allow-origin" not in client.options(CHAT, headers=preflight).headers
    live: LiveServer = start_server(cors_origins=["http://localhost:3000"])
    with live.client() as client:
        response = client.options(CHAT, headers=preflight)
        assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
        sdk = preflight | {"Access-Control-Request-Headers": "authorization,content-type,x-stainless-os"}
        response = client.options(CHAT, headers=sdk)  # what OpenAI's JavaScript SDK asks for in a browser
        assert response.status_code == 200 and "x-stainless-os" in response.headers["access-control-allow-headers"]


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded"])
def test_a_json_body_sent_as_form_data_is_read_as_json(server: LiveServer, content_type: str | None) -> None:
    # `curl -d '{...}'` without -H labels the body form-encoded; llama.cpp's server reads it anyway
    body = json.dumps(chat_body(max_tokens=1)).encode()
    headers = {"content-type": content_type} if content_type else {}
    with server.client() as client:
        request = client.build_request("POST", CHAT, content=body, headers=headers)
        assert request.headers.get("content-type") == content_type
        response = client.send(request)
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


def test_a_body_of_another_declared_type_is_still_refused(server: LiveServer) -> None:
    with server.client() as client:
        response = client.post(CHAT, content=b"<xml/>", headers={"content-type": "application/xml"})
    assert_error(response, 400)

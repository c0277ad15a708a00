"""/metrics: Prometheus text from a registry of the app's own."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import LiveServer


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_requests_tokens_and_speeds_are_reported(server: LiveServer) -> None:
    with server.client() as client:
        before = samples(client.get("/metrics").text)
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
        usage = client.post("/v1/chat/completions", json=body).json()["usage"]
        client.post("/v1/chat/completions", json={"model": "m"})  # a 400
        client.get("/no/such/path")
        after = samples(client.get("/metrics").text)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("coder_serve_requests_total", path="/v1/chat/completions", status="200") == 1
    assert delta("coder_serve_requests_total", path="/v1/chat/completions", status="400") == 1
    assert delta("coder_serve_requests_total", path="other", status="404") == 1
    assert delta("coder_serve_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("coder_serve_generated_tokens_total") == usage["completion_tokens"]
    assert after[("coder_serve_prompt_tokens_per_second", ())] > 0
    assert after[("coder_serve_queue_depth", ())] == 0
    assert after[("coder_serve_model_ready", ())] == 1
    assert ("coder_serve_cancellations_total", ()) in after


def test_each_app_counts_only_its_own_requests(server: LiveServer, start_server) -> None:
    other = start_server()
    with other.client() as client:
        first = samples(client.get("/metrics").text)
    assert ("coder_serve_requests_total", (("path", "/v1/chat/completions"), ("status", "200"))) not in first

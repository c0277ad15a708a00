"""Continue's autocomplete path: its own fill-in-the-middle prompt to /v1/completions, streamed, with a
long stop list, usage requested, max_tokens left out, and the request dropped at the next keystroke."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from server.protocol import MAX_STOP
from tests.server.conftest import LiveServer, no_eog_bias

SPECIAL = ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
           "<|file_sep|>", "<|im_start|>", "<|im_end|>"]  # fmt: skip
# Continue's stop list for Qwen's FIM template: the special tokens, then blank lines, fences, block starts.
STOPS = [*SPECIAL, "\n\n", "\r\n\r\n", "/src/", "#- coding: utf-8", "```", "\ndef", "\nclass", "\n@", "\nif __name__",
         "\n\n\n", "\n#"]  # fmt: skip
FILE = "def add(a, b):\n    return a + b\n"
PREFIX = "from util import add\n\ndef total(items):\n    result = 0\n    for x in items:\n        "
SUFFIX = "\n    return result\n"
LONG = 3000  # tokens the aborted request may produce


def fim_prompt(prefix: str = PREFIX) -> str:
    """Qwen's repository-level FIM layout, as Continue fills it."""
    return (f"<|repo_name|>demo\n<|file_sep|>src/util.py\n{FILE}<|file_sep|>src/app.py\n"
            f"<|fim_prefix|>{prefix}<|fim_suffix|>{SUFFIX}<|fim_middle|>")  # fmt: skip


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def autocomplete(client: openai.OpenAI, prompt: str, stop: list[str] = STOPS, **extra: Any) -> Any:
    """The request Continue sends: no max_tokens, a stream with usage last."""
    return client.completions.create(model="m", prompt=prompt, stop=stop, temperature=0, stream=True,
                                     stream_options={"include_usage": True}, **extra)  # fmt: skip


def streamed(stream: Any) -> tuple[str, str | None, Any]:
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    return text, finish[-1] if finish else None, chunks[-1].usage


def test_continue_stop_list_fits() -> None:
    assert len(STOPS) <= MAX_STOP


def test_special_token_text_is_parsed_as_special_tokens(client: openai.OpenAI, server: LiveServer) -> None:
    if any(len(server.engine.tokenize(s)) != 1 for s in SPECIAL[1:7]):
        pytest.skip("this test model's vocabulary lacks Qwen's FIM tokens")
    bos = int(server.engine.info.add_bos)
    *_, usage = streamed(autocomplete(client, "".join(SPECIAL[1:7]), max_tokens=1))
    assert usage.prompt_tokens == 6 + bos  # one token each, not their characters
    *_, usage = streamed(autocomplete(client, fim_prompt(), max_tokens=1))
    assert usage.prompt_tokens == len(server.engine.tokenize(fim_prompt()))


def test_default_length_and_stop_strings(client: openai.OpenAI) -> None:
    text, finish, usage = streamed(autocomplete(client, fim_prompt()))
    assert usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions
    if finish == "length":
        assert usage.completion_tokens == 16
    # Unstopped, then with the stop list: the answer ends right before the first stop string.
    full, _, _ = streamed(autocomplete(client, fim_prompt(), stop=[], max_tokens=64))
    stops = STOPS if any(s in full for s in STOPS) else [*STOPS[:-1], full[len(full) // 2 :][:3]]
    cut = min(full.find(s) for s in stops if s in full)
    text, finish, _ = streamed(autocomplete(client, fim_prompt(), stop=stops, max_tokens=64))
    assert (text, finish) == (full[:cut], "stop")


def test_aborted_stream_frees_the_engine_for_the_next_keystroke(client: openai.OpenAI, server: LiveServer) -> None:
    engine = server.engine
    # The aborted request must still be generating when it is dropped: end-of-turn and the special
    # tokens its stop strings name are banned, so only max_tokens (LONG) or the abort can end it.
    bias = {**no_eog_bias(engine), **{str(t): -100.0 for s in SPECIAL for t in engine.tokenize(s)[-1:]}}
    before = engine.stats()
    stream = autocomplete(client, fim_prompt(), stop=SPECIAL, max_tokens=LONG, logit_bias=bias)
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    assert engine.stats().busy
    stream.close()  # the next keystroke: Continue aborts the request

    nxt = autocomplete(client, fim_prompt(PREFIX + "r"))
    first = next(iter(nxt))  # the next request is being served: the aborted one has ended...
    at_start = engine.stats()
    assert at_start.cancellations == before.cancellations + 1  # ... because it was cancelled
    assert at_start.queue_depth == 0
    text, _, usage = streamed(nxt)
    assert first.choices and usage.completion_tokens <= 16
    after = engine.stats()
    aborted_tokens = after.generated_tokens - before.generated_tokens - usage.completion_tokens
    assert 3 <= aborted_tokens < LONG  # stopped early, not run to its limit behind the new request

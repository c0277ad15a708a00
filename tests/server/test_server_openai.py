"""The whole path (GGUF -> llama.cpp -> HTTP) through the OpenAI Python SDK, greedy decoding."""

from __future__ import annotations

import asyncio
import json
import random

import openai
import pytest

from tests.server.conftest import LiveServer

MESSAGES = [{"role": "user", "content": "Write a Python function that adds two numbers."}]


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def greedy(client: openai.OpenAI, **kwargs: object) -> openai.types.chat.ChatCompletion:
    args = {"model": "m", "messages": MESSAGES, "temperature": 0, "max_tokens": 12, **kwargs}
    return client.chat.completions.create(**args)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["model"]  # the GGUF's file name without .gguf
    assert models[0].owned_by == "coder-serve"


def test_models_retrieve_answers_for_the_served_model_only(client: openai.OpenAI) -> None:
    card = client.models.retrieve("model")
    assert card.id == "model" and card.object == "model" and card.owned_by == "coder-serve"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    assert info.value.body["code"] == "model_not_found" and "gpt-4o" in info.value.body["message"]


def test_chat_completion_counts_tokens_exactly(client: openai.OpenAI, server: LiveServer) -> None:
    out = greedy(client)
    choice = out.choices[0]
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    template = server.app.state.server.template()
    prompt_tokens = len(server.engine.tokenize(template.render(MESSAGES)))
    assert out.usage.prompt_tokens == prompt_tokens
    if choice.finish_reason == "length":
        assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streaming_matches_the_whole_answer_and_reports_usage_last(client: openai.OpenAI) -> None:
    whole = greedy(client)
    chunks = list(greedy(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_streaming_without_include_usage_sends_no_usage(client: openai.OpenAI) -> None:
    chunks = list(greedy(client, stream=True))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.usage is None for c in chunks)


def test_stop_string_ends_the_answer_before_it(client: openai.OpenAI) -> None:
    full = greedy(client, max_tokens=20).choices[0].message.content
    assert len(full) > 6
    stop = full[3:6]
    out = greedy(client, max_tokens=20, stop=[stop, "\x00never"])
    assert out.choices[0].message.content == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in greedy(client, max_tokens=20, stop=stop, stream=True)
                       if c.choices)
    assert streamed == full[: full.index(stop)]


def test_max_completion_tokens_limits_the_answer(client: openai.OpenAI, server: LiveServer) -> None:
    bias = {t: -100 for t in server.engine.info.eog_tokens}
    out = greedy(client, max_tokens=None, max_completion_tokens=3, logit_bias=bias)
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"


def test_logprobs_describe_the_greedy_choice(client: openai.OpenAI) -> None:
    out = greedy(client, max_tokens=4, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(t.token for t in content) == out.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token  # greedy picks the most likely token
        assert token.logprob <= 0 and token.bytes == list(token.token.encode())
        assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs), reverse=True)


def test_same_seed_same_sample(client: openai.OpenAI) -> None:
    a = greedy(client, temperature=1.0, top_p=1.0, seed=42, extra_body={"top_k": 0}).choices[0].message.content
    b = greedy(client, temperature=1.0, top_p=1.0, seed=42, extra_body={"top_k": 0}).choices[0].message.content
    assert a == b


def test_json_schema_response_format_forces_matching_json(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    out = greedy(client, max_tokens=40, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert out.choices[0].finish_reason == "stop"
    assert json.loads(out.choices[0].message.content)["answer"] in ("yes", "no")


@pytest.mark.parametrize("string_schema", [{"type": "string", "maxLength": 12}, {"type": "string", "pattern": "^a.{1,8}$"}])
def test_json_schema_strings_never_hold_raw_control_characters(client: openai.OpenAI, server: LiveServer,
                                                               string_schema: dict) -> None:
    # llama.cpp's schema converter lets any character but '"' and '\\' into a string, and '.' in a pattern
    # anything but a line break; a raw newline or tab inside a JSON string is not JSON.
    pushed = {str(t): 100 for text in ("\n", "\t", "\"x") for t in server.engine.tokenize(text)[:1]}
    schema = {"type": "object", "properties": {"code": string_schema}, "required": ["code"], "additionalProperties": False}
    out = greedy(client, max_tokens=40, logit_bias=pushed,
                 response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert out.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(out.choices[0].message.content)["code"], str)


def test_json_object_response_format_starts_an_object(client: openai.OpenAI) -> None:
    out = greedy(client, max_tokens=8, response_format={"type": "json_object"})
    text = out.choices[0].message.content
    assert text.lstrip().startswith(("{", "[")), text
    if out.choices[0].finish_reason == "stop":
        json.loads(text)


def test_completion_parses_special_tokens_in_the_prompt(client: openai.OpenAI, server: LiveServer) -> None:
    prompt = "<|fim_prefix|>def add(a, b):\n<|fim_suffix|>\n\nprint(add(1, 2))\n<|fim_middle|>"
    out = client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0)
    assert out.object == "text_completion"
    assert out.usage.prompt_tokens == len(server.engine.tokenize(prompt))
    assert server.engine.tokenize("<|fim_prefix|>") != server.engine.tokenize("<|fim_prefix")[:1]
    assert len(server.engine.tokenize("<|fim_prefix|>")) == 1  # a special token, not its characters
    with_suffix = client.completions.create(
        model="m", prompt="def add(a, b):\n", suffix="\n\nprint(add(1, 2))\n", max_tokens=8, temperature=0
    )
    assert with_suffix.choices[0].text == out.choices[0].text
    assert with_suffix.usage.prompt_tokens == out.usage.prompt_tokens


def test_tokenize_splits_at_special_tokens_as_llama_cpp_does(server: LiveServer) -> None:
    """The engine splits at special-token text itself (llama.cpp's split is quadratic in their number);
    the tokens must be llama.cpp's own, special texts next to each other, to text and to near-misses."""
    engine = server.engine
    assert engine._special_split is not None  # the demo vocabulary takes the fast path
    specials = list(engine._special_split[1])
    pieces = [*specials, "\n", " ", "  ", "def f(x):\n    return x\n", "é", "<|", "|>", "im_end", "\n\n", "日本"]
    rng = random.Random(7)
    texts = ["", "plain", "".join(f"<|im_start|>user\nx{i}<|im_end|>\n" for i in range(2000))]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(500)]
    for text in texts:
        want = engine._llama.tokenize(text.encode(), add_bos=engine.info.add_bos, special=True)
        assert engine.tokenize(text) == want, text


def test_fill_in_the_middle_keeps_marker_text_in_the_code_as_text(client: openai.OpenAI, server: LiveServer) -> None:
    """Code that mentions the markers (a tokenizer's source, this project's own) must not gain real ones."""
    prefix, suffix = 'MARK = "<|fim_suffix|>"\n', "\nprint(MARK)\n"
    engine = server.engine
    tokens = engine.fim_tokens(prefix, suffix)
    (mark,) = engine.tokenize("<|fim_suffix|>")
    assert tokens.count(mark) == 1 and engine.tokenize(f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}").count(mark) == 2
    out = client.completions.create(model="m", prompt=prefix, suffix=suffix, max_tokens=4, temperature=0)
    assert out.usage.prompt_tokens == len(tokens)


def test_completion_streaming_with_usage_and_logprobs(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="m", prompt="import os\n", max_tokens=6, temperature=0, logprobs=2)
    chunks = list(client.completions.create(model="m", prompt="import os\n", max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage == whole.usage and chunks[-1].choices == []
    lp = whole.choices[0].logprobs
    assert "".join(lp.tokens) == whole.choices[0].text
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def test_completion_echo_repeats_the_prompt(client: openai.OpenAI) -> None:
    plain = client.completions.create(model="m", prompt="x = 1\n", max_tokens=4, temperature=0)
    echoed = client.completions.create(model="m", prompt="x = 1\n", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "x = 1\n" + plain.choices[0].text


def test_tool_choice_required_yields_tool_calls(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}]
    out = greedy(client, max_tokens=60, tools=tools, tool_choice="required", parallel_tool_calls=False)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert "city" in json.loads(choice.message.tool_calls[0].function.arguments)
    chunks = list(greedy(client, max_tokens=60, tools=tools, tool_choice="required", parallel_tool_calls=False,
                         stream=True))
    assert any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    assert not any(c.choices and c.choices[0].delta.tool_calls and c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_chat_template_renders_off_the_event_loop(client: openai.OpenAI, server: LiveServer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    template = server.app.state.server.template()
    render, on_loop = template.render, []

    def recording(*args: object, **kwargs: object) -> str:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop in this thread: a worker thread
            on_loop.append(False)
        return render(*args, **kwargs)

    monkeypatch.setattr(template, "render", recording)
    greedy(client, max_tokens=2)
    assert on_loop and not any(on_loop)  # rendering a long conversation would stall every stream


def legacy_bytes(token: str) -> bytes:
    """The bytes a legacy-completions token names: its text, or "bytes:\\xNN..." for a piece of a character."""
    if token.startswith("bytes:"):
        return bytes(int(h, 16) for h in token[len("bytes:"):].split("\\x")[1:])
    return token.encode()


def test_completion_logprobs_place_every_token_in_the_text(client: openai.OpenAI) -> None:
    # Multi-byte characters come as several byte tokens; each offset is where its token's text begins.
    prompt = "# 注释：你好世界 😀 🚀 日本語のテキスト\n" * 6
    out = client.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0, logprobs=1)
    text, lp = out.choices[0].text, out.choices[0].logprobs
    pieces = [legacy_bytes(t) for t in lp.tokens]
    assert b"".join(pieces).decode("utf-8", "replace") == text
    starts = [len(b"".join(pieces[:i]).decode("utf-8", "ignore")) for i in range(len(pieces))]
    assert lp.text_offset == starts
    streamed = [lp for c in client.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0,
                                                       logprobs=1, stream=True) for lp in [c.choices[0].logprobs] if lp]
    assert [o for lp in streamed for o in lp.text_offset] == starts


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_takes_its_tokens_logprobs_with_it(client: openai.OpenAI, stream: bool) -> None:
    full = greedy(client, max_tokens=40).choices[0].message.content
    stop = full[len(full) // 3:len(full) // 3 + 12]  # long enough to span several tokens
    kwargs = {"max_tokens": 40, "stop": [stop], "logprobs": True}
    if stream:
        chunks = [c for c in greedy(client, stream=True, **kwargs) if c.choices]
        content = "".join(c.choices[0].delta.content or "" for c in chunks)
        tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content or []]
    else:
        choice = greedy(client, **kwargs).choices[0]
        content, tokens = choice.message.content, choice.logprobs.content
    assert content == full[:full.index(stop)]
    joined = b"".join(bytes(t.bytes) for t in tokens)
    assert joined.decode("utf-8", "replace").startswith(content)
    last_start = len(b"".join(bytes(t.bytes) for t in tokens[:-1]).decode("utf-8", "ignore"))
    assert last_start < len(content)  # no token that begins inside the stop string


def test_completion_stop_string_leaves_no_offset_past_the_text(client: openai.OpenAI) -> None:
    full = client.completions.create(model="m", prompt="def add(a, b):\n", max_tokens=30, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 4]
    out = client.completions.create(model="m", prompt="def add(a, b):\n", max_tokens=30, temperature=0, stop=[stop],
                                    logprobs=1)
    text, lp = out.choices[0].text, out.choices[0].logprobs
    assert text == full[:full.index(stop)]
    assert all(o < len(text) for o in lp.text_offset) and len(lp.tokens) == len(lp.text_offset)

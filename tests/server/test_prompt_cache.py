"""Prompt checkpoints for hybrid models: the pure parts (schedule, LRU pools, sizes), then the engine and
the HTTP server on real hybrid models, where every turn must give the same tokens and log-probabilities
with the cache as without it, also after an autocompletion and a cancelled request in between."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from pydantic import ValidationError

from quantizer.cli import main as coder_quant
from server.app import model_factory
from server.cli import build_parser, settings_from_args
from server.engine import Engine, GenerationParams
from server.events import Finished, TextDelta
from server.prompt_cache import PromptCache, Schedule, floor_point, last_turn_start
from server.sampler import SamplingParams
from server.settings import Settings
from server.templates import ChatTemplate
from tests.server.conftest import LiveServer, make_settings

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, presence_penalty=0.0,
                        frequency_penalty=0.0, repeat_last_n=64, seed=0)
SYSTEM = "You are a coding agent. Read files before you change them.\n" + "Keep answers short. " * 20
FIM = "<|fim_prefix|>def mean(values):\n    total = <|fim_suffix|>\n    return total / len(values)\n<|fim_middle|>"
MiB = 1 << 20

# ---- pure parts ----


def test_cache_ram_takes_sizes_and_zero() -> None:
    assert Settings(cache_ram="2GiB").cache_ram == 2 << 30
    assert Settings(cache_ram="512MiB").cache_ram == 512 * MiB
    assert Settings(cache_ram="1.5GB").cache_ram == 1_500_000_000
    assert settings_from_args(build_parser().parse_args(["--cache-ram", "0"])).cache_ram == 0
    assert Settings().cache_ram > 0  # on by default
    for bad in ("lots", "-1", "2 parsecs"):
        with pytest.raises(ValidationError):
            Settings(cache_ram=bad)
    assert PromptCache.create(0) is None


def test_a_prompts_points_are_the_points_of_every_prompt_that_extends_it() -> None:
    schedule = Schedule.for_context(n_batch=16, n_ubatch=4, split_tokens=[7])
    rng = random.Random(0)
    for _ in range(200):
        longer = [rng.choice([1, 2, 3, 7]) for _ in range(rng.randint(2, 60))]
        n = rng.randint(1, len(longer))
        shorter = longer[:n]
        assert schedule.points(shorter) == [p for p in schedule.points(longer) if p < n]
        start = rng.choice(schedule.points(longer))
        cuts = set(rng.sample(schedule.points(longer), min(2, len(schedule.points(longer)))))
        chunks = schedule.chunks(longer, start, cuts)
        assert chunks[0][0] == start and chunks[-1][1] == len(longer)
        assert all(b == c for (_, b), (c, _) in zip(chunks, chunks[1:], strict=False))  # contiguous
        assert all(0 < b - a <= 16 and a in schedule.points(longer) for a, b in chunks)  # each starts a micro-batch
        assert {c for c in cuts if c > start} <= {b for _, b in chunks}  # a snapshot point ends a chunk
    assert floor_point([0, 4, 9], 8) == 4 and floor_point([0, 4, 9], 9) == 9


def test_an_autocompletion_burst_does_not_evict_the_chat() -> None:
    cache = PromptCache(1000)  # chat 750 bytes guaranteed, completion 250
    for i in range(3):
        assert cache.put("chat", [1, 2, i], bytearray(200))
    for i in range(10):
        assert cache.put("completion", [9, i], bytearray(100))
    pools = cache.stats().pools
    assert pools["chat"].entries == 3 and pools["chat"].evictions == 0
    assert pools["completion"].bytes <= 1000 - 600 and pools["completion"].evictions > 0
    assert cache.put("chat", [1, 2, 3], bytearray(200))  # chat over its share now evicts completions first
    assert cache.stats().pools["chat"].entries == 4 and cache.stats().pools["completion"].bytes <= 250
    assert not cache.put("completion", [5], bytearray(251))  # larger than its share
    assert cache.find([1, 2, 1, 5], lengths=[3]).tokens == (1, 2, 1)
    assert cache.find([1, 2, 1, 5], lengths=[2]) is None  # no checkpoint of that length
    assert cache.find([1, 3, 1, 5], lengths=[3]) is None


def test_the_last_turn_starts_where_the_trailing_user_and_tool_messages_begin(qwen3_coder_template: str) -> None:
    template = ChatTemplate(qwen3_coder_template)
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"}, {"role": "tool", "content": "t1"}, {"role": "tool", "content": "t2"}]
    prompt = template.render(messages)
    encode = list  # characters stand in for tokens
    render = lambda m: template.render(m, add_generation_prompt=False)  # noqa: E731
    (at,) = last_turn_start(render, messages, prompt, encode(prompt), encode)
    assert prompt[at:].startswith("<|im_start|>user\n<tool_response>\nt1")
    first = template.render(messages[:2])
    (at,) = last_turn_start(render, messages[:2], first, encode(first), encode)
    assert first[at:] == "<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
    assert last_turn_start(render, messages[1:2], first, encode(first), encode) == ()  # nothing before the user turn
    assert last_turn_start(render, messages, "other text", encode("other text"), encode) == ()
    assert last_turn_start(render, messages, prompt, encode(prompt.upper()), encode) == ()  # tokens disagree


# ---- real hybrid models ----


@pytest.fixture(scope="module")
def synthetic_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quantizer.synthetic import write_checkpoint

    source = tmp_path_factory.mktemp("synthetic-hybrid")
    write_checkpoint(source, preset="tiny")
    out = source / "model.gguf"
    assert coder_quant(["build", str(source), str(out), "--quiet"]) == 0
    return out


@pytest.fixture(params=["test_gguf", "synthetic_gguf"])
def model(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


def started(gguf: Path, cache: PromptCache | None, **overrides: Any) -> Engine:
    engine = Engine(model_factory(make_settings(gguf, **overrides)), cache=cache)
    engine.start()
    assert engine.wait_loaded(120) == "ready"
    return engine


@pytest.fixture
def engines(model: Path) -> Iterator[tuple[Engine, Engine]]:
    on, off = started(model, PromptCache(64 * MiB)), started(model, None)
    yield on, off
    on.close()
    off.close()


async def run(engine: Engine, tokens: list[int], kind: str = "chat", checkpoints: tuple[int, ...] = (),
              max_tokens: int = 10) -> tuple[str, list[tuple[str, float]]]:
    params = GenerationParams(GREEDY, max_tokens=max_tokens, logprobs=True, top_logprobs=2)
    job = engine.submit(tokens, params, kind=kind, checkpoints=checkpoints)  # type: ignore[arg-type]
    text, logprobs = "", []
    async for event in job.events():
        if isinstance(event, TextDelta):
            text += event.text
            logprobs += [(lp.token, lp.logprob) for lp in event.logprobs]
        else:
            assert isinstance(event, Finished) and event.reason != "cancelled"
    return text, logprobs


async def cancelled_midway(engine: Engine, tokens: list[int]) -> None:
    """Submit a long generation and cancel it once it runs (inside the prompt or the generation)."""
    job = engine.submit(tokens, GenerationParams(GREEDY, max_tokens=200))
    while not engine.stats().busy and job.status == "waiting":
        await asyncio.sleep(0.001)
    job.cancel()
    async for _ in job.events():
        pass


def agent_turns(n: int) -> Iterator[list[dict[str, Any]]]:
    """A scripted agent conversation, one message list per turn. Replies are scripted, not what the model
    said, so the engine without a cache cannot continue a context that holds generated tokens (which
    llama.cpp evaluated one by one: its rounding may differ from a batch's) and evaluates each turn as a
    fresh context would."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": "The tests in stats.py fail. Fix them."}]
    for turn in range(n):
        yield list(messages)
        messages.append({"role": "assistant", "content": f"Reading file number {turn} first."})
        body = "\n".join(f"def helper_{turn}_{i}(values):\n    return sum(values) / {i + 1}" for i in range(12))
        messages.append({"role": "tool", "content": body})


def test_agent_turns_give_the_same_tokens_with_and_without_the_cache(engines: tuple[Engine, Engine]) -> None:
    on, off = engines
    template = ChatTemplate(on.info.chat_template)
    render = lambda m: template.render(m, add_generation_prompt=False)  # noqa: E731
    (message_start,) = on.tokenize("<|im_start|>")

    async def scenario() -> None:
        previous: list[int] = []
        for turn, messages in enumerate(agent_turns(5)):
            prompt = template.render(messages)
            tokens = on.tokenize(prompt)
            branch = last_turn_start(render, messages, prompt, tokens, on.tokenize)
            assert branch, "the last turn's start is found in the prompt's tokens"
            before_on = on.stats()
            with_cache = await run(on, tokens, checkpoints=branch)
            without = await run(off, tokens, checkpoints=branch)
            assert with_cache == without, f"turn {turn} differs"
            evaluated_on = on.stats().prompt_tokens_evaluated - before_on.prompt_tokens_evaluated
            if previous:  # the previous prompt's last message start (its generation prompt) is restored
                resumed = max(i for i, t in enumerate(previous) if t == message_start)
                assert tokens[:resumed] == previous[:resumed] and evaluated_on == len(tokens) - resumed
            previous = tokens
            for engine in (on, off):  # what an editor does between turns, in either order
                requests = [run(engine, engine.tokenize(FIM), kind="completion", max_tokens=4),
                            cancelled_midway(engine, tokens + engine.tokenize("More context. " * 30))]
                for request in requests[:: 1 if turn % 2 else -1]:
                    await request
        stats = on.stats().cache  # after a cancel the live state may serve instead of a checkpoint
        assert stats is not None and stats.pools["chat"].hits >= 2 and stats.pools["chat"].reused_tokens > 0

    asyncio.run(scenario())


def test_a_repeated_prompt_restores_its_checkpoint(test_gguf: Path) -> None:
    engine = started(test_gguf, PromptCache(64 * MiB))
    try:
        template = ChatTemplate(engine.info.chat_template)
        tokens = engine.tokenize(template.render(next(agent_turns(1))))

        async def twice() -> tuple[Any, Any, int]:
            first = await run(engine, tokens)
            before = engine.stats().prompt_tokens_evaluated
            second = await run(engine, tokens)
            return first, second, engine.stats().prompt_tokens_evaluated - before

        first, second, evaluated = asyncio.run(twice())
        assert first == second and 0 < evaluated < len(tokens)
    finally:
        engine.close()


def test_chat_checkpoints_survive_a_burst_of_autocompletion(test_gguf: Path) -> None:
    probe = started(test_gguf, PromptCache(64 * MiB))
    try:
        template = ChatTemplate(probe.info.chat_template)
        first, second = (probe.tokenize(template.render(m)) for m in agent_turns(2))
        code = "values = [1, 2, 3]\n" * 120
        files = [probe.tokenize(f"<|fim_prefix|># file {i}\n{code}<|fim_suffix|><|fim_middle|>") for i in range(8)]
        asyncio.run(run(probe, first))
        asyncio.run(run(probe, files[0], kind="completion", max_tokens=1))
        pools = probe.stats().cache.pools  # type: ignore[union-attr]
        one_chat, one_file = pools["chat"].bytes, pools["completion"].bytes
    finally:
        probe.close()
    assert one_chat > 0 and one_file > 0
    # chat's share holds 3 of its checkpoints, completion's 1.25 of its own; 8 files would fill it all
    engine = started(test_gguf, PromptCache(max(4 * one_chat, 5 * one_file)))
    try:
        async def scenario() -> int:
            await run(engine, first)
            for tokens in files:
                await run(engine, tokens, kind="completion", max_tokens=1)
            before = engine.stats().prompt_tokens_evaluated
            await run(engine, second)
            return engine.stats().prompt_tokens_evaluated - before

        evaluated = asyncio.run(scenario())
        stats = engine.stats().cache
        assert stats is not None and stats.pools["completion"].evictions > 0  # the burst filled its share
        assert stats.pools["chat"].evictions == 0 and stats.pools["chat"].hits == 1
        assert evaluated < len(second) - len(first) + 10
    finally:
        engine.close()


def test_cache_ram_zero_leaves_the_cache_off(test_gguf: Path) -> None:
    engine = started(test_gguf, PromptCache.create(0))
    try:
        assert not engine.caches_prompts and engine.stats().cache is None
    finally:
        engine.close()


# ---- through HTTP, with the OpenAI SDK ----

TOOLS = [{"type": "function", "function": {"name": "read_file", "description": "Read a file of the project",
                                            "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                                                           "required": ["path"]}}}]


def http_turns(n: int) -> Iterator[list[dict[str, Any]]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": "Why does stats.mean fail on empty lists?"}]
    for turn in range(n):
        yield list(messages)
        call = {"id": f"call_{turn}", "type": "function",
                "function": {"name": "read_file", "arguments": f'{{"path": "src/part{turn}.py"}}'}}
        messages.append({"role": "assistant", "content": "Let me read it.", "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": f"call_{turn}",
                         "content": "\n".join(f"def f{turn}_{i}(x):\n    return x * {i}" for i in range(15))})


def test_the_server_reuses_chat_checkpoints_with_identical_answers(start_server: Any, test_gguf: Path) -> None:
    on_engine = Engine(model_factory(make_settings(test_gguf)), cache=PromptCache(64 * MiB))
    off_engine = Engine(model_factory(make_settings(test_gguf)))
    try:
        on: LiveServer = start_server(engine=on_engine)
        off: LiveServer = start_server(engine=off_engine, cache_ram=0)
        answers = {}
        for name, live in (("on", on), ("off", off)):
            client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
            replies = []
            for messages in http_turns(4):
                reply = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, temperature=0,
                                                       max_tokens=8, logprobs=True, top_logprobs=2)
                replies.append((reply.choices[0].message.model_dump(), reply.choices[0].logprobs.model_dump()))
                client.completions.create(model="m", prompt=FIM, max_tokens=3, temperature=0)
                with client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=300,
                                                    stream=True) as stream:
                    next(iter(stream))  # leaves after the first chunk: the request is cancelled
            answers[name] = replies
        assert answers["on"] == answers["off"]
        metrics = on.client().get("/metrics").text
        assert 'coder_serve_prompt_cache_hits_total{kind="chat"}' in metrics
        stats = on.engine.stats()
        assert stats.cache is not None and stats.cache.pools["chat"].hits >= 3
        assert stats.prompt_tokens_evaluated < off.engine.stats().prompt_tokens_evaluated
    finally:
        on_engine.close()
        off_engine.close()

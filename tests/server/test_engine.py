"""The engine on a real llama.cpp model, without HTTP: prefix reuse, queueing, cancellation."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

from server.app import model_factory
from server.engine import Engine, GenerationParams
from server.errors import ContextLengthExceeded, InvalidRequest, ModelNotReady, QueueFull
from server.events import Finished, TextDelta
from server.sampler import SamplingParams
from tests.server.conftest import make_settings

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, presence_penalty=0.0,
                        frequency_penalty=0.0, repeat_last_n=64, seed=0)


@pytest.fixture(scope="module")
def engine(test_gguf: Path) -> Iterator[Engine]:
    e = Engine(model_factory(make_settings(test_gguf, ctx_size=1024)), max_queue=1)
    e.start()
    assert e.wait_loaded(120) == "ready"
    yield e
    e.close()


async def run(engine: Engine, tokens: list[int], max_tokens: int, **kw: object) -> tuple[str, Finished]:
    job = engine.submit(tokens, GenerationParams(GREEDY, max_tokens=max_tokens, **kw))
    text = ""
    async for event in job.events():
        if isinstance(event, TextDelta):
            text += event.text
        else:
            assert isinstance(event, Finished)
            return text, event
    raise AssertionError("no final event")


def test_an_extended_prompt_reuses_the_cached_prefix(engine: Engine, test_gguf: Path) -> None:
    head = engine.tokenize("def parse(text):\n")
    tail = engine.tokenize("    lines = text.split()\n")

    async def scenario() -> tuple[str, int]:
        await run(engine, head, 1)  # the context now holds `head` (a sampled token is never evaluated)
        before = engine.stats().prompt_tokens_evaluated
        text, _ = await run(engine, head + tail, 8)
        return text, engine.stats().prompt_tokens_evaluated - before

    text, evaluated = asyncio.run(scenario())
    assert evaluated == len(tail)
    fresh = Engine(model_factory(make_settings(test_gguf, ctx_size=1024)))
    fresh.start()
    try:
        assert fresh.wait_loaded(120) == "ready"
        assert asyncio.run(run(fresh, head + tail, 8))[0] == text  # same tokens as with no cache at all
    finally:
        fresh.close()


def test_a_changed_prompt_is_evaluated_again_correctly(engine: Engine) -> None:
    a, b = engine.tokenize("import os\n"), engine.tokenize("import sys\n")

    async def scenario() -> list[str]:
        return [(await run(engine, p, 6))[0] for p in (a, b, a, b)]

    first_a, first_b, again_a, again_b = asyncio.run(scenario())
    assert (first_a, first_b) == (again_a, again_b)


def test_stop_string_and_usage(engine: Engine) -> None:
    prompt = engine.tokenize("def add(a, b):\n")
    full, done = asyncio.run(run(engine, prompt, 10))
    assert done.usage.prompt_tokens == len(prompt) and done.usage.completion_tokens <= 10
    assert len(full) > 4, full  # text to cut a stop string from, so that case always runs
    cut, done = asyncio.run(run(engine, prompt, 10, stop=(full[2:4],)))
    assert cut == full[: full.index(full[2:4])] and done.reason == "stop"


def test_the_context_never_runs_ahead_of_the_generation(engine: Engine) -> None:
    """The next step may be queued before a token's text is handled, but only where no stop string can
    end the generation there: either way the context holds every generated token but the last."""
    prompt = engine.tokenize("def add(a, b):\n")
    full, done = asyncio.run(run(engine, prompt, 10))
    assert done.reason == "length" and engine._llama.n_tokens == len(prompt) + 9
    assert len(full) > 4, full  # text to cut a stop string from, so that case always runs
    _, done = asyncio.run(run(engine, prompt, 10, stop=(full[2:4],)))
    assert done.reason == "stop" and engine._llama.n_tokens == len(prompt) + done.usage.completion_tokens - 1


def test_admission_checks(engine: Engine) -> None:
    async def scenario() -> None:
        with pytest.raises(InvalidRequest):
            engine.submit([], GenerationParams(GREEDY, max_tokens=1))
        with pytest.raises(ContextLengthExceeded):
            engine.submit([1] * 1000, GenerationParams(GREEDY, max_tokens=engine.info.n_ctx))
        prompt = engine.tokenize("x = ")
        bias = tuple((t, -100.0) for t in engine.info.eog_tokens)
        sampling = SamplingParams(**{**GREEDY.__dict__, "logit_bias": bias})
        running = engine.submit(prompt, GenerationParams(sampling, max_tokens=500))
        while not engine.stats().busy:  # until the worker has taken it
            await asyncio.sleep(0.01)
        waiting = engine.submit(prompt, GenerationParams(GREEDY, max_tokens=1))
        with pytest.raises(QueueFull) as info:  # max_queue=1: one running, one waiting
            engine.submit(prompt, GenerationParams(GREEDY, max_tokens=1))
        assert info.value.retry_after >= 1
        before = engine.stats().cancellations
        waiting.cancel()
        assert engine.stats().queue_depth == 0 and engine.stats().cancellations == before + 1
        running.cancel()
        events = [e async for e in running.events()]
        assert isinstance(events[-1], Finished) and events[-1].reason == "cancelled"
        assert events[-1].usage.completion_tokens < 500

    asyncio.run(scenario())


def test_a_vanishing_temperature_decodes_greedily(engine: Engine) -> None:
    prompt = engine.tokenize("def f(")
    tiny = SamplingParams(**{**GREEDY.__dict__, "temperature": 1e-38, "seed": 3})
    greedy_text, _ = asyncio.run(run(engine, prompt, 5))
    job_text = asyncio.run(_run_with(engine, prompt, tiny))
    assert job_text == greedy_text


async def _run_with(engine: Engine, prompt: list[int], sampling: SamplingParams) -> str:
    job = engine.submit(prompt, GenerationParams(sampling, max_tokens=5))
    return "".join([e.text async for e in job.events() if isinstance(e, TextDelta)])


def test_every_computation_runs_on_the_engine_thread(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second thread that computes gives llama.cpp a second OpenMP team, and with more OpenMP threads than
    CPUs libgomp barely spins between computations (server.engine.Engine.run_exclusive): prompts,
    generation and work handed to run_exclusive all decode on the engine's one thread."""
    threads: list[int] = []
    decode = llama_cpp.llama_cpp.llama_decode  # the binding Llama and its context call

    def recording_decode(ctx: object, batch: object) -> int:
        threads.append(threading.get_ident())
        return decode(ctx, batch)

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_decode", recording_decode)
    prompt = engine.tokenize("def mean(values):\n")
    asyncio.run(run(engine, prompt, 4))

    def raw(llama: object) -> int:
        llama.reset()  # type: ignore[attr-defined]
        llama.eval(prompt[:3])  # type: ignore[attr-defined]
        llama.reset()  # type: ignore[attr-defined]
        return threading.get_ident()

    engine_thread = engine.run_exclusive(raw, timeout=60)
    assert len(threads) >= 5 and set(threads) == {engine_thread} != {threading.get_ident()}


def test_run_exclusive_hands_back_results_and_errors(engine: Engine, test_gguf: Path) -> None:
    assert engine.run_exclusive(lambda llama: llama.n_ctx(), timeout=60) == engine.info.n_ctx

    def failing(llama: object) -> None:
        raise ValueError("from the caller's function")

    with pytest.raises(ValueError, match="caller's function"):
        engine.run_exclusive(failing, timeout=60)
    prompt = engine.tokenize("x = ")
    assert asyncio.run(run(engine, prompt, 3))[1].usage.completion_tokens == 3  # the engine still serves

    async def busy_engine() -> None:  # work that times out while a request runs is withdrawn, never run
        bias = tuple((t, -100.0) for t in engine.info.eog_tokens)
        running = engine.submit(prompt, GenerationParams(SamplingParams(**{**GREEDY.__dict__, "logit_bias": bias}),
                                                         max_tokens=400))
        while not engine.stats().busy:
            await asyncio.sleep(0.01)
        ran: list[bool] = []
        with pytest.raises(concurrent.futures.TimeoutError):
            engine.run_exclusive(ran.append, timeout=0.01)
        running.cancel()
        [e async for e in running.events()]
        assert engine.run_exclusive(lambda llama: "after", timeout=60) == "after" and ran == []

    asyncio.run(busy_engine())
    closed = Engine(model_factory(make_settings(test_gguf, ctx_size=256)))
    closed.start()
    assert closed.wait_loaded(120) == "ready"
    closed.close()
    with pytest.raises(ModelNotReady):
        closed.run_exclusive(lambda llama: None, timeout=60)


def test_close_fails_queued_exclusive_work_and_skips_withdrawn_work(test_gguf: Path) -> None:
    engine = Engine(model_factory(make_settings(test_gguf, ctx_size=512)))
    engine.start()
    assert engine.wait_loaded(120) == "ready"

    async def scenario() -> None:
        prompt = engine.tokenize("x = ")
        bias = tuple((t, -100.0) for t in engine.info.eog_tokens)
        engine.submit(prompt, GenerationParams(SamplingParams(**{**GREEDY.__dict__, "logit_bias": bias}),
                                               max_tokens=400))
        while not engine.stats().busy:
            await asyncio.sleep(0.01)
        with pytest.raises(concurrent.futures.TimeoutError):  # withdrawn, but still in the queue
            engine.run_exclusive(lambda llama: None, timeout=0.01)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(engine.run_exclusive, lambda llama: "ran", 60)
            while len(engine._calls) < 2:
                await asyncio.sleep(0.01)
            engine.close()  # must not trip over the withdrawn call
            with pytest.raises(ModelNotReady):
                waiting.result(60)

    asyncio.run(scenario())

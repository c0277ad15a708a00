"""/v1/completions: a raw prompt (special-token text parsed as special tokens) or fill-in-the-middle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from server.engine import Engine, Job
from server.errors import InvalidRequest
from server.events import Finished, TextDelta
from server.protocol import CompletionRequest
from server.responses import (
    SYSTEM_FINGERPRINT,
    Completion,
    CompletionChoice,
    completion_logprobs,
    dump,
    new_id,
    now,
    usage_model,
)
from server.settings import Settings
from server.streaming import DONE, sse_data, stream_error


@dataclass(frozen=True)
class CompletionTurn:
    model: str
    echo: str  # prompt text to repeat before the completion ("" unless echo is set)
    include_usage: bool
    logprobs: bool


async def start_completion(
    req: CompletionRequest, engine: Engine, settings: Settings, model: str
) -> tuple[Job, CompletionTurn]:
    info = engine.info
    params = req.to_generation(settings, info.n_vocab)
    text, fim = req.prompt_text(), req.fill_in_middle()
    if fim is not None:
        tokens = await run_in_threadpool(engine.fim_tokens, *fim)
        echo = text if req.echo else ""
    elif text is None:
        tokens = list(req.prompt)  # token ids
        if any(t >= info.n_vocab for t in tokens):
            raise InvalidRequest(f"prompt token ids must be below {info.n_vocab}", param="prompt")
        echo = ""
        if req.echo:
            echo = b"".join(engine.piece(t) for t in tokens).decode("utf-8", errors="replace")
    else:
        tokens = await run_in_threadpool(engine.tokenize, text)
        echo = (req.prompt[0] if isinstance(req.prompt, list) else req.prompt) if req.echo else ""
    job = engine.submit(tokens, params)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return job, CompletionTurn(model, echo, include_usage, params.logprobs)


def _completion(turn: CompletionTurn, cid: str, created: int, choice: CompletionChoice, usage: Any = None) -> Completion:
    extra = {"usage": usage} if usage is not None else {}
    return Completion(
        id=cid, created=created, model=turn.model, choices=[choice], system_fingerprint=SYSTEM_FINGERPRINT, **extra
    )


async def complete_text(job: Job, turn: CompletionTurn) -> dict[str, Any]:
    text, logprobs, final = await job.result()
    choice = CompletionChoice(
        finish_reason=final.reason,
        index=0,
        logprobs=completion_logprobs(logprobs, len(turn.echo)) if turn.logprobs else None,
        text=turn.echo + text,
    )
    return dump(_completion(turn, new_id("cmpl"), now(), choice, usage_model(final.usage)))


async def stream_text(job: Job, turn: CompletionTurn) -> AsyncIterator[dict[str, str]]:
    cid, created = new_id("cmpl"), now()

    def chunk(text: str, finish: str | None = None, logprobs: Any = None) -> dict[str, str]:
        choice = CompletionChoice(finish_reason=finish, index=0, logprobs=logprobs, text=text)
        return sse_data(dump(_completion(turn, cid, created, choice)))

    try:
        if turn.echo:
            yield chunk(turn.echo)
        async for event in job.events():
            if isinstance(event, TextDelta):
                lp = completion_logprobs(event.logprobs, len(turn.echo)) if turn.logprobs else None
                yield chunk(event.text, logprobs=lp)
            elif isinstance(event, Finished) and event.reason != "cancelled":
                yield chunk("", finish=event.reason)
                if turn.include_usage:
                    final = Completion(
                        id=cid, created=created, model=turn.model, choices=[],
                        system_fingerprint=SYSTEM_FINGERPRINT, usage=usage_model(event.usage),
                    )
                    yield sse_data(dump(final))
            else:
                yield stream_error("The generation failed")
        yield sse_data(DONE)
    finally:
        job.cancel()

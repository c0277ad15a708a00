"""/v1/chat/completions: messages -> prompt -> engine job -> OpenAI completion or chunk stream.

All generated text passes through the tool-call parser (server.toolcalls): streamed through a
StreamParser, whole through parse_turn. A chunk carries content or tool calls, never both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from starlette.concurrency import run_in_threadpool

from server import toolcalls
from server.engine import Engine, GenerationParams, Job
from server.errors import InvalidRequest
from server.events import Finished, TextDelta, TokenLogprob
from server.prompt_cache import last_turn_start
from server.protocol import ChatCompletionRequest
from server.responses import (
    SYSTEM_FINGERPRINT,
    AssistantMessageOut,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChoiceDelta,
    ChunkChoice,
    DeltaFunction,
    DeltaToolCall,
    ToolCallOut,
    chat_logprobs,
    dump,
    new_id,
    now,
    usage_model,
)
from server.sampler import GrammarError
from server.settings import Settings
from server.streaming import DONE, sse_data, stream_error
from server.templates import ChatTemplate, TemplateError


@dataclass(frozen=True)
class ChatTurn:
    """What the response needs besides the job."""

    model: str
    tools: list[dict[str, Any]] | None
    include_usage: bool
    logprobs: bool


async def start_chat(
    req: ChatCompletionRequest, engine: Engine, template: ChatTemplate, settings: Settings, model: str
) -> tuple[Job, ChatTurn]:
    """Validate, render, tokenize and admit a chat request (every failure here is an HTTP error)."""
    info = engine.info
    params = req.to_generation(settings, info.n_vocab)
    tools = req.tool_dicts()
    await _check_grammar(engine, params, "response_format" if req.response_format else "tool_choice")
    # Off the event loop: a long conversation takes seconds to convert and render, and every other
    # client's stream would stall meanwhile.
    messages = await run_in_threadpool(req.message_dicts)
    try:
        prompt = await run_in_threadpool(partial(template.render, messages, tools=tools))
    except TemplateError as exc:
        raise InvalidRequest(str(exc), param="messages") from None
    tokens = await run_in_threadpool(engine.tokenize, prompt)
    checkpoints: tuple[int, ...] = ()
    if engine.caches_prompts:  # a checkpoint where the last user/tool messages start: a next turn branches there
        render = partial(template.render, tools=tools, add_generation_prompt=False)
        checkpoints = await run_in_threadpool(last_turn_start, render, messages, prompt, tokens, engine.tokenize)
    job = engine.submit(tokens, params, kind="chat", checkpoints=checkpoints)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return job, ChatTurn(model, tools, include_usage, params.logprobs)


async def _check_grammar(engine: Engine, params: GenerationParams, param: str) -> None:
    if params.grammar is None:
        return
    try:
        await run_in_threadpool(engine.check_grammar, params.grammar)
    except GrammarError:
        raise InvalidRequest("The requested output format could not be turned into a grammar", param=param) from None


async def complete_chat(job: Job, turn: ChatTurn) -> dict[str, Any]:
    """Run the job to the end and build one chat.completion."""
    text, logprobs, final = await job.result()
    parsed = toolcalls.parse_turn(text, turn.tools)
    calls = [ToolCallOut.model_validate(call) for call in parsed.tool_calls]
    message = AssistantMessageOut(content=parsed.content, tool_calls=calls) if calls else AssistantMessageOut(
        content=parsed.content
    )
    choice = ChatChoice(
        index=0,
        message=message,
        logprobs=chat_logprobs(logprobs) if turn.logprobs else None,
        finish_reason="tool_calls" if calls and final.reason == "stop" else final.reason,  # "length" wins
    )
    completion = ChatCompletion(
        id=new_id("chatcmpl"),
        created=now(),
        model=turn.model,
        choices=[choice],
        usage=usage_model(final.usage),
        system_fingerprint=SYSTEM_FINGERPRINT,
    )
    return dump(completion)


class _Chunks:
    """Builds the chunks of one streamed completion."""

    def __init__(self, turn: ChatTurn) -> None:
        self.turn = turn
        self.id, self.created = new_id("chatcmpl"), now()

    def make(self, delta: ChoiceDelta | None, *, finish: str | None = None, logprobs: Any = None) -> dict[str, str]:
        choices = []
        if delta is not None:
            choice = ChunkChoice(index=0, delta=delta, logprobs=logprobs, finish_reason=finish)
            choices.append(choice)
        # With include_usage, OpenAI sends "usage": null on every chunk but the last.
        extra: dict[str, Any] = {"usage": None} if self.turn.include_usage else {}
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.turn.model, choices=choices,
            system_fingerprint=SYSTEM_FINGERPRINT, **extra,
        )
        return sse_data(dump(chunk))


def _delta(event: toolcalls.Event) -> ChoiceDelta:
    if isinstance(event, toolcalls.ToolCallStart):
        call = DeltaToolCall(
            index=event.index, id=event.id, type="function", function=DeltaFunction(name=event.name, arguments="")
        )
        return ChoiceDelta(tool_calls=[call])
    if isinstance(event, toolcalls.ToolCallArgs):
        return ChoiceDelta(tool_calls=[DeltaToolCall(index=event.index, function=DeltaFunction(arguments=event.fragment))])
    return ChoiceDelta(content=event.text)


async def stream_chat(job: Job, turn: ChatTurn) -> AsyncIterator[dict[str, str]]:
    """SSE events of a streamed chat completion, ending with `data: [DONE]`."""
    chunks = _Chunks(turn)
    parser = toolcalls.StreamParser(turn.tools, enabled=bool(turn.tools))
    held: list[TokenLogprob] = []  # logprobs wait for the next content chunk
    started = False

    def emit(events: list[toolcalls.Event]) -> list[dict[str, str]]:
        nonlocal started
        out = []
        for event in events:
            if not started:  # like OpenAI: content "" opens a text answer, null one made of tool calls
                started = True
                opening = "" if isinstance(event, toolcalls.ContentDelta) else None
                out.append(chunks.make(ChoiceDelta(role="assistant", content=opening)))
            lp = None
            if isinstance(event, toolcalls.ContentDelta) and held and turn.logprobs:
                lp = chat_logprobs(held)
                held.clear()
            out.append(chunks.make(_delta(event), logprobs=lp))
        return out

    try:
        async for event in job.events():
            if isinstance(event, TextDelta):
                held.extend(event.logprobs)
                for item in emit(parser.feed(event.text)):
                    yield item
            elif isinstance(event, Finished) and event.reason != "cancelled":
                for item in emit(parser.close()):
                    yield item
                if not started:
                    yield chunks.make(ChoiceDelta(role="assistant", content=""))
                if held and turn.logprobs:
                    yield chunks.make(ChoiceDelta(), logprobs=chat_logprobs(held))
                reason = "tool_calls" if parser.has_tool_calls and event.reason == "stop" else event.reason
                yield chunks.make(ChoiceDelta(), finish=reason)
                if turn.include_usage:
                    final = ChatCompletionChunk(
                        id=chunks.id, created=chunks.created, model=turn.model, choices=[],
                        system_fingerprint=SYSTEM_FINGERPRINT, usage=usage_model(event.usage),
                    )
                    yield sse_data(dump(final))
            else:
                yield stream_error("The generation failed")
        yield sse_data(DONE)
    finally:
        job.cancel()

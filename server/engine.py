"""The engine: one llama.cpp model and context, a FIFO of requests, and the worker thread that drives them.

It knows nothing of HTTP. Requests are admitted with `submit()` (bounded queue), run one at a time in
arrival order, so a new request never interrupts one already streaming; `Job.cancel()` (a client gone)
stops a generation before its next decode step. Tokens are sampled and decoded one by one here rather
than through Llama.create_completion, to own cancellation, usage counts, stop strings and logprobs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Literal, TypeVar

import llama_cpp

from server.errors import (
    LOADING_RETRY_AFTER,
    ContextLengthExceeded,
    GenerationFailed,
    InvalidRequest,
    ModelNotReady,
    QueueFull,
)
from server.events import Event, Failed, Finished, TextDelta, TokenLogprob, Usage
from server.logprobs import token_logprob
from server.modelinfo import ModelInfo, context_message, describe, token_piece
from server.prompt_cache import CacheKind, CacheStats, PromptCache, PromptEvaluator
from server.sampler import SamplerChain, SamplingParams, check_grammar
from server.textstream import TextStream

log = logging.getLogger(__name__)

# Builds the model: returns the llama_cpp.Llama and a summary of where its tensors were placed.
ModelFactory = Callable[[], tuple[Any, dict[str, Any]]]
EngineState = Literal["idle", "loading", "ready", "failed", "closed"]
# Seconds between wake-ups of the event loop for one job's text: a model faster than this streams a
# chunk per interval instead of per token (the HTTP side then costs little); a slower one token by token.
WAKE_INTERVAL = 0.02
T = TypeVar("T")


@dataclass(frozen=True)
class GenerationParams:
    sampling: SamplingParams
    max_tokens: int | None = None  # None: until an end-of-generation token or the context is full
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # GBNF with a `root` rule
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass(frozen=True)
class EngineStats:
    state: EngineState
    busy: bool
    queue_depth: int  # requests waiting behind the running one
    completed: int
    cancellations: int
    prompt_tokens: int
    prompt_tokens_evaluated: int  # fewer than prompt_tokens when a cached prefix was reused
    generated_tokens: int
    prompt_seconds: float
    decode_seconds: float
    last_prompt_tps: float
    last_decode_tps: float
    cache: CacheStats | None = None  # prompt checkpoints; None when the cache is off


class Job:
    """One admitted request. The worker thread emits events; the event loop reads them."""

    def __init__(self, engine: Engine, tokens: Sequence[int], params: GenerationParams,
                 kind: CacheKind = "completion", checkpoints: Sequence[int] = ()) -> None:
        self.tokens = tuple(tokens)
        self.params = params
        self.kind = kind  # which share of the prompt cache its checkpoints go to
        self.checkpoints = tuple(checkpoints)  # prompt positions worth a checkpoint besides the end
        self.status: Literal["waiting", "running", "done"] = "waiting"
        self.cancel_requested = threading.Event()
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._pending: deque[Event] = deque()  # appended by the worker thread, drained by the event loop
        self._ready = asyncio.Event()
        self._woken_at = -math.inf

    def emit(self, event: Event) -> None:
        """Called from the worker thread; wakes the event loop for the first and last events, else at most
        once per WAKE_INTERVAL, so the worker neither waits on the loop nor makes it run once per token."""
        self._pending.append(event)
        now = time.monotonic()
        if isinstance(event, TextDelta) and now - self._woken_at < WAKE_INTERVAL:
            return
        self._woken_at = now
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancel_requested.set()

    async def events(self) -> AsyncIterator[Event]:
        """Events up to and including the final Finished or Failed; leaving early cancels the job.

        Text that arrived together (within WAKE_INTERVAL, or while the reader was busy with a slow
        client) comes as one merged delta: fewer, larger chunks.
        """
        finished = False
        try:
            while not finished:
                await self._ready.wait()
                self._ready.clear()
                texts: list[TextDelta] = []
                while self._pending:
                    event = self._pending.popleft()
                    if isinstance(event, TextDelta):
                        texts.append(event)
                        continue
                    if texts:
                        yield _merged(texts)
                        texts = []
                    finished = True
                    yield event
                    break
                if texts:
                    yield _merged(texts)
        finally:
            if not finished:
                self.cancel()

    async def result(self) -> tuple[str, list[TokenLogprob], Finished]:
        """Run to the end: all text, all logprobs and the final event (the non-streaming paths).
        A failed or cancelled generation raises GenerationFailed."""
        pieces: list[str] = []
        logprobs: list[TokenLogprob] = []
        final: Finished | Failed | None = None
        async for event in self.events():
            if isinstance(event, TextDelta):
                pieces.append(event.text)
                logprobs.extend(event.logprobs)
            else:
                final = event
        if not isinstance(final, Finished) or final.reason == "cancelled":
            raise GenerationFailed("The generation failed")
        return "".join(pieces), logprobs, final

    def cancel(self) -> None:
        self._engine.cancel(self)


def _merged(deltas: list[TextDelta]) -> TextDelta:
    if len(deltas) == 1:
        return deltas[0]
    return TextDelta("".join(d.text for d in deltas), tuple(lp for d in deltas for lp in d.logprobs))


class Engine:
    def __init__(self, factory: ModelFactory, *, max_queue: int = 16, cache: PromptCache | None = None) -> None:
        self._factory = factory
        self._cache = cache
        self._evaluator: PromptEvaluator | None = None
        self._max_queue = max_queue
        self._cond = threading.Condition()
        self._context_lock = threading.Lock()  # held while the llama.cpp context is in use
        self._waiting: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[Any], Any], Future[Any]]] = deque()  # run_exclusive's, run first
        self._active: Job | None = None
        self._state: EngineState = "idle"
        self._loaded = threading.Event()
        self._thread: threading.Thread | None = None
        self._llama: Any = None
        self._vocab: Any = None
        self._info: ModelInfo | None = None
        self._pieces: dict[int, bytes] = {}
        self._special_split: tuple[re.Pattern[str], dict[str, int]] | None = None  # see tokenize()
        self._counts = dict.fromkeys(
            ("completed", "cancellations", "prompt_tokens", "prompt_tokens_evaluated", "generated_tokens"), 0
        )
        self._seconds = {"prompt": 0.0, "decode": 0.0, "last_prompt_tps": 0.0, "last_decode_tps": 0.0}
        self._mean_job_seconds = 1.0

    # ---- lifecycle ----

    def start(self) -> None:
        """Load the model on the worker thread and start serving; returns at once."""
        with self._cond:
            if self._state != "idle":
                return
            self._state = "loading"
        self._thread = threading.Thread(target=self._run, name="coder-serve-engine", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float | None = None) -> EngineState:
        self._loaded.wait(timeout)
        return self._state

    def close(self) -> None:
        with self._cond:
            if self._state == "closed":
                return
            thread, self._state = self._thread, "closed"
            for job in (*self._waiting, *([self._active] if self._active else [])):
                job.cancel_requested.set()
            self._waiting.clear()
            calls, self._calls = list(self._calls), deque()
            self._cond.notify_all()
        for _, future in calls:
            if future.set_running_or_notify_cancel():  # not withdrawn by its caller's timeout
                future.set_exception(ModelNotReady("The model is not available"))
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._release_model()

    def _release_model(self) -> None:
        with self._context_lock:
            if self._llama is not None:
                self._llama.close()
                self._llama = None

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def caches_prompts(self) -> bool:
        """Whether prompts are checkpointed (the cache is on and the model has a recurrent state)."""
        return self._evaluator is not None and self._evaluator.cache is not None

    @property
    def info(self) -> ModelInfo:
        if self._state != "ready" or self._info is None:
            if self._state == "loading":
                raise ModelNotReady("The model is loading; retry shortly", retry_after=LOADING_RETRY_AFTER)
            raise ModelNotReady("The model is not available")
        return self._info

    # ---- request side (event loop) ----

    def tokenize(self, text: str) -> list[int]:
        """Text -> tokens, special-token text (e.g. <|fim_prefix|>) parsed as special tokens.

        llama.cpp's own splitting at special tokens takes time quadratic in their number (8,000 chat
        turns: 5.8 s on the VM; a 5 MB request would hold a core for half an hour), so the text is split
        here, in one regular-expression pass, and only the plain pieces go to llama.cpp. The tokens are
        the same (tested against llama.cpp's); vocabularies where they might not be take llama.cpp's way.
        """
        info = self.info
        if self._special_split is None:
            return list(self._llama.tokenize(text.encode("utf-8"), add_bos=info.add_bos, special=True))
        pattern, ids = self._special_split
        tokens = [llama_cpp.llama_vocab_bos(self._vocab)] if info.add_bos else []
        pos = 0
        for m in pattern.finditer(text):
            tokens += self._plain_tokens(text[pos:m.start()])
            tokens.append(ids[m.group()])
            pos = m.end()
        tokens += self._plain_tokens(text[pos:])
        return tokens

    def _plain_tokens(self, text: str) -> list[int]:
        return list(self._llama.tokenize(text.encode("utf-8"), add_bos=False, special=False)) if text else []

    def fim_tokens(self, prefix: str, suffix: str) -> list[int]:
        """The fill-in-the-middle layout, <|fim_prefix|>P<|fim_suffix|>S<|fim_middle|>, from the model's own
        FIM tokens, with the code tokenized as text: a marker written inside the code stays text."""
        info = self.info
        marks = [f(self._vocab) for f in (llama_cpp.llama_vocab_fim_pre, llama_cpp.llama_vocab_fim_suf,
                                          llama_cpp.llama_vocab_fim_mid)]
        if min(marks) < 0:
            raise InvalidRequest("This model has no fill-in-the-middle tokens", param="suffix")
        pre, suf, mid = marks
        bos = [llama_cpp.llama_vocab_bos(self._vocab)] if info.add_bos else []
        return [*bos, pre, *self._plain_tokens(prefix), suf, *self._plain_tokens(suffix), mid]

    def check_grammar(self, gbnf: str) -> None:
        self.info  # noqa: B018 - raises ModelNotReady before the vocabulary exists
        check_grammar(self._vocab, gbnf)

    def submit(self, tokens: Sequence[int], params: GenerationParams, *, kind: CacheKind = "completion",
               checkpoints: Sequence[int] = ()) -> Job:
        """Admit a request or raise QueueFull / ContextLengthExceeded / ModelNotReady. `kind` and
        `checkpoints` (token positions, e.g. where the last message starts) steer the prompt cache."""
        n_ctx = self.info.n_ctx
        if not tokens:
            raise InvalidRequest("The prompt is empty", param="prompt")
        if len(tokens) + (params.max_tokens or 1) > n_ctx:
            raise ContextLengthExceeded(context_message(n_ctx, len(tokens), params.max_tokens),
                                        param="messages" if kind == "chat" else "prompt")  # as OpenAI names it
        job = Job(self, tokens, params, kind, checkpoints)
        with self._cond:
            if self._state != "ready":
                raise ModelNotReady("The model is not available")
            pending = len(self._waiting) + (self._active is not None)
            if pending > self._max_queue:
                retry = max(1, min(60, math.ceil(self._mean_job_seconds * pending)))
                raise QueueFull(f"The server is busy ({pending} requests in progress); retry later", retry_after=retry)
            self._waiting.append(job)
            self._cond.notify_all()
        return job

    def run_exclusive(self, fn: Callable[[Any], T], timeout: float | None = None) -> T:
        """`fn(llama)` run on the engine's thread between two requests; returns what it returns.

        Everything that computes with the model must run on that one thread. llama.cpp's CPU backend
        computes on OpenMP thread teams, one per thread that starts a computation, and once two teams
        exist there are more OpenMP threads than CPUs: libgomp then lets idle workers spin only briefly,
        so each hand-over between the GPU's and the CPU's parts of a token waits for sleeping threads.
        On the 2-core development machine a second thread that had decoded once halved decoding speed.

        `fn` must leave the context empty (llama.reset()) or holding what it held. If `timeout` passes
        before `fn` has started, it is withdrawn; once started, it runs to its end.
        """
        future: Future[T] = Future()
        with self._cond:
            if self._state != "ready":
                raise ModelNotReady("The model is not available")
            self._calls.append((fn, future))
            self._cond.notify_all()
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
            future.cancel()
            raise

    def cancel(self, job: Job) -> None:
        with self._cond:
            if job.status == "done" or job.cancel_requested.is_set():
                return
            job.cancel_requested.set()
            self._counts["cancellations"] += 1
            if job.status == "waiting" and job in self._waiting:
                self._waiting.remove(job)
                job.status = "done"

    def stats(self) -> EngineStats:
        with self._cond:
            return EngineStats(
                state=self._state,
                busy=self._active is not None,
                queue_depth=len(self._waiting),
                completed=self._counts["completed"],
                cancellations=self._counts["cancellations"],
                prompt_tokens=self._counts["prompt_tokens"],
                prompt_tokens_evaluated=self._counts["prompt_tokens_evaluated"],
                generated_tokens=self._counts["generated_tokens"],
                prompt_seconds=self._seconds["prompt"],
                decode_seconds=self._seconds["decode"],
                last_prompt_tps=self._seconds["last_prompt_tps"],
                last_decode_tps=self._seconds["last_decode_tps"],
                cache=self._evaluator.cache.stats() if self._evaluator and self._evaluator.cache else None,
            )

    # ---- worker thread ----

    def _run(self) -> None:
        if not self._load():
            return
        while (job := self._next_job()) is not None:
            if not isinstance(job, Job):
                fn, future = job
                if future.set_running_or_notify_cancel():
                    try:
                        with self._context_lock:
                            future.set_result(fn(self._llama))
                    except Exception as exc:  # the caller's error, handed back to the caller
                        future.set_exception(exc)
                        self._llama.reset()  # what the context holds is unknown now
                continue
            started = time.perf_counter()
            final: Finished | Failed
            try:
                with self._context_lock:
                    final = self._generate(job)
            except Exception:
                log.exception("generation failed")
                final = Failed(Usage(len(job.tokens), 0))
                self._llama.reset()  # what the context holds is unknown now: start the next prompt afresh
            with self._cond:  # done before the client hears of it, so a late cancel() is a no-op
                self._active, job.status = None, "done"
                self._counts["completed"] += 1
                elapsed = time.perf_counter() - started
                self._mean_job_seconds = 0.8 * self._mean_job_seconds + 0.2 * elapsed
            job.emit(final)

    def _load(self) -> bool:
        try:
            llama, placement = self._factory()
            info = describe(llama, placement)
        except Exception as exc:  # one line; the traceback only when debugging
            log.error("the model failed to load: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
            with self._cond:
                self._state = "failed" if self._state == "loading" else self._state
            self._loaded.set()
            return False
        with self._cond:
            self._llama, self._vocab, self._info = llama, llama_cpp.llama_model_get_vocab(llama.model), info
            self._special_split = special_split(self._vocab, info.n_vocab, llama)
            self._evaluator = PromptEvaluator.for_model(llama, self._cache)
            if self._state == "loading":
                self._state = "ready"
        self._loaded.set()
        log.info("model ready: %s, context %d tokens", info.description, info.n_ctx)
        return self._state == "ready"

    def _next_job(self) -> Job | tuple[Callable[[Any], Any], Future[Any]] | None:
        with self._cond:
            while not self._waiting and not self._calls and self._state == "ready":
                self._cond.wait()
            if self._state != "ready":
                return None
            if self._calls:
                return self._calls.popleft()
            job = self._waiting.popleft()
            self._active, job.status = job, "running"
            return job

    def _evaluate_prompt(self, tokens: Sequence[int], stop: threading.Event, kind: CacheKind = "completion",
                         checkpoints: Sequence[int] = ()) -> int:
        """Bring the context to hold exactly `tokens`; returns how many tokens were evaluated. Checks `stop`
        between batches, so a cancelled request with a long prompt lets go of the engine early.

        The one place prompts are evaluated: server.prompt_cache reuses what the context holds or, for
        models with a recurrent state, restores a checkpoint (see PromptEvaluator).
        """
        if self._evaluator is None:
            raise ModelNotReady("The model is not available")
        return self._evaluator.evaluate(tokens, stop, kind, checkpoints)

    def _generate(self, job: Job) -> Finished:
        llama, p, info = self._llama, job.params, self._info
        n_prompt = len(job.tokens)
        t0 = time.perf_counter()
        if job.cancel_requested.is_set():
            return Finished("cancelled", Usage(n_prompt, 0))
        n_evaluated = self._evaluate_prompt(job.tokens, job.cancel_requested, job.kind, job.checkpoints)
        t1 = time.perf_counter()
        limit = info.n_ctx - n_prompt if p.max_tokens is None else min(p.max_tokens, info.n_ctx - n_prompt)
        text = TextStream(p.stop)
        logprobs: list[TokenLogprob] = []  # of tokens whose text has not been sent yet
        n_gen, reason = 0, "length"
        with SamplerChain(self._vocab, info.n_vocab, p.sampling, p.grammar) as sampler:
            while n_gen < limit:
                if job.cancel_requested.is_set():
                    reason = "cancelled"
                    break
                token = sampler.sample(llama.ctx)
                if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                    reason = "stop"
                    break
                n_gen += 1
                # llama_decode returns before the GPU finishes, so the next step can be queued before this
                # token's text is handled, and that work overlaps the GPU's. Only where nothing still to do
                # could end the generation (a stop string) or needs this step's logits (logprobs).
                queued = n_gen < limit and not p.stop and not p.logprobs
                if queued:
                    llama.eval([token])
                piece = self.piece(token)
                if p.logprobs:
                    lp = token_logprob(llama.ctx, info.n_vocab, token, p.top_logprobs, self.piece)
                    logprobs.append(replace(lp, offset=text.decoded))
                out = text.push(piece)
                ready: list[TokenLogprob] = []
                if logprobs:  # a logprob goes out with the text its token begins in; a stop string's never
                    ready = [lp for lp in logprobs if lp.offset < text.released]
                    logprobs = [] if text.stopped else logprobs[len(ready):]
                if out or ready:
                    job.emit(TextDelta(out, tuple(ready)))
                if text.stopped:
                    reason = "stop"
                    break
                if n_gen < limit and not queued:
                    llama.eval([token])
        tail = text.flush() if reason != "cancelled" else ""
        if tail or logprobs:
            job.emit(TextDelta(tail, tuple(logprobs)))
        self._record(n_prompt, n_evaluated, n_gen, t1 - t0, time.perf_counter() - t1)
        return Finished(reason, Usage(n_prompt, n_gen))

    def piece(self, token: int) -> bytes:
        """A token's bytes (cached)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = token_piece(self._vocab, token)
            self._pieces[token] = piece
        return piece

    def _record(self, n_prompt: int, n_evaluated: int, n_gen: int, prompt_s: float, decode_s: float) -> None:
        with self._cond:
            self._counts["prompt_tokens"] += n_prompt
            self._counts["prompt_tokens_evaluated"] += n_evaluated
            self._counts["generated_tokens"] += n_gen
            self._seconds["prompt"] += prompt_s
            self._seconds["decode"] += decode_s
            if prompt_s > 0:
                self._seconds["last_prompt_tps"] = n_evaluated / prompt_s
            if decode_s > 0 and n_gen > 1:
                self._seconds["last_decode_tps"] = (n_gen - 1) / decode_s


# llama.cpp splits text at tokens with these attributes (CONTROL and UNKNOWN only when asked to parse
# special tokens, as tokenize() does); LSTRIP / RSTRIP ones also eat the spaces around them.
_SPLIT_ATTRS = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
_STRIP_ATTRS = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP | llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
MAX_SPLIT_TOKENS = 4096  # the containment check below is quadratic in their number


def special_split(vocab: Any, n_vocab: int, llama: Any) -> tuple[re.Pattern[str], dict[str, int]] | None:
    """The special tokens' texts as one pattern (longest first, as llama.cpp tries them) and their ids;
    None where splitting here could differ from llama.cpp: stripping attributes, an end-of-sequence
    token added to every text, an empty or shared text, or one special text inside another."""
    if llama_cpp.llama_vocab_get_add_eos(vocab):
        return None
    ids: dict[str, int] = {}
    for token in range(n_vocab):
        attr = llama_cpp.llama_vocab_get_attr(vocab, token)
        if not attr & _SPLIT_ATTRS:
            continue
        if attr & _STRIP_ATTRS:
            return None
        text = llama.detokenize([token], special=True).decode("utf-8", errors="replace")
        if not text or text in ids:  # which of two tokens of one text llama.cpp takes is its own affair
            return None
        ids[text] = token
    texts = sorted(ids, key=len, reverse=True)
    if not texts or len(texts) > MAX_SPLIT_TOKENS or any(a != b and b in a for a in texts for b in texts):
        return None
    return re.compile("|".join(map(re.escape, texts))), ids

"""What the server adds to decoding, measured in one process on one loaded model.

bench/gpu.py sets HTTP figures beside raw llama_decode figures from a second process; decode speed
moves by about 10 % between two processes loading the same model on the same machine, more than
the 5 % this is meant to resolve. Here the model is loaded once: coder-serve's app runs under uvicorn
on a loopback port in this process, and rounds alternate between
  - raw: llama_decode on the server's own model object, one token at a time, as the engine calls it,
    on the engine's own thread between requests (Engine.run_exclusive), and
  - HTTP: a streamed /v1/completions request from a client in a separate process (so the client's
    Python does not compete with the server's), for N tokens and for one token with a prompt of the
    same length; decode speed = (N - 1) / the difference of the two request times.
Odd rounds run HTTP first, even rounds raw first. Reported: each round's figures and their ratio,
and the medians. The engine's own decode speed (from /metrics) is reported beside them: the gap
between it and HTTP is the HTTP side, the gap between raw and it is the engine's per-token work.

    python bench/http_overhead.py MODEL.gguf --out results/ --label attn -- --gpu-layers attn
    python bench/http_overhead.py MODEL.gguf --out results/ --label all --rounds 7 -- --gpu-layers all

Everything after `--` is passed to coder-serve's option parser (placement, threads, context size...).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import gpu  # bench/gpu.py: the HTTP client, prompts and machine facts shared with the placement benchmark

ROOT = gpu.ROOT


def client_main(spec: dict[str, Any]) -> dict[str, Any]:
    """One HTTP round, in its own process: a request for `decode` tokens, one for a single token."""
    port, model, vocab, n, seed = spec["port"], spec["model"], spec["vocab"], spec["prompt"], spec["seed"]
    long_run = gpu.stream_completion(port, model, gpu.prompt_ids(n, vocab, seed), spec["decode"])
    engine = gpu.engine_decode_tok_s(port)
    short_run = gpu.stream_completion(port, model, gpu.prompt_ids(n, vocab, seed + 1), 1)
    extra = long_run["total_s"] - short_run["total_s"]
    generated = long_run["completion_tokens"]
    return {"http_tok_s": (generated - 1) / extra if extra > 0 and generated > 1 else None,
            "engine_tok_s": engine, "completion_tokens": generated}


def raw_decode(llm: Any, prompt: list[int], steps: list[int]) -> float:
    """Decode speed of llama_decode alone, called as the engine calls it (Llama.eval, one token)."""
    import llama_cpp

    llm.reset()
    llm.eval(prompt)
    llama_cpp.llama_synchronize(llm._ctx.ctx)
    total = 0.0
    for token in steps:
        t0 = time.perf_counter()
        llm.eval([token])
        llama_cpp.llama_synchronize(llm._ctx.ctx)
        total += time.perf_counter() - t0
    llm.reset()  # the engine finds an empty context and evaluates its next prompt in full
    return len(steps) / total


class StepTimer:
    """Seconds the engine spends in one-token Llama.eval calls and in sampling, so that a gap between raw
    and engine speed can be split into llama.cpp's part (slower decode steps while the server runs) and
    the engine's own Python between the steps."""

    def __init__(self, llm: Any) -> None:
        from server.sampler import SamplerChain

        self.totals = {"eval_s": 0.0, "eval_n": 0, "sample_s": 0.0, "sample_n": 0}
        self.tokens: list[int] = []  # the decode steps' tokens, in order
        eval_step, sample = llm.eval, SamplerChain.sample

        def timed_eval(tokens: Any) -> None:
            t0 = time.perf_counter()
            eval_step(tokens)
            if len(tokens) == 1:  # decode steps only, not prompt chunks
                self.totals["eval_s"] += time.perf_counter() - t0
                self.totals["eval_n"] += 1
                self.tokens.append(int(tokens[0]))

        def timed_sample(chain: Any, ctx: Any) -> int:
            t0 = time.perf_counter()
            token = sample(chain, ctx)
            self.totals["sample_s"] += time.perf_counter() - t0
            self.totals["sample_n"] += 1
            return token

        llm.eval = timed_eval
        SamplerChain.sample = timed_sample

    def since(self, before: dict[str, float]) -> dict[str, float | None]:
        d = {k: self.totals[k] - before[k] for k in self.totals}
        return {"engine_eval_ms": 1e3 * d["eval_s"] / d["eval_n"] if d["eval_n"] else None,
                "engine_sample_ms": 1e3 * d["sample_s"] / d["sample_n"] if d["sample_n"] else None}


class InProcessServer:
    """coder-serve's app with its engine, under uvicorn on a thread; keeps a handle on the loaded model."""

    def __init__(self, serve_argv: list[str], port: int) -> None:
        from server.cli import build_parser, settings_from_args

        self.settings = settings_from_args(build_parser().parse_args([*serve_argv, "--port", str(port)]))
        if self.settings.pin_threads:  # as coder-serve does it: OpenMP's binding set before llama.cpp loads
            from server.affinity import pin_llama_threads

            pin_llama_threads()
        import uvicorn

        from server.app import create_app, model_factory
        from server.engine import Engine
        from server.prompt_cache import PromptCache

        self.port = port
        self.llm: Any = None
        self.summary: dict[str, Any] = {}
        load = model_factory(self.settings)

        def load_and_keep() -> tuple[Any, dict[str, Any]]:
            # On the engine's thread, as in coder-serve; raw decoding runs there too (Engine.run_exclusive):
            # a second thread computing would give llama.cpp a second OpenMP team, and with more OpenMP
            # threads than CPUs libgomp barely spins between computations, which slows both sides.
            self.llm, self.summary = load()
            self.timer = StepTimer(self.llm)
            return self.llm, self.summary

        self.engine = Engine(load_and_keep, max_queue=self.settings.max_queue,
                             cache=PromptCache.create(self.settings.cache_ram))
        app = create_app(self.settings, self.engine)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status, _ = gpu.http_get_json(self.port, "/health")
                if status == 200:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError("the server did not become ready in time")

    def raw(self, prompt: list[int], steps: list[int]) -> float:
        """raw_decode on the engine's thread, between requests."""
        return self.engine.run_exclusive(lambda llm: raw_decode(llm, prompt, steps))

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()


def http_round(srv: InProcessServer, cmd: list[str], timeout: float, prompt: list[int]) -> dict[str, Any]:
    """The client process's figures, with the engine's eval and sampling time over its requests, and raw
    decoding of the very tokens the engine generated after the same prompt (`prompt`: the long request's),
    which rules out that the tokens themselves (the experts they route to) make the difference."""
    before = dict(srv.timer.totals)
    srv.timer.tokens.clear()
    out = gpu.run_json(cmd, timeout) | srv.timer.since(before)
    generated = list(srv.timer.tokens)
    out["raw_same_tokens_tok_s"] = srv.raw(prompt, generated) if generated else None
    return out


def measure(args: argparse.Namespace, serve_argv: list[str]) -> dict[str, Any]:
    vocab = gpu.tokenizer_size(Path(args.model))
    port = gpu.free_port()
    with InProcessServer([args.model, "--host", "127.0.0.1", *serve_argv], port) as srv:
        srv.wait_ready(args.load_timeout)
        _, models = gpu.http_get_json(port, "/v1/models")
        model_id = models["data"][0]["id"]
        gpu.stream_completion(port, model_id, gpu.prompt_ids(32, vocab, 1), 4)  # warm-up
        srv.raw(gpu.prompt_ids(32, vocab, 2), gpu.prompt_ids(8, vocab, 3))
        rounds = []
        for r in range(args.rounds):
            seed = 1000 + 10 * r
            prompt, steps = gpu.prompt_ids(args.prompt, vocab, seed), gpu.prompt_ids(args.decode - 1, vocab, seed + 2)
            spec = {"port": port, "model": model_id, "vocab": vocab, "prompt": args.prompt, "decode": args.decode,
                    "seed": seed + 4}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--client", json.dumps(spec)]
            long_prompt = gpu.prompt_ids(args.prompt, vocab, spec["seed"])  # as client_main builds it
            if r % 2:
                http, raw = http_round(srv, cmd, args.load_timeout, long_prompt), srv.raw(prompt, steps)
            else:
                raw, http = srv.raw(prompt, steps), http_round(srv, cmd, args.load_timeout, long_prompt)
            row = {"round": r, "order": "http first" if r % 2 else "raw first", "raw_tok_s": raw, **http,
                   "http_over_raw": http["http_tok_s"] / raw if http["http_tok_s"] else None}
            row["engine_rest_ms"] = rest_ms(row)
            gpu.log(json.dumps(row))
            rounds.append(row)
        summary = srv.summary
        threads = {"decode": srv.llm.n_threads, "batch": srv.llm.context_params.n_threads_batch}
    medians = {k: median_of(x.get(k) for x in rounds)
               for k in ("raw_tok_s", "http_tok_s", "engine_tok_s", "http_over_raw", "engine_eval_ms",
                         "engine_sample_ms", "engine_rest_ms", "raw_same_tokens_tok_s")}
    return {"label": args.label, "machine": gpu.machine(), "model": args.model, "serve_args": serve_argv,
            "prompt": args.prompt, "decode": args.decode, "rounds": rounds, "median": medians,
            "placement": {k: summary.get(k) for k in ("preset_effective", "n_gpu_layers", "batch", "ubatch")},
            "threads": threads, "thread_binding": summary.get("thread_binding")}


def markdown(report: dict[str, Any]) -> str:
    # the rest's median from the rounds themselves, also for reports written before it was recorded
    m = {**report["median"], "engine_rest_ms": median_of(rest_ms(r) for r in report["rounds"])}
    lines = [f"# Decode through HTTP against raw llama_decode, one process: {report['label']}", "",
             f"Machine: {json.dumps(report['machine'])}",
             f"coder-serve arguments: `{' '.join(report['serve_args'])}`; prompt {report['prompt']} tokens, "
             f"{report['decode']} decoded; llama.cpp threads: {json.dumps(report.get('threads'))}, "
             f"bound: {report.get('thread_binding') or 'no'}", "",
             "| round | order | raw tok/s | raw, the engine's tokens | engine tok/s | HTTP tok/s | HTTP/raw "
             "| raw ms/token | engine: eval ms | sample ms | rest ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in [*report["rounds"], {"round": "median", "order": "", **m}]:
        lines.append(f"| {r['round']} | {r['order']} | {gpu.fmt(r['raw_tok_s'])} "
                     f"| {gpu.fmt(r.get('raw_same_tokens_tok_s'))} | {gpu.fmt(r['engine_tok_s'])} "
                     f"| {gpu.fmt(r['http_tok_s'])} | {gpu.fmt(r['http_over_raw'], 3)} | {split_ms(r)} |")
    lines += ["", "raw: random tokens after a random prompt; raw, the engine's tokens: the tokens the engine "
              "generated in that round's long request, after its prompt. "
              "raw ms/token: llama_decode and synchronize; the engine's eval (llama_decode; on a GPU it may return "
              "before the GPU is done), sample (waits for the logits) and the rest of its loop, per token."]
    return "\n".join(lines) + "\n"


def median_of(values: Any) -> float | None:
    """The median of the values that were measured; None when none was."""
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def rest_ms(row: dict[str, Any]) -> float | None:
    """The engine's time per token (from its own tok/s) less its eval and sample: its loop's own share."""
    engine, ev, sa = row.get("engine_tok_s"), row.get("engine_eval_ms"), row.get("engine_sample_ms")
    return 1e3 / engine - ev - sa if engine and ev is not None and sa is not None else None


def split_ms(row: dict[str, Any]) -> str:
    """raw ms/token | eval | sample | the rest of the engine's loop. The median row carries the median of
    the rounds' rests; rebuilding it from the other medians would mix rounds."""
    raw = row.get("raw_tok_s")
    rest = row["engine_rest_ms"] if "engine_rest_ms" in row else rest_ms(row)
    return " | ".join(gpu.fmt(v, 3) for v in (1e3 / raw if raw else None, row.get("engine_eval_ms"),
                                              row.get("engine_sample_ms"), rest))


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    serve_argv: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, serve_argv = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="GGUF to serve")
    p.add_argument("--out", help="folder for http-overhead-LABEL.json and .md")
    p.add_argument("--label", default="run")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens per request")
    p.add_argument("--decode", type=int, default=128, help="tokens decoded per request")
    p.add_argument("--load-timeout", type=float, default=900)
    p.add_argument("--client", help=argparse.SUPPRESS)  # internal: one HTTP round, JSON spec
    args = p.parse_args(argv)
    if not args.client and not (args.model and args.out):
        p.error("MODEL and --out are required")
    if not args.client and not Path(args.model).is_file():
        p.error(f"model file not found: {args.model}")
    if args.decode < 2:
        p.error("--decode must be at least 2")
    return args, serve_argv


def main(argv: list[str] | None = None) -> int:
    args, serve_argv = parse_args(argv)
    if args.client:
        print(json.dumps(client_main(json.loads(args.client))))
        return 0
    report = measure(args, serve_argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"http-overhead-{args.label}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"http-overhead-{args.label}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Agent turns with and without the prompt cache: time to first token per turn, side by side in one run.

    python bench/agent_turns.py [MODEL.gguf] [--turns 6] [--target-tokens 8192] [--threads 2] [--repeats 3]

A scripted agent conversation (system prompt, tool definitions, a task with a file attached, then per turn
a scripted assistant tool call and the tool's output) grows to about --target-tokens. Each turn goes over
HTTP to two server processes on loopback ports, one with the prompt cache (--cache-ram, default 4GiB)
and one without (0); between turns each also gets an autocompletion request, as from an editor. The
reference for each turn is the time llama.cpp takes to evaluate only that turn's new tokens (those past
the prompt it shares with the previous turn), measured in this process on a context already holding the
shared part, with the same settings. The assistant replies are scripted, so neither server holds a
context the next prompt extends: without the cache every turn is evaluated from the start.

Every figure is taken twice: wall time, and CPU time (of the server process from request to first
chunk; of this process around the evaluation), which other jobs on a shared machine disturb far less.

Without MODEL it builds the reference model (../shared/reference-model) with coder-quant, or, where that
is absent, the demo model. Each repeat uses a conversation of its own (no cross-repeat reuse); figures
are medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serve import free_port, wait_healthy  # noqa: E402
from server.settings import Settings  # noqa: E402

REFERENCE = ROOT.parent / "shared" / "reference-model"
HELDOUT = ROOT.parent / "shared" / "eval" / "heldout-code.txt"
TOOLS = [
    {"type": "function", "function": {"name": name, "description": doc, "parameters": {
        "type": "object", "properties": {arg: {"type": "string", "description": f"the {arg}"}}, "required": [arg]}}}
    for name, doc, arg in (
        ("read_file", "Read a file of the repository and return its text.", "path"),
        ("write_file", "Replace a file of the repository with new text.", "path"),
        ("run_tests", "Run the test suite, or the tests matching a pattern, and return the output.", "pattern"),
        ("search", "Search the repository for a regular expression and return matching lines.", "pattern"),
    )
]
SYSTEM = ("You are a coding agent working in a Python repository. Use the tools to read files before you change "
          "them, keep changes small, run the tests after every change and report what you did. " * 4)


def code_text() -> str:
    if HELDOUT.is_file():
        return HELDOUT.read_text()
    return "".join(f"def step_{i}(values, scale={i}):\n    return [v * scale + {i} for v in values]\n\n"
                   for i in range(4000))


class Tokens:
    """The model's tokenizer, for sizing the conversation (vocabulary only)."""

    def __init__(self, model: Path) -> None:
        import llama_cpp

        self.llama = llama_cpp.Llama(str(model), vocab_only=True, verbose=False)

    def count(self, text: str) -> int:
        return len(self.llama.tokenize(text.encode(), add_bos=False, special=True))

    def cut(self, text: str, n: int) -> str:
        return self.llama.detokenize(self.llama.tokenize(text.encode(), add_bos=False, special=True)[:n]).decode(
            "utf-8", errors="ignore")


def conversation(tok: Tokens, turns: int, target: int, repeat: int) -> list[list[dict[str, Any]]]:
    """One message list per turn; the first about half of `target` tokens long (instructions, tool
    definitions and the file the task is about), the last about `target`."""
    code = code_text()
    first_file = tok.cut(code[repeat * 2000:], target // 2 - 900)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": f"Session {repeat}. {SYSTEM}"},
        {"role": "user", "content": f"The tests of stats.py fail. Here is the file:\n```python\n{first_file}\n```"},
    ]
    per_turn = max(64, (target - target // 2) // max(1, turns - 1) - 70)
    out = [list(messages)]
    offset = 60000 + repeat * 100000
    for turn in range(1, turns):
        name = ("read_file", "run_tests", "search", "read_file", "run_tests")[(turn - 1) % 5]
        arg = "pattern" if name != "read_file" else "path"
        call = {"id": f"call_{turn}", "type": "function",
                "function": {"name": name, "arguments": json.dumps({arg: f"src/module_{turn}.py"})}}
        messages.append({"role": "assistant", "content": f"Step {turn}: let me look at module {turn}.",
                         "tool_calls": [call]})
        output = tok.cut(code[offset % max(1, len(code) - 40000):], per_turn)
        offset += 37000
        messages.append({"role": "tool", "tool_call_id": f"call_{turn}", "content": output})
        out.append(list(messages))
    return out


def autocomplete_prompt(turn: int) -> str:
    return (f"<|fim_prefix|>import math\n\n\ndef distance_{turn}(a, b):\n    dx = a[0] - b[0]\n    dy = "
            "<|fim_suffix|>\n    return math.hypot(dx, dy)\n<|fim_middle|>")


# ---- servers ----


def serve(args: argparse.Namespace) -> int:
    """Child mode: one server with an engine whose cache is set from --cache-ram."""
    import uvicorn

    from server.app import create_app, model_factory
    from server.engine import Engine
    from server.prompt_cache import PromptCache

    parent = os.getppid()

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(0)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    settings = Settings(model=args.model, ctx_size=args.ctx_size, threads=args.threads, cache_ram=args.cache_ram,
                        log_level="warning")
    engine = Engine(model_factory(settings), max_queue=settings.max_queue, cache=PromptCache.create(settings.cache_ram))
    uvicorn.run(create_app(settings, engine), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


def start_server(args: argparse.Namespace, model: Path, cache_ram: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, __file__, str(model), "--serve", "--port", str(port), "--cache-ram", cache_ram,
            "--ctx-size", str(args.ctx_size), "--threads", str(args.threads)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, wait_healthy(proc, port)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def first_token(client: httpx.Client, pid: int, messages: list[dict[str, Any]], max_tokens: int
                ) -> tuple[float, float, int]:
    """Request sent -> first streamed chunk (the first token's): wall seconds, the server's CPU seconds,
    and the prompt's token count."""
    body = {"model": "bench", "messages": messages, "tools": TOOLS, "temperature": 0, "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    cpu, start = cpu_seconds(pid), time.perf_counter()
    first = first_cpu = None
    usage = {}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                if first is None:
                    first, first_cpu = time.perf_counter(), cpu_seconds(pid)
                usage = json.loads(line[6:]).get("usage") or usage
    if first is None or first_cpu is None:
        raise SystemExit("bench: a reply had no chunks")
    return first - start, first_cpu - cpu, usage["prompt_tokens"]


# ---- the in-process reference: evaluating only the new tokens ----


class NewTokens:
    def __init__(self, model: Path, args: argparse.Namespace) -> None:
        from server.loader import open_model
        from server.templates import ChatTemplate

        settings = Settings(model=model, ctx_size=args.ctx_size, threads=args.threads)
        self.llama, _ = open_model(str(model), settings)
        self.template = ChatTemplate(self.llama.metadata.get("tokenizer.chat_template"))
        self.held: list[int] = []

    def tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.llama.tokenize(self.template.render(messages, tools=TOOLS).encode(), add_bos=False, special=True)

    def seconds(self, tokens: list[int], previous: list[int]) -> tuple[float, float, int]:
        """Wall and CPU seconds to evaluate the tokens past the prefix shared with `previous`, on a context
        holding it, and their number."""
        common = next((i for i, (a, b) in enumerate(zip(previous, tokens, strict=False)) if a != b),
                      min(len(previous), len(tokens)))
        common = min(common, len(tokens) - 1)
        if self.held[:common] != tokens[:common] or len(self.held) != common:
            self.llama.reset()
            if common:
                self.llama.eval(tokens[:common])
        cpu, start = time.process_time(), time.perf_counter()
        self.llama.eval(tokens[common:])
        elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - cpu
        self.held = list(tokens)
        return elapsed, elapsed_cpu, len(tokens) - common


def default_model(workdir: Path) -> Path:
    if (REFERENCE / "config.json").is_file():
        from quantizer.cli import main as coder_quant

        out = workdir / "reference.gguf"
        if coder_quant(["build", str(REFERENCE), str(out), "--quiet"]) != 0:
            raise SystemExit("bench: building the reference GGUF failed")
        return out
    from server.demo import ensure_demo_model

    return ensure_demo_model()


def run(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    tok = Tokens(model)
    local = NewTokens(model, args)
    servers = {name: start_server(args, model, ram) for name, ram in (("cache", args.cache_ram), ("no_cache", "0"))}
    rows: list[list[dict[str, float]]] = []
    load = [os.getloadavg()]
    try:
        clients = {name: httpx.Client(base_url=url, timeout=1200) for name, (_, url) in servers.items()}
        for repeat in range(args.repeats):
            previous: list[int] = []
            turns = []
            for turn, messages in enumerate(conversation(tok, args.turns, args.target_tokens, repeat)):
                tokens = local.tokens(messages)
                new_s, new_cpu, n_new = local.seconds(tokens, previous)
                previous = tokens
                row = {"turn": turn + 1, "prompt_tokens": len(tokens), "new_tokens": n_new, "new_tokens_s": new_s,
                       "new_tokens_cpu_s": new_cpu}
                order = ("cache", "no_cache") if (turn + repeat) % 2 else ("no_cache", "cache")
                for name in order:
                    proc = servers[name][0]
                    row[f"ttft_{name}_s"], row[f"ttft_{name}_cpu_s"], n = first_token(
                        clients[name], proc.pid, messages, args.max_tokens)
                    if n != len(tokens):
                        print(f"bench: warning: {name} saw {n} prompt tokens, expected {len(tokens)}", file=sys.stderr)
                    clients[name].post("/v1/completions", json={"model": "bench", "prompt": autocomplete_prompt(turn),
                                                                "max_tokens": 8, "temperature": 0})
                turns.append(row)
                print(json.dumps(row), file=sys.stderr)
            rows.append(turns)
            load.append(os.getloadavg())
        metrics = clients["cache"].get("/metrics").text
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(60)
    hits = [line for line in metrics.splitlines() if line.startswith("coder_serve_prompt_cache_")]
    return {"model": model.name, "turns": summary_rows(rows, statistics.median), "best": summary_rows(rows, min),
            "runs": rows, "repeats": args.repeats, "threads": args.threads,
            "ctx_size": args.ctx_size, "load_average": load, "cache_metrics": hits, "cpus": os.cpu_count()}


def summary_rows(rows: list[list[dict[str, float]]], pick: Any) -> list[dict[str, float]]:
    """Per turn, each figure over the repeats by `pick` (statistics.median, or min: the run least disturbed)."""
    out = []
    for per_turn in zip(*rows, strict=True):
        row = {key: pick(r[key] for r in per_turn) for key in per_turn[0]}
        for suffix in ("s", "cpu_s"):
            row[f"cache_over_new_tokens_{suffix}"] = row[f"ttft_cache_{suffix}"] / row[f"new_tokens_{suffix}"]
            row[f"speedup_{suffix}"] = row[f"ttft_no_cache_{suffix}"] / row[f"ttft_cache_{suffix}"]
        out.append(row)
    return out


def markdown(report: dict[str, Any], suffix: str, rows: str = "turns") -> str:
    """One table: wall times (suffix "s") or CPU times ("cpu_s"), medians ("turns") or best runs ("best")."""
    what = "CPU s" if suffix == "cpu_s" else "s"
    lines = [f"| turn | prompt tokens | new tokens | new tokens alone {what} | TTFT no cache {what} "
             f"| TTFT cache {what} | cache / new tokens | no cache / cache |", "|---|---|---|---|---|---|---|---|"]
    for r in report[rows]:
        lines.append(f"| {r['turn']:.0f} | {r['prompt_tokens']:.0f} | {r['new_tokens']:.0f} "
                     f"| {r[f'new_tokens_{suffix}']:.2f} | {r[f'ttft_no_cache_{suffix}']:.2f} "
                     f"| {r[f'ttft_cache_{suffix}']:.2f} | {r[f'cache_over_new_tokens_{suffix}']:.2f} "
                     f"| {r[f'speedup_{suffix}']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", type=Path, help="GGUF (default: the reference model, built here)")
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--target-tokens", type=int, default=8192, help="prompt tokens of the last turn, about")
    p.add_argument("--ctx-size", type=int, default=16384)
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads, in each process")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated per turn")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cache-ram", default="4GiB", help="the cached server's --cache-ram")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve(args)
    with tempfile.TemporaryDirectory() as tmp:
        report = run(args, args.model or default_model(Path(tmp)))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{report['model']}, {args.threads} threads, context {args.ctx_size}, median of {args.repeats}; "
              f"load average {report['load_average'][0][0]:.1f} at start, {report['load_average'][-1][0]:.1f} at end")
        for title, suffix, rows in (("Wall time, median", "s", "turns"), ("CPU time, median", "cpu_s", "turns"),
                                    ("Wall time, best run", "s", "best")):
            print(f"\n{title} of {args.repeats}\n")
            print(markdown(report, suffix, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

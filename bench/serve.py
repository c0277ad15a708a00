"""Server overhead: time to first token and decode speed through HTTP streaming, side by side with the
same GGUF driven in-process through llama-cpp-python, in one run. Reports medians and ratios.

    python bench/serve.py [MODEL.gguf] [--prompt-tokens 512] [--max-tokens 128] [--repeats 5] [--threads N]

Without MODEL it uses the demo model (built on first use). The server runs as a separate `coder-serve`
process on a loopback port; both sides load the GGUF through server.loader with the same settings, get
the same prompt text (distinct per repeat, so no side reuses a cached prefix), decode greedily and never
stop early (end-of-turn tokens are banned on the server and ignored in-process).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.demo import ensure_demo_model  # noqa: E402
from server.loader import open_model  # noqa: E402
from server.settings import Settings  # noqa: E402

CODE = (
    "def merge_sorted(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n"
    "            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n\n"
)


@dataclass(frozen=True)
class Run:
    ttft_s: float  # request sent (or generation started) -> first generated token received
    decode_tps: float  # tokens after the first, per second
    prompt_tokens: int
    completion_tokens: int


def prompt_text(llama, n_tokens: int, repeat: int) -> str:
    text = f"# run {repeat}\n"
    while len(llama.tokenize(text.encode(), add_bos=False, special=True)) < n_tokens:
        text += CODE
    tokens = llama.tokenize(text.encode(), add_bos=False, special=True)[:n_tokens]
    return llama.detokenize(tokens).decode("utf-8", errors="ignore")


def in_process(llama, text: str, max_tokens: int) -> Run:
    llama.reset()
    start = time.perf_counter()
    tokens = llama.tokenize(text.encode(), add_bos=False, special=True)
    stamps = []
    for _ in llama.generate(tokens, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == max_tokens:
            break
    return Run(stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(tokens), len(stamps))


def over_http(client: httpx.Client, text: str, max_tokens: int, bias: dict[str, float]) -> Run:
    # repeat_penalty 1.0 as in_process(): the server's default (1.05) adds a sampler pass over the whole
    # vocabulary per token, which would be measured as server overhead.
    body = {"model": "bench", "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": bias, "repeat_penalty": 1.0}
    start = time.perf_counter()
    first = last = None
    usage = {}
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
            usage = chunk.get("usage") or usage
    n = usage["completion_tokens"]
    # The server may merge text generated within a few ms into one chunk: the first chunk still holds
    # only the first token (it goes out at once), and the last one arrives as the generation ends.
    span = last - first
    return Run(first - start, (n - 1) / span if span > 0 else float("nan"), usage["prompt_tokens"], n)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "server.cli", str(model), "--port", str(port), "--ctx-size", str(args.ctx_size),
            "--log-level", "warning"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, wait_healthy(proc, port)


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 600) -> str:
    """The server's base URL once /health answers 200; kills it and exits when it does not in time."""
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("bench: a server did not become healthy")


def summarize(runs: list[Run]) -> dict[str, float]:
    return {"ttft_s": statistics.median(r.ttft_s for r in runs),
            "decode_tps": statistics.median(r.decode_tps for r in runs)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", type=Path, help="GGUF (default: the demo model)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ctx-size", type=int, default=4096)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args()
    model = args.model or ensure_demo_model()
    settings = Settings(model=model, ctx_size=args.ctx_size, threads=args.threads)
    llama, _ = open_model(str(model), settings)
    bias = {str(t): -100.0 for t in range(llama.n_vocab()) if _is_eog(llama, t)}
    proc, url = start_server(model, args)
    local: list[Run] = []
    remote: list[Run] = []
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            over_http(client, prompt_text(llama, 16, -1), 4, bias)  # warm-up, both sides
            in_process(llama, prompt_text(llama, 16, -1), 4)
            for i in range(args.repeats):
                text = prompt_text(llama, args.prompt_tokens, i)
                local.append(in_process(llama, text, args.max_tokens))
                remote.append(over_http(client, text, args.max_tokens, bias))
    finally:
        proc.terminate()
        proc.wait(60)
    if any(a.prompt_tokens != b.prompt_tokens for a, b in zip(local, remote, strict=True)):
        print("bench: warning: the two sides saw different prompt token counts", file=sys.stderr)
    report = {"model": model.name, "prompt_tokens": local[0].prompt_tokens, "max_tokens": args.max_tokens,
              "repeats": args.repeats, "threads": args.threads, "in_process": summarize(local),
              "http": summarize(remote)}
    report["ratio_http_over_in_process"] = {k: report["http"][k] / report["in_process"][k] for k in report["http"]}
    report["runs"] = {"in_process": [asdict(r) for r in local], "http": [asdict(r) for r in remote]}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{model.name}: prompt {report['prompt_tokens']} tokens, {args.max_tokens} generated, "
              f"median of {args.repeats}")
        print(f"{'':14}{'TTFT s':>10}{'decode tok/s':>14}")
        for side in ("in_process", "http"):
            print(f"{side:14}{report[side]['ttft_s']:>10.4f}{report[side]['decode_tps']:>14.1f}")
        ratio = report["ratio_http_over_in_process"]
        print(f"{'http / in-proc':14}{ratio['ttft_s']:>10.3f}{ratio['decode_tps']:>14.3f}")
    return 0


def _is_eog(llama, token: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llama.model), token))


if __name__ == "__main__":
    sys.exit(main())

"""How long one very large chat request holds up another client's stream, against a running coder-serve.

One client streams a long greedy answer; three seconds in, a second client posts a chat request of
`--messages` one-character messages (150,000 make a 5.5 MB body, under the default 8 MiB limit; it is
refused for the context, after being read, validated, rendered and tokenized). The figure is the
longest gap between the stream's chunks once the large request was sent, next to the stream's median
gap, in the same run.

    coder-serve MODEL.gguf --port 8080 &
    python bench/large_request.py --url http://127.0.0.1:8080 --messages 150000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from itertools import pairwise
from typing import Any

import httpx


def measure(url: str, messages: int, max_tokens: int = 3000, lead: float = 3.0) -> dict[str, Any]:
    streams: list[list[float]] = []  # arrival times of each stream's lines; streams follow one another
    done = threading.Event()
    body = {"model": "m", "messages": [{"role": "user", "content": "Write a long Python module."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True}

    def stream() -> None:
        while not done.is_set():  # an answer may end early: the next one keeps the stream going
            arrivals: list[float] = []
            streams.append(arrivals)
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if line:  # an event; the blank lines between events come with it
                        arrivals.append(time.perf_counter())

    reader = threading.Thread(target=stream)
    reader.start()
    time.sleep(lead)
    big = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(messages)]
    t0 = time.perf_counter()
    try:
        response = httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": big, "max_tokens": 1},
                              timeout=600)
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        reader.join()
    gaps = [(b - a, a) for arrivals in streams for a, b in pairwise(arrivals)]
    after = [(g, start) for g, start in gaps if start + g >= t0 and start <= t0 + seconds]
    worst, worst_start = max(after) if after else (0.0, t0)
    return {"messages": messages, "status": response.status_code, "request_s": round(seconds, 3),
            "chunks": sum(map(len, streams)),
            "median_gap_s": round(statistics.median(g for g, _ in gaps), 4) if gaps else None,
            "longest_gap_during_request_s": round(worst, 3), "gap_began_s_after_request": round(worst_start - t0, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8080", help="a running coder-serve")
    p.add_argument("--messages", type=int, default=150_000)
    p.add_argument("--max-tokens", type=int, default=3000, help="length of the streamed answer")
    args = p.parse_args(argv)
    if args.messages < 1 or args.max_tokens < 1:
        p.error("--messages and --max-tokens must be positive")
    try:
        result = measure(args.url.rstrip("/"), args.messages, args.max_tokens)
    except httpx.HTTPError as exc:
        p.error(f"{args.url}: {exc}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

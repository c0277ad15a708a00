"""Decode speed on one thread before and after a second, still living thread has computed with the model.

llama.cpp's CPU backend runs each computation on an OpenMP team, and libgomp keeps one team per thread
that starts computations, for as long as that thread lives. With two teams the process has more OpenMP
threads than CPUs, and libgomp then lets idle workers spin only briefly (its throttled spin count)
before they sleep, so every computation starts by waking them. coder-serve computes on its engine's
thread only (server.engine.Engine.run_exclusive); this shows what a second thread would cost.

    python bench/omp_teams.py MODEL.gguf [--tokens 128] [--rounds 5] [-- coder-serve flags, e.g. --threads N]

Side by side in one process: `--rounds` decodes of `--tokens` tokens by the main thread, then a second
thread decodes 4 tokens and stays alive, then `--rounds` decodes by the main thread again. Prints the
medians and their ratio. Run it again with GOMP_SPINCOUNT=100 in the environment to see a like loss
with one team.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import gpu  # noqa: E402  (bench/gpu.py: random prompts from the model's vocabulary)
from http_overhead import raw_decode  # noqa: E402  (llama_decode one token at a time, as the engine calls it)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args, serve = p.parse_args(argv[:cut]), argv[cut + 1:]  # after --: coder-serve flags (placement, threads)
    llm, summary = gpu.open_like_server(args.model, serve, p)
    vocab = gpu.tokenizer_size(Path(args.model))
    seeds = iter(range(10_000))

    def decode(n: int) -> float:  # a fresh random prompt and n random tokens after it
        return raw_decode(llm, gpu.prompt_ids(64, vocab, next(seeds)), gpu.prompt_ids(n, vocab, next(seeds)))

    decode(8)  # warm-up
    one_team = [decode(args.tokens) for _ in range(args.rounds)]
    computed, release = threading.Event(), threading.Event()

    def second_thread() -> None:
        decode(4)
        computed.set()
        release.wait()  # alive, so its OpenMP team stays

    threading.Thread(target=second_thread, daemon=True).start()
    computed.wait()
    two_teams = [decode(args.tokens) for _ in range(args.rounds)]
    release.set()
    a, b = statistics.median(one_team), statistics.median(two_teams)
    print(json.dumps({"model": args.model, "serve_args": serve, "threads": summary["threads"],
                      "cpus": os.cpu_count(), "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"),
                      "one_team_tok_s": [round(x, 1) for x in one_team],
                      "two_teams_tok_s": [round(x, 1) for x in two_teams],
                      "median_one_team": round(a, 1), "median_two_teams": round(b, 1), "ratio": round(b / a, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

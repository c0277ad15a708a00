"""Does decoding speed drift with the machine's memory bandwidth? Both measured in turn, in one process.

With experts in RAM, decoding is bounded by how fast the CPU reads them. When the bandwidth reading
and the decode rate are taken minutes apart, a machine whose memory speed drifts (a shared host)
makes their ratio noisy. This loads the model once, through server.loader with the server's defaults,
then alternates for `--seconds`: a read-bandwidth reading (numpy, one slice per thread, best of 2),
a fresh prompt, and `--decode` tokens decoded one by one. Every block's bandwidth, decode rate and
their ratio to the block's own bound go to drift.json and drift.md in --out.

    python bench/decode_drift.py MODEL.gguf --out results/ --seconds 240 --decode 128 -- --gpu-layers attn

Flags after `--` are coder-serve's own (placement, threads, batch sizes). Only the main thread
computes with the model, as in the server (see docs/benchmarks.md, "One thread computes").
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu  # noqa: E402
from gpu_levers import expert_bytes_per_token  # noqa: E402
from http_overhead import raw_decode  # noqa: E402  (llama_decode one token at a time, as the engine calls it)


class Reader:
    """One preallocated array, read by `threads` threads at once; the best of `repeats` passes."""

    def __init__(self, gib: float, threads: int) -> None:
        self.data = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
        self.slices = np.array_split(self.data, threads)

    def gb_s(self, repeats: int = 2) -> float:
        best = 0.0
        for _ in range(repeats):
            workers = [threading.Thread(target=np.sum, args=(s,)) for s in self.slices]
            t0 = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = max(best, self.data.nbytes / (time.perf_counter() - t0))
        return best / 1e9


def markdown(report: dict[str, Any]) -> str:
    blocks = report["blocks"]
    lines = [f"# Decode rate against read bandwidth, block by block ({Path(report['model']).name})", "",
             f"Machine: {json.dumps(report['machine'])}",
             f"Flags: {' '.join(report['flags'])}; {report['decode']} tokens a block after a "
             f"{report['prompt']}-token prompt; expert bytes per token {report['expert_bytes_per_token']:,}", "",
             "| block | s after load | read GB/s | bound tok/s | decode tok/s | of the bound |",
             "|---|---|---|---|---|---|"]
    for b in blocks:
        lines.append(f"| {b['block']} | {b['t_s']:.0f} | {b['gb_s']:.1f} | {b['bound_tok_s']:.1f} | "
                     f"{b['decode_tok_s']:.1f} | {100 * b['of_bound']:.1f} % |")
    if len(blocks) >= 2:
        s = report["summary"]
        lines += ["", f"Medians: read {s['gb_s_median']:.1f} GB/s, decode {s['decode_median']:.1f} tok/s, "
                  f"{100 * s['of_bound_median']:.1f} % of the block's bound; ranges {s['gb_s_min']:.1f}-"
                  f"{s['gb_s_max']:.1f} GB/s, {s['decode_min']:.1f}-{s['decode_max']:.1f} tok/s, "
                  f"{100 * s['of_bound_min']:.1f}-{100 * s['of_bound_max']:.1f} %. Correlation of decode rate "
                  f"with read bandwidth over the blocks: {s['correlation']:.2f}."]
    return "\n".join(lines) + "\n"


def summarize(blocks: list[dict[str, Any]]) -> dict[str, float]:
    gb = [b["gb_s"] for b in blocks]
    dec = [b["decode_tok_s"] for b in blocks]
    of = [b["of_bound"] for b in blocks]
    corr = float(np.corrcoef(gb, dec)[0, 1]) if len(blocks) >= 3 and np.std(gb) > 0 and np.std(dec) > 0 else 0.0
    return {"gb_s_median": statistics.median(gb), "gb_s_min": min(gb), "gb_s_max": max(gb),
            "decode_median": statistics.median(dec), "decode_min": min(dec), "decode_max": max(dec),
            "of_bound_median": statistics.median(of), "of_bound_min": min(of), "of_bound_max": max(of),
            "correlation": corr}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=240.0, help="stop starting blocks after this long")
    p.add_argument("--decode", type=int, default=128, help="tokens decoded per block")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens before each block's decoding")
    p.add_argument("--read-gib", type=float, default=4.0, help="size of the bandwidth reading's array")
    args = p.parse_args(argv)
    if args.decode < 1 or args.prompt < 1 or args.seconds <= 0 or args.read_gib <= 0:
        p.error("--decode, --prompt, --seconds and --read-gib must be positive")

    llm, summary = gpu.open_like_server(str(args.model), flags, p)
    vocab = gpu.tokenizer_size(args.model)
    per_token = expert_bytes_per_token(args.model)
    reader = Reader(args.read_gib, summary["threads"])

    report: dict[str, Any] = {"machine": gpu.machine(), "model": str(args.model), "flags": flags,
                              "loader": summary, "decode": args.decode, "prompt": args.prompt,
                              "expert_bytes_per_token": per_token, "blocks": []}
    args.out.mkdir(parents=True, exist_ok=True)
    raw_decode(llm, gpu.prompt_ids(32, vocab, 1), gpu.prompt_ids(4, vocab, 2))  # warm-up
    t_load = time.perf_counter()
    block = 0
    while time.perf_counter() - t_load < args.seconds:
        block += 1
        gb_s = reader.gb_s()
        rate = raw_decode(llm, gpu.prompt_ids(args.prompt, vocab, 1000 + block),
                          gpu.prompt_ids(args.decode, vocab, 2000 + block))
        bound = gb_s * 1e9 / per_token
        report["blocks"].append({"block": block, "t_s": time.perf_counter() - t_load, "gb_s": gb_s,
                                 "bound_tok_s": bound, "decode_tok_s": rate, "of_bound": rate / bound})
        report["summary"] = summarize(report["blocks"])
        gpu.log(f"block {block}: {gb_s:.1f} GB/s, {rate:.1f} tok/s, {100 * rate / bound:.1f} % of {bound:.1f}")
        (args.out / "drift.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "drift.md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

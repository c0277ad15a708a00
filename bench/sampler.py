"""Per-token cost of sampling: llama.cpp's chain over the whole vocabulary against the short candidate
list (server/sampler.py), side by side in one run, for several request settings.

    python bench/sampler.py [MODEL.gguf] [--tokens 400] [--vocab 151936]

Without MODEL it builds a tiny random model with Qwen3-Coder's vocabulary size (151,936), so the
figures show what a real model's vocabulary costs; the model's layers do not enter them (sampling
reads only the logits of one evaluated position, the same for every timed call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = {
    "greedy": {},
    "greedy, repeat_penalty 1.05": {"repeat_penalty": 1.05},
    "temperature 0.7, top_k 20, top_p 0.8": {"temperature": 0.7, "top_k": 20, "top_p": 0.8},
    "the same + repeat_penalty 1.05 (Qwen3-Coder's defaults)": {"temperature": 0.7, "top_k": 20, "top_p": 0.8,
                                                                "repeat_penalty": 1.05},
}


def build_model(folder: Path, vocab: int) -> Path:
    from quantizer.synthetic import write_checkpoint

    write_checkpoint(folder / "hf", preset="tiny", layers=4, vocab=vocab)
    out = folder / "model.gguf"
    subprocess.run([sys.executable, "-m", "quantizer.cli", "build", str(folder / "hf"), str(out), "--quiet"],
                   cwd=ROOT, check=True)
    return out


def measure(model: Path, tokens: int) -> dict[str, dict[str, float]]:
    import llama_cpp

    from server.sampler import SamplerChain, SamplingParams

    llama = llama_cpp.Llama(str(model), n_ctx=512, verbose=False)
    llama.eval(list(range(300, 364)))
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    base = dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0, presence_penalty=0.0,
                frequency_penalty=0.0, repeat_last_n=64, seed=1)
    out = {}
    for label, fields in CASES.items():
        params = SamplingParams(**(base | fields))
        row = {}
        for shortlist in (False, True, False, True):  # interleaved: drift hits both sides alike
            with SamplerChain(vocab, llama.n_vocab(), params, None, shortlist=shortlist) as chain:
                for t in range(64):  # a full penalty window of distinct tokens
                    chain.accept(300 + t)
                start = time.perf_counter()
                for _ in range(tokens):
                    chain.sample(llama.ctx)
                per_token = (time.perf_counter() - start) / tokens * 1e3
            row.setdefault("shortlist" if shortlist else "whole vocabulary", []).append(per_token)
        out[label] = {k: statistics.median(v) for k, v in row.items()}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", type=Path)
    p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or build_model(Path(tmp), args.vocab)
        result = measure(model, args.tokens)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("| request | whole vocabulary, ms/token | short list, ms/token | ratio |")
    print("|---|---|---|---|")
    for label, row in result.items():
        whole, short = row["whole vocabulary"], row["shortlist"]
        print(f"| {label} | {whole:.3f} | {short:.3f} | {short / whole:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

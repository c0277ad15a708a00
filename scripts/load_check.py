"""Load a GGUF under several placements, with and without mmap and repacking, each in a fresh process,
and report which loads (and a 4-token completion) work and which die, with the signal.

    python scripts/load_check.py MODEL.gguf [--presets none attn all] [--out report.json]
    python scripts/load_check.py --tiny        # a tiny synthetic model built on the spot

A crash inside llama.cpp takes the whole process down; this finds the combination that does it
without losing the rest of a run. Each child runs with Python's faulthandler on, so a crash prints
the Python stack above llama.cpp's last log lines.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent


def child(path: str, preset: str, mmap: bool, repack: bool) -> None:
    sys.path.insert(0, str(ROOT))
    from server.loader import open_model

    settings = SimpleNamespace(gpu_layers=preset, cpu_moe_layers=None, ctx_size=512, threads=2, batch=512,
                               ubatch=512, mmap=mmap, repack=repack, verbose=True)
    llama, summary = open_model(path, settings)
    text = llama.create_completion("def f():", max_tokens=4)["choices"][0]["text"]
    print(json.dumps({"buffers": summary["buffers"], "text": text}))


def tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from quantizer.synthetic import write_checkpoint

    write_checkpoint(folder / "hf", preset="tiny", layers=4)
    out = folder / "tiny.gguf"
    subprocess.run([sys.executable, "-m", "quantizer.cli", "build", str(folder / "hf"), str(out), "--quiet"],
                   cwd=ROOT, check=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?")
    p.add_argument("--tiny", action="store_true", help="build and check a tiny synthetic model")
    p.add_argument("--presets", nargs="+", default=["none", "attn", "all"])
    p.add_argument("--out", help="write the report here as JSON")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2] == "1", args.child[3] == "1")
        return 0
    if not args.model and not args.tiny:
        p.error("give MODEL.gguf or --tiny")
    with tempfile.TemporaryDirectory() as tmp:
        path = str(tiny_model(Path(tmp)) if args.tiny else args.model)
        report = []
        for preset, mmap, repack in itertools.product(args.presets, (True, False), (True, False)):
            cmd = [sys.executable, "-X", "faulthandler", __file__, "--child", path, preset, str(int(mmap)), str(int(repack))]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            rc = done.returncode
            status = "ok" if rc == 0 else (f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}")
            row = {"preset": preset, "mmap": mmap, "repack": repack, "status": status}
            if rc == 0:
                row |= json.loads(done.stdout.strip().splitlines()[-1])
            else:
                row["log_tail"] = done.stderr[-3000:]
            report.append(row)
            print(f"{preset:5} mmap={mmap!s:5} repack={repack!s:5} {status}", flush=True)
            if rc != 0:
                print(row["log_tail"], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["status"] == "ok" for r in report) else 1


if __name__ == "__main__":
    sys.exit(main())

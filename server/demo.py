"""The built-in demo model: served when no GGUF is given, so the server can be tried with nothing else.

A small Qwen3-Next checkpoint with random weights (the quantizer's "demo" synthetic preset), built on
first use by the bundled quantizer into the user's cache folder and reused afterwards. It exercises
the whole path (tokenizer, chat template, hybrid architecture, selective quantization) but writes
nonsense: the log and /v1/models say it is a demo.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_MODEL_ID = "qwen3-next-demo"
# Bump when the checkpoint or the quantizer's output changes, so an old cached file is not reused.
DEMO_REVISION = 1
DEMO_FILE = f"{DEMO_MODEL_ID}-r{DEMO_REVISION}.gguf"


def cache_root(cache_dir: Path | None = None) -> Path:
    """$XDG_CACHE_HOME/coder-serve, else ~/.cache/coder-serve, unless a folder is given."""
    if cache_dir is not None:
        return Path(cache_dir)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "coder-serve"


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Path of the demo GGUF, building it first if the cache does not hold it yet."""
    root = cache_root(cache_dir)
    target = root / DEMO_FILE
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{DEMO_FILE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two servers starting at once build it once
        if not target.is_file():
            _build(target)
    return target


def _build(target: Path) -> None:
    # Imported here: the quantizer is only needed the first time.
    from quantizer.build import build_gguf
    from quantizer.synthetic import write_checkpoint

    log.info("building the demo model into %s (first run only)", target)
    work = Path(tempfile.mkdtemp(prefix="demo-build-", dir=target.parent))
    try:
        write_checkpoint(work / "checkpoint", preset="demo")
        partial = work / DEMO_FILE
        build_gguf(work / "checkpoint", partial, threads=os.cpu_count() or 1)
        os.replace(partial, target)  # appears whole or not at all
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("demo model ready: %s (%d bytes)", target, target.stat().st_size)

"""The built-in demo model: served when no GGUF is given, so the server can be tried with nothing else.

The package ships a small trained Qwen3-Next model (16.5 M parameters, 4 layers, trained for four
minutes on Python sources by bench/train_demo.py, built by coder-quant with the default recipe;
server/data/qwen3-next-demo.gguf, checked against its sha256 sidecar). It writes plausible Python,
nothing more. When the package was installed without it (a trimmed source tree), the bundled
quantizer builds a random-weight demo of the same architecture into the user's cache folder on first
use instead; it exercises the whole path but writes noise. The log and /v1/models say it is a demo.
"""

from __future__ import annotations

import fcntl
import hashlib
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
BUNDLED_DEMO = Path(__file__).resolve().parent / "data" / f"{DEMO_MODEL_ID}.gguf"
DEMO_TRAINED_CTX = 4096  # the bundled model's training context (n_ctx_train)


def bundled_demo_model(path: Path = BUNDLED_DEMO) -> Path | None:
    """The shipped trained demo GGUF, or None when it is absent or does not match its sha256 sidecar."""
    sidecar = path.with_name(path.name + ".sha256")
    if not (path.is_file() and sidecar.is_file()):
        return None
    expected = sidecar.read_text().split()[0]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        log.warning("the bundled demo model %s does not match its sha256; ignoring it", path)
        return None
    return path


def cache_root(cache_dir: Path | None = None) -> Path:
    """$XDG_CACHE_HOME/coder-serve, else ~/.cache/coder-serve, unless a folder is given."""
    if cache_dir is not None:
        return Path(cache_dir)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "coder-serve"


def ensure_demo_model(cache_dir: Path | None = None, *, prefer_bundled: bool = True) -> Path:
    """Path of the demo GGUF: the shipped trained model, else a random-weight one built into the cache."""
    if prefer_bundled and (bundled := bundled_demo_model()) is not None:
        return bundled
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

    log.info("building a random-weight demo model into %s (first run only; no trained demo is installed)", target)
    work = Path(tempfile.mkdtemp(prefix="demo-build-", dir=target.parent))
    try:
        write_checkpoint(work / "checkpoint", preset="demo")
        partial = work / DEMO_FILE
        build_gguf(work / "checkpoint", partial, threads=os.cpu_count() or 1)
        os.replace(partial, target)  # appears whole or not at all
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info("demo model ready: %s (%d bytes)", target, target.stat().st_size)

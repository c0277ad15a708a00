"""`--pin-threads`: llama.cpp's CPU threads bound one per core, through OpenMP's own settings.

llama.cpp's CPU backend (built with OpenMP, as llama-cpp-python builds it on Linux) runs each
computation on a team of OpenMP threads. OMP_PROC_BIND=close with OMP_PLACES=cores binds them one per
core, so they stop migrating between the GPU's parts of a token. OpenMP reads these variables once,
when its library is loaded, so they are set here before llama.cpp is imported. Loading it binds the
thread that loads it to the first core; that thread's affinity is given back at once, so the threads
started later (the HTTP server's, the engine's) are not all confined to one core. OpenMP binds the
engine's thread and its workers when they first compute.

On the H200 machine (docs/benchmarks.md) decoding with experts in RAM ran 1.39x faster pinned than not
in one run, but figures moved by 10-20 % between processes there, so this stays a choice, not the
default: pinned threads also compete badly with anything else pinned to the same cores (a second
server, for instance).
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

PIN_ENV = {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}


class PinningError(RuntimeError):
    """Pinning was asked for where it cannot take effect."""


def pin_llama_threads(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set OpenMP's binding variables (those the user already set are kept), load llama.cpp, and give the
    calling thread its CPUs back. Returns the variables in effect."""
    if not hasattr(os, "sched_setaffinity"):
        raise PinningError("--pin-threads needs Linux")
    if "llama_cpp" in sys.modules:
        raise PinningError("--pin-threads must take effect before llama.cpp is loaded")
    applied = {name: environ.setdefault(name, value) for name, value in PIN_ENV.items()}
    cpus = os.sched_getaffinity(0)
    import llama_cpp  # noqa: F401  (loads OpenMP, which reads the variables now)

    os.sched_setaffinity(0, cpus)
    return applied

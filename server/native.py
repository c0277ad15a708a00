"""One C++ runtime for the whole process, set up before llama.cpp's libraries load.

Some llama.cpp builds carry a private, statically linked copy of the C++ standard library inside
libggml-cuda.so and export its symbols (seen with llama-cpp-python 0.3.36 compiled against CUDA 13:
libllama.so and libggml-cuda.so list no libstdc++.so.6 at all). libllama then takes part of the
library from that copy and part from the system's libstdc++.so.6, which CUDA's own libraries bring
in. Both copies number iostream facets (std::locale::id) on first use, so which facet an index finds
depends on what ran earlier in the process: a lean process loads the model, while one that imported
more first (pytest with its plugins, the server's app) crashed inside llama_model::print_info,
formatting a number into a std::ostringstream.

Loading the system's libstdc++.so.6 into the global scope first makes every library resolve the
standard library's symbols to that one copy. Where llama.cpp already links it dynamically (the usual
case) this changes nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger("coder_serve.native")

LIBSTDCXX = "libstdc++.so.6"
_handle: ctypes.CDLL | None = None


def share_libstdcxx() -> bool:
    """Put the system's C++ runtime in the process's global symbol scope. True where it is there now.

    Must run before llama_cpp is imported to help; afterwards the libraries' symbols are already bound.
    """
    global _handle
    if _handle is not None:
        return True
    if not sys.platform.startswith("linux"):
        return False
    if "llama_cpp" in sys.modules:
        log.debug("llama_cpp is already loaded; the C++ runtime is left as it is")
    try:
        _handle = ctypes.CDLL(LIBSTDCXX, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    except OSError as exc:  # no C++ runtime installed under that name: nothing to share
        log.debug("cannot load %s: %s", LIBSTDCXX, exc)
        return False
    return True

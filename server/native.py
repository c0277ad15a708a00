"""One C++ runtime for the whole process, set up before llama.cpp's libraries load.

Seen with llama-cpp-python 0.3.36 compiled against CUDA 13 on an H200 machine: libggml-cuda.so carries
a statically linked copy of the C++ standard library and exports its symbols, and neither it nor
libllama.so lists libstdc++.so.6 as a dependency, so libllama resolves part of the standard library
to that copy. Processes that had imported more before the model loaded (pytest with its plugins, the
server's app in the same process as a benchmark) crashed inside llama_model::print_info, in that
copy's std::ostream::_M_insert<long> (a number formatted into a string stream); lean processes did
not. The likely mechanism: two copies of the library in one process, each with its own numbering of
iostream facets, meeting in one stream.

Loading the system's libstdc++.so.6 into the global symbol scope first makes the libraries resolve
the standard library's symbols to that one copy; with it, the same runs passed there. Where llama.cpp
links libstdc++.so.6 dynamically (the usual build) they resolve to that copy anyway.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

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
        log.debug("llama_cpp was loaded first: its libraries' symbols are already bound")
    try:
        _handle = ctypes.CDLL(LIBSTDCXX, mode=os.RTLD_GLOBAL | os.RTLD_NOW)
    except OSError as exc:  # no C++ runtime installed under that name: nothing to share
        log.debug("cannot load %s: %s", LIBSTDCXX, exc)
        return False
    return True

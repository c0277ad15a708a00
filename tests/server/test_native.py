"""The C++ runtime is shared process-wide before llama.cpp loads (server/native.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="dynamic linking as on Linux")

# std::ostream::_M_insert<long>: where the crash it prevents happened (a number formatted into a stream)
PROBE = """
import ctypes, sys
{setup}
try:
    ctypes.CDLL(None)["_ZNSo9_M_insertIlEERSoT_"]
except AttributeError:
    print("absent")
else:
    print("global")
print("llama_cpp" in sys.modules)
"""


def probe(setup: str) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout.split()


def test_importing_the_server_puts_the_cpp_runtime_in_the_global_scope_before_llama_cpp():
    assert probe("import server") == ["global", "False"]


def test_the_quantizer_does_it_too():
    assert probe("import quantizer") == ["global", "False"]


def test_a_bare_interpreter_does_not_have_it():
    """The check above can fail: a plain Python process has no C++ runtime in its global scope."""
    assert probe("") == ["absent", "False"]

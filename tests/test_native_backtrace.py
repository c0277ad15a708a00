"""scripts/native-backtrace.sh: a crash inside llama.cpp is reported with its native frames, named."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CRASH = "import ctypes, llama_cpp; llama_cpp.llama_model_n_embd(ctypes.c_void_p(0))"  # a NULL model


@pytest.mark.skipif(not (shutil.which("cc") and shutil.which("addr2line")) or not sys.platform.startswith("linux"),
                    reason="needs Linux, a C compiler and addr2line")
def test_a_crash_in_llama_cpp_is_reported_with_named_native_frames() -> None:
    done = subprocess.run(["bash", str(ROOT / "scripts" / "native-backtrace.sh"), sys.executable, "-c", CRASH],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "native backtrace: signal 11" in done.stderr
    assert "libllama.so(llama_model_n_embd+0x" in done.stderr  # the frame where it crashed
    assert "frames resolved:" in done.stderr and "on_fatal" in done.stderr  # addr2line named the helper's frame


def test_a_clean_exit_passes_through_untouched() -> None:
    if not shutil.which("cc"):
        pytest.skip("needs a C compiler")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "native-backtrace.sh"), sys.executable, "-c",
                           "import sys; print('ok'); sys.exit(3)"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and done.stdout == "ok\n" and "native backtrace" not in done.stderr

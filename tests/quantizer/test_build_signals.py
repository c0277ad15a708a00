"""`coder-quant build` when it is stopped or raced: SIGTERM and SIGHUP clean up as Ctrl-C does, two
builds to one output never write into each other's file, and an unusable output path is refused
before the source is hashed."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantizer import cli
from quantizer.build import build_gguf
from quantizer.cli import main
from quantizer.errors import ImatrixError, QuantError
from quantizer.source import Checkpoint
from quantizer.synthetic import write_checkpoint
from quantizer.writer import partial_paths, sidecar_path
from tests.quantizer.conftest import write_calibration

ROOT = Path(__file__).resolve().parents[2]

# A build whose every tensor takes a little longer, so that the signal surely lands mid-write on a
# fast machine as on a loaded one; everything else is the real command.
SLOW_BUILD = """
import sys, time
import quantizer.writer as writer
real = writer.tensor_data
def slow(*args, **kwargs):
    time.sleep(0.3)
    return real(*args, **kwargs)
writer.tensor_data = slow
from quantizer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny", preset="tiny", layers=2).path


def _wait_for_a_file(folder: Path, proc: subprocess.Popen[str], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(folder.iterdir()):
        if proc.poll() is not None:
            pytest.fail(f"build ended (exit {proc.returncode}) before writing: {proc.communicate()[1]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("build wrote nothing in time")
        time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_stop_signal_mid_write_leaves_nothing(tiny: Path, tmp_path: Path, sig: signal.Signals) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    command = [sys.executable, "-c", SLOW_BUILD, "build", str(tiny), str(out_dir / "model.gguf"),
               "--quiet", "--threads", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this tree's code, whatever is installed
    with subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) as proc:
        _wait_for_a_file(out_dir, proc)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 128 + sig, stderr
    assert stderr.strip().splitlines() == [f"coder-quant: terminated by {sig.name}"]
    assert list(out_dir.iterdir()) == []


def test_signal_wrapped_in_a_library_error_still_ends_as_a_signal(
    monkeypatch: pytest.MonkeyPatch, tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # as imatrix collection reports a signal caught inside its ctypes callback
    def wrapped(*args: object, **kwargs: object) -> None:
        raise ImatrixError("activation collection failed: SIGTERM") from cli.Terminated(signal.SIGTERM)

    monkeypatch.setattr("quantizer.commands.build.build_gguf", wrapped)
    before = signal.getsignal(signal.SIGTERM)

    code = main(["build", str(tiny), str(tmp_path / "model.gguf"), "--quiet"])

    assert code == 143
    assert capsys.readouterr().err.strip().splitlines() == ["coder-quant: terminated by SIGTERM"]
    assert signal.getsignal(signal.SIGTERM) == before  # main() puts the caller's handler back


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_two_builds_to_one_output_do_not_mix(tiny: Path, tmp_path: Path, force: bool) -> None:
    out = tmp_path / "model.gguf"
    second: list[str] = []

    def finish_another_build_meanwhile(phase: str, done: int, total: int) -> None:
        if phase == "write" and not second:  # the first build is half written
            second.append(build_gguf(tiny, out, recipe="attn-bf16-q8", force=force).written.sha256)

    if force:
        first = build_gguf(tiny, out, recipe="bf16", force=True, progress=finish_another_build_meanwhile)
        assert first.written.sha256 == _sha256(out)  # the last to finish is the one published
    else:
        with pytest.raises(QuantError, match="exists"):  # nor does it replace the other's output
            build_gguf(tiny, out, recipe="bf16", progress=finish_another_build_meanwhile)
        assert second == [_sha256(out)]
    assert sidecar_path(out).read_text() == f"{_sha256(out)}  {out.name}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name, sidecar_path(out).name]


def test_published_files_get_the_users_permissions(tiny: Path, tmp_path: Path) -> None:
    umask = os.umask(0o027)
    try:
        out = build_gguf(tiny, tmp_path / "model.gguf", recipe="bf16").written.path
    finally:
        os.umask(umask)
    assert oct(out.stat().st_mode & 0o777) == oct(0o640)  # not mkstemp's private 0600
    assert oct(sidecar_path(out).stat().st_mode & 0o777) == oct(0o640)
    assert partial_paths(out) == []


@pytest.mark.parametrize(
    ("target", "force", "message"),
    [("missing/model.gguf", False, "output folder does not exist"), ("folder", False, "is a directory"),
     ("folder", True, "is a directory")],
)
def test_unusable_output_is_refused_before_hashing(
    monkeypatch: pytest.MonkeyPatch, tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    target: str, force: bool, message: str,
) -> None:
    def no_hashing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the source was hashed before the output path was checked")

    monkeypatch.setattr(Checkpoint, "digests", no_hashing)
    (tmp_path / "folder").mkdir()

    code = main(["build", str(tiny), str(tmp_path / target), "--quiet", *(["--force"] if force else [])])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("coder-quant: error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
    assert list((tmp_path / "folder").iterdir()) == []


def test_sigterm_during_activation_collection_stops_the_run(reference_bf16: Path, tmp_path: Path) -> None:
    # A signal landing while llama.cpp runs the imatrix callback used to be dropped ("Exception ignored"),
    # and the run went on; it now waits for the chunk to end, then stops the run as anywhere else.
    text = write_calibration(tmp_path, 400_000)
    out_dir, log = tmp_path / "out", tmp_path / "stderr.txt"
    out_dir.mkdir()
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "quantizer.cli", "imatrix", str(reference_bf16), "-o",
                                 str(out_dir / "imatrix.gguf"), "--text", str(text), "--ctx", "512"],
                                cwd=ROOT, stderr=err, text=True)
        deadline = time.monotonic() + 120
        while not re.search(r"\b[1-9]\d*/\d+", log.read_text()):  # the progress bar: a chunk is done
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no chunk finished in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the run went on after SIGTERM")
    assert rc == 128 + signal.SIGTERM, log.read_text()
    assert "terminated by SIGTERM" in log.read_text() and "Exception ignored" not in log.read_text()
    assert list(out_dir.iterdir()) == []


def test_a_stop_signal_waits_for_the_chunk_then_reaches_the_callers_handler() -> None:
    from quantizer.imatrix_collect import _signals_between_chunks

    def handler(signum: int, _frame: object) -> None:
        raise cli.Terminated(signum)  # as coder-quant's own

    previous = signal.signal(signal.SIGTERM, handler)
    seen = []
    try:
        with pytest.raises(cli.Terminated), _signals_between_chunks() as deliver:
            signal.raise_signal(signal.SIGTERM)  # as if inside llama.cpp's callback: nothing may raise here
            seen.append("chunk ended")
            deliver()
            seen.append("not reached")
        assert seen == ["chunk ended"] and signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)

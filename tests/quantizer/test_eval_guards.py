"""`coder-quant eval` and `imatrix` refuse bad input before any model runs: a ctx the text or the model
cannot hold, a --base-logits path that cannot be written, two models with different vocabularies; and a
cache write that fails (file too large, disk full) is one line with nothing left behind."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import llama_cpp
import pytest

from quantizer.cli import main
from quantizer.errors import EvalError
from quantizer.llama_session import MAX_CTX, LlamaSession, check_ctx, chunk_tokens
from quantizer.synthetic import write_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TRAINED_CTX = 4096  # the synthetic presets' context (SyntheticShape.context)


def _build(folder: Path, **shape: int) -> Path:
    write_checkpoint(folder / "hf", preset="tiny", **shape)  # 4 layers, one of full attention (llama.cpp aborts without)
    out = folder / "model.gguf"
    assert main(["build", str(folder / "hf"), str(out), "--quiet", "--threads", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def other_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("other"), vocab=1024)


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("text")
    small, long = folder / "small.txt", folder / "long.txt"
    small.write_text("def f():\n    pass\n" * 10, encoding="utf-8")
    # well over 2 x (TRAINED_CTX + 4) tokens with the synthetic byte-level tokenizer
    long.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(1500)), encoding="utf-8")
    return {"small": small, "long": long}


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model run fails the test: the refusals under test come before one."""

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a model ran before the input was refused")

    monkeypatch.setattr(LlamaSession, "decode_chunk", refuse)


def _cli(args: list[str], preexec_fn: object = None) -> subprocess.CompletedProcess[str]:
    """`coder-quant ARGS` in a child process: a native abort there fails the test, not the test run."""
    return subprocess.run([sys.executable, "-m", "quantizer.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, preexec_fn=preexec_fn, check=False)  # fmt: skip


def _one_error(stderr: str) -> str:
    """The single `coder-quant: error:` line, checking there is no traceback (progress bars aside)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("coder-quant: error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.mark.parametrize("command", ["eval", "imatrix"])
def test_ctx_beyond_the_text_is_refused_before_a_context_is_made(
    tiny: Path, texts: dict[str, Path], tmp_path: Path, command: str
) -> None:
    out = tmp_path / "imatrix.gguf"
    target = [str(tiny)] if command == "eval" else ["-o", str(out)]
    done = _cli([command, str(tiny), *target, "--text", str(texts["small"]), "--ctx", "100000"])
    assert done.returncode == 1, done.stderr[-2000:]  # was SIGABRT (-6): GGML_ASSERT(ctx->mem_buffer != NULL)
    assert "needs at least 200000" in _one_error(done.stderr)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["eval", "imatrix"])
def test_ctx_beyond_the_trained_context_is_refused(
    tiny: Path, texts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_decoding: None,
    command: str,
) -> None:  # fmt: skip
    target = [str(tiny)] if command == "eval" else ["-o", str(tmp_path / "imatrix.gguf")]
    ctx = str(TRAINED_CTX + 4)
    assert main([command, str(tiny), *target, "--text", str(texts["long"]), "--ctx", ctx, "--chunks", "1"]) == 1
    err = _one_error(capsys.readouterr().err)
    assert f"--ctx {ctx} exceeds the trained context" in err and str(TRAINED_CTX) in err
    assert list(tmp_path.iterdir()) == []


def test_ctx_has_an_absolute_limit() -> None:
    model = Path("model.gguf")
    check_ctx(MAX_CTX, 0, model)  # no trained context recorded: only the absolute limit applies
    check_ctx(TRAINED_CTX, TRAINED_CTX, model)
    with pytest.raises(EvalError, match=f"limit of {MAX_CTX}"):
        check_ctx(MAX_CTX + 1, 0, model)
    with pytest.raises(EvalError, match="trained context"):
        check_ctx(TRAINED_CTX + 1, TRAINED_CTX, model)


@pytest.mark.parametrize(("ctx", "ubatch"), [(256, 256), (1024, 512)])
def test_long_chunks_decode_in_micro_batches(tiny: Path, texts: dict[str, Path], ctx: int, ubatch: int) -> None:
    with LlamaSession(tiny, ctx, threads=1) as session:
        chunk = chunk_tokens(session.tokenize(texts["long"].read_text(encoding="utf-8")), ctx, 1)[0]
        logits = session.decode_chunk(chunk, first=ctx // 2)
        assert logits is not None and logits.shape == (ctx - ctx // 2, session.n_vocab)
        # a compute buffer for 512 tokens at most, however long the chunk; ctx <= 512 as before
        assert llama_cpp.llama_n_ubatch(session._ctx) == ubatch


def _limit_file_size(limit: int) -> object:
    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_file_size


@pytest.mark.parametrize("limit", [100, 20_000])  # in the header; among the chunk records
def test_failed_cache_write_is_one_line_and_leaves_nothing(
    tiny: Path, texts: dict[str, Path], tmp_path: Path, limit: int
) -> None:
    cache = tmp_path / "base.logits"
    args = ["eval", str(tiny), str(tiny), "--text", str(texts["long"]), "--ctx", "128", "--chunks", "8",
            "--base-logits", str(cache)]  # fmt: skip
    done = _cli(args, preexec_fn=_limit_file_size(limit))
    assert done.returncode == 1, done.stderr[-2000:]
    err = _one_error(done.stderr)
    assert str(cache) in err and "File too large" in err
    assert list(tmp_path.iterdir()) == []  # no cache, no .partial


def test_base_logits_path_is_checked_before_the_base_model_runs(
    tiny: Path, texts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], no_decoding: None
) -> None:
    base = ["eval", str(tiny), str(tiny), "--text", str(texts["long"]), "--ctx", "128", "--chunks", "2"]
    folder = tmp_path / "cache"
    folder.mkdir()
    assert main([*base, "--base-logits", str(folder)]) == 1
    assert f"--base-logits {folder} is a directory" in _one_error(capsys.readouterr().err)
    assert main([*base, "--base-logits", str(tmp_path / "missing" / "base.logits")]) == 1
    assert "does not exist" in _one_error(capsys.readouterr().err)
    assert [p.name for p in tmp_path.iterdir()] == ["cache"] and list(folder.iterdir()) == []


def test_models_with_different_vocabularies_are_refused_up_front(
    tiny: Path, other_vocab: Path, texts: dict[str, Path], capsys: pytest.CaptureFixture[str], no_decoding: None
) -> None:
    args = ["--text", str(texts["long"]), "--ctx", "128", "--chunks", "2"]
    for base, quant in ((tiny, other_vocab), (other_vocab, tiny)):
        assert main(["eval", str(base), str(quant), *args]) == 1
        err = _one_error(capsys.readouterr().err)
        assert str(base) in err and str(quant) in err and "different vocabularies" in err
        assert "base-logits" not in err  # the user passed no cache

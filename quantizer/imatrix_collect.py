"""Importance matrix from activations, collected as llama-imatrix collects them.

llama.cpp calls an eval callback (`cb_eval`, a ggml_backend_sched_eval_callback) for every graph node:
first with ask=true ("do you want this node's data?"), then, for the nodes we asked for, with ask=false
once the node is computed. The statistics mirror tools/imatrix/imatrix.cpp (collect_imatrix):
- MUL_MAT_ID (stacked routed experts): every call; the ids tensor (src2) routes each token's input row
  to its expert, whose sum of squared inputs per column and row count grow;
- MUL_MAT: only weights named "blk.*" (and output.weight when asked), an F32 input (src1) of at
  least 16 rows; one count per tensor, sums per column (per matrix for 3-D weights).
Sums are kept in float64 (llama.cpp adds in float32) and written as float32, with llama-imatrix's
GGUF keys and layout (quantizer.imatrix.write_imatrix_gguf).
"""

from __future__ import annotations

import ctypes
import logging
import signal
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantizer.errors import ImatrixError
from quantizer.evaluate import LlamaSession
from quantizer.ggml import library_path as ggml_library_path

log = logging.getLogger(__name__)

# ggml/include/ggml.h of the llama.cpp that llama-cpp-python 0.3.36 vendors.
GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_TYPE_F32 = 0
GGML_TYPE_I32 = 26
GGML_OP_MUL_MAT = 29  # checked against ggml_op_name() when the library loads
GGML_OP_MUL_MAT_ID = 30
MIN_ROWS = 16  # llama-imatrix ignores plain matrix products of fewer input rows

# Default calibration text: these standard-library sources, in this order, joined by blank lines.
# Plain Python that ships with every interpreter, so `imatrix` works offline; files a Python version
# lacks are skipped, and the version is recorded in the imatrix's dataset name. About 449,000 tokens
# with Python 3.11 (876 chunks of 512). Chosen in a fixed order (sha256 of the path after the first
# fifteen), between 2 and 100 KB, without tests, and without any file whose lines also occur in the
# project's held-out evaluation text; four times the earlier list, whose glob.py and contextlib.py did
# occur there. More text matters for `build --gptq` (docs/quality.md), little for the imatrix alone.
STDLIB_CALIBRATION: tuple[str, ...] = (
    "argparse.py", "bisect.py", "copy.py", "dataclasses.py", "fnmatch.py", "functools.py", "heapq.py",
    "json/decoder.py", "json/encoder.py", "queue.py", "random.py", "shlex.py", "string.py", "textwrap.py",
    "tokenize.py", "lib2to3/fixer_base.py", "concurrent/futures/process.py",
    "multiprocessing/connection.py", "sched.py", "copyreg.py", "lib2to3/pgen2/parse.py", "venv/__init__.py",
    "xml/sax/xmlreader.py", "lib2to3/fixes/fix_itertools_imports.py", "email/contentmanager.py",
    "idlelib/iomenu.py", "idlelib/autocomplete.py", "email/_encoded_words.py", "token.py",
    "turtledemo/penrose.py", "opcode.py", "importlib/_bootstrap_external.py", "secrets.py",
    "distutils/command/install_lib.py", "traceback.py", "multiprocessing/popen_spawn_posix.py",
    "html/parser.py", "asynchat.py", "trace.py", "enum.py", "bz2.py", "timeit.py",
    "multiprocessing/sharedctypes.py", "zoneinfo/_zoneinfo.py", "tkinter/colorchooser.py",
    "lib2to3/pgen2/driver.py", "calendar.py", "multiprocessing/util.py", "dbm/__init__.py",
    "distutils/ccompiler.py", "multiprocessing/shared_memory.py", "asyncio/subprocess.py",
    "idlelib/autocomplete_w.py", "smtpd.py", "subprocess.py", "multiprocessing/popen_forkserver.py",
    "signal.py", "idlelib/multicall.py", "email/quoprimime.py", "_pyio.py", "lib2to3/pgen2/tokenize.py",
    "distutils/dist.py", "turtledemo/sorting_animate.py", "email/base64mime.py", "cgitb.py", "pyclbr.py",
    "distutils/command/build_clib.py", "idlelib/browser.py", "xml/sax/__init__.py", "pprint.py",
    "asyncio/tasks.py", "importlib/resources/_legacy.py", "idlelib/outwin.py",
    "multiprocessing/reduction.py", "sysconfig.py", "tkinter/messagebox.py",
    "distutils/command/install_data.py", "lib2to3/patcomp.py", "asyncio/__main__.py", "ctypes/util.py",
    "_bootsubprocess.py", "re/_compiler.py", "plistlib.py", "configparser.py",
)  # fmt: skip


class GgmlTensor(ctypes.Structure):
    pass


GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


def _ggml_base() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(ggml_library_path()))  # the copy libllama uses (see quantizer.ggml)
    lib.ggml_nbytes.argtypes = [ctypes.POINTER(GgmlTensor)]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    lib.ggml_backend_tensor_get.argtypes = [ctypes.POINTER(GgmlTensor), ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_op_name.argtypes = [ctypes.c_int]
    lib.ggml_op_name.restype = ctypes.c_char_p
    for op, name in ((GGML_OP_MUL_MAT, b"MUL_MAT"), (GGML_OP_MUL_MAT_ID, b"MUL_MAT_ID")):
        if lib.ggml_op_name(op) != name:
            raise ImatrixError(f"this libggml numbers its ops differently (op {op} is {lib.ggml_op_name(op)!r})")
    return lib


def weight_name(raw: bytes) -> str:
    """llama-imatrix's filter_tensor_name: "CUDA0#blk.0.attn_k.weight#0" -> "blk.0.attn_k.weight"."""
    name = raw.decode("utf-8", errors="replace")
    if "#" in name:
        name = name.split("#")[1]
    return name


@dataclass(frozen=True)
class ImatrixStats:
    """Raw statistics: sums (n_mat, cols) of squared inputs and counts (n_mat,) of rows, by weight."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    chunk_count: int
    chunk_size: int


@dataclass
class ActivationCollector:
    """The eval callback and the running statistics it fills."""

    chunk_size: int
    process_output: bool = False
    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        import llama_cpp

        self._lib = _ggml_base()
        # keep the ctypes thunk alive as long as the collector: llama.cpp holds only its address
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def _on_node(self, node: int, ask: bool, _user_data: int) -> bool:
        if self.error is not None:
            return not ask  # stop asking; let the graph finish
        try:
            t = ctypes.cast(node, ctypes.POINTER(GgmlTensor)).contents
            return self._wanted(t) if ask else self._collect(t)
        except BaseException as exc:  # an exception must not unwind through C; re-raised by check()
            self.error = exc
            return not ask

    def check(self) -> None:
        if self.error is not None:
            raise ImatrixError(f"activation collection failed: {self.error}") from self.error

    def _wanted(self, t: GgmlTensor) -> bool:
        if t.op == GGML_OP_MUL_MAT_ID:
            return True
        if t.op != GGML_OP_MUL_MAT:
            return False
        src1 = t.src[1].contents
        if src1.ne[1] < MIN_ROWS or src1.type != GGML_TYPE_F32:
            return False
        name = weight_name(t.src[0].contents.name)
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def _array(self, t: GgmlTensor, dtype: type) -> np.ndarray:
        """The tensor's data as a (ne3, ne2, ne1, ne0) strided array, copied off the device if needed."""
        nbytes = self._lib.ggml_nbytes(ctypes.byref(t))
        if t.buffer and not self._lib.ggml_backend_buffer_is_host(t.buffer):
            raw = np.empty(nbytes, dtype=np.uint8)
            self._lib.ggml_backend_tensor_get(ctypes.byref(t), raw.ctypes.data, 0, nbytes)
        else:
            raw = np.frombuffer((ctypes.c_char * nbytes).from_address(t.data), dtype=np.uint8)
        if t.nb[0] != np.dtype(dtype).itemsize:
            raise ImatrixError(f"non-contiguous rows in {weight_name(t.name)}")
        shape = tuple(t.ne[i] for i in reversed(range(GGML_MAX_DIMS)))
        strides = tuple(t.nb[i] for i in reversed(range(GGML_MAX_DIMS)))
        return np.lib.stride_tricks.as_strided(raw.view(dtype), shape=shape, strides=strides, writeable=False)

    def _entry(self, name: str, n_mat: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.sums:
            self.sums[name] = np.zeros((n_mat, cols), dtype=np.float64)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        sums = self.sums[name]
        if sums.shape != (n_mat, cols):
            raise ImatrixError(f"inconsistent size for {name}: {sums.shape} vs {(n_mat, cols)}")
        return sums, self.counts[name]

    def _collect(self, t: GgmlTensor) -> bool:
        src0, src1 = t.src[0].contents, t.src[1].contents
        name = weight_name(src0.name)
        x = self._array(src1, np.float32)  # (ne3, ne2, ne1, ne0)
        if t.op == GGML_OP_MUL_MAT_ID:
            self._collect_experts(name, src0, x, self._array(t.src[2].contents, np.int32))
        else:
            self._collect_dense(name, src0, x)
        return True

    def _collect_experts(self, name: str, src0: GgmlTensor, x: np.ndarray, ids: np.ndarray) -> None:
        # ids: [n_tokens, n_expert_used]; x: [n_tokens, n_expert_used or 1, cols]
        n_as, cols = src0.ne[2], x.shape[-1]
        if x.shape[0] != 1:
            raise ImatrixError(f"{name}: expert input has more than 3 dimensions")
        x, ids = x[0], ids[0, 0]
        if ids.shape[0] != x.shape[0]:
            raise ImatrixError(f"{name}: {ids.shape[0]} routed tokens but {x.shape[0]} input rows")
        sums, counts = self._entry(name, n_as, cols)
        for slot in range(ids.shape[1]):
            experts = ids[:, slot]
            if experts.min() < 0 or experts.max() >= n_as:
                raise ImatrixError(f"{name}: expert id out of range 0..{n_as - 1}")
            rows = x[:, slot % x.shape[1], :].astype(np.float64) ** 2
            order = np.argsort(experts, kind="stable")
            present, starts = np.unique(experts[order], return_index=True)
            sums[present] += np.add.reduceat(rows[order], starts, axis=0)
            counts += np.bincount(experts, minlength=n_as)
        if not np.isfinite(sums).all():
            raise ImatrixError(f"non-finite values detected in {name}")

    def _collect_dense(self, name: str, src0: GgmlTensor, x: np.ndarray) -> None:
        n_mat = src0.ne[2] * src0.ne[3]
        sums, counts = self._entry(name, n_mat, x.shape[-1])
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                # 3-D+ activations against a 2-D weight fold onto its single matrix
                mat = (i3 % src0.ne[3]) * src0.ne[2] + (i2 % src0.ne[2])
                sums[mat] += (x[i3, i2].astype(np.float64) ** 2).sum(axis=0)
        # one count per dense tensor; every expert's, were the tensor also used through MUL_MAT_ID
        counts += x.shape[0] * x.shape[1] * x.shape[2] // n_mat
        if not np.isfinite(sums).all():
            raise ImatrixError(f"non-finite values detected in {name}")

    def result(self) -> ImatrixStats:
        top = max((int(c.max()) for c in self.counts.values() if c.size), default=0)
        for name, c in sorted(self.counts.items()):
            if (c == 0).any():
                log.warning("%s has partial data (%.2f%% of experts saw tokens)", name, 100.0 * (c > 0).mean())
        sums = {n: s[0] if s.shape[0] == 1 else s for n, s in self.sums.items()}
        counts = {n: c.copy() for n, c in self.counts.items()}
        return ImatrixStats(sums, counts, chunk_count=top // self.chunk_size, chunk_size=self.chunk_size)


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextmanager
def _signals_between_chunks() -> Iterator[Callable[[], None]]:
    """Ctrl-C, SIGTERM and SIGHUP wait for the chunk in progress. Python runs a signal's handler at its
    next line, which during a chunk is llama.cpp's callback: an exception raised there cannot unwind
    through C and is dropped, and the run would go on. Yields a function that hands a signal that came
    to the handlers the caller had, between chunks, where their exception stops the run."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None  # only the main thread receives signals' handlers
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: caught.append(signum)) for sig in STOP_SIGNALS}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def deliver() -> None:
        if caught:
            restore()
            signal.raise_signal(caught[0])

    try:
        yield deliver
    finally:
        restore()


def collect_imatrix(
    model: str | Path,
    text: str,
    ctx: int = 512,
    max_chunks: int | None = None,
    process_output: bool = False,
    progress: Callable[[int, int], None] | None = None,
    collector: ActivationCollector | None = None,
) -> ImatrixStats:
    """Run `model` over `text` in chunks of `ctx` tokens (as llama-imatrix does) and collect statistics
    (into `collector` when given: a subclass may keep more than the importance matrix)."""
    path = Path(model)
    if not path.is_file():
        raise ImatrixError(f"model file not found: {path}")
    if collector is None:
        collector = ActivationCollector(chunk_size=ctx, process_output=process_output)
    with LlamaSession(path, ctx, eval_callback=collector.callback) as session, _signals_between_chunks() as deliver:
        chunks = session.chunks(text, max_chunks)  # text and ctx checked before the context is created
        for i, chunk in enumerate(chunks):
            # all outputs: otherwise the last layer runs its FFN on the output rows only
            session.decode_chunk(chunk, first=0, want_logits=False)
            deliver()
            collector.check()
            if progress is not None:
                progress(i + 1, len(chunks))
    if not collector.sums:
        raise ImatrixError(f"{path}: no matrix multiplications were seen; nothing to write")
    return collector.result()


def default_calibration_text() -> tuple[str, str]:
    """(text, dataset label) from this interpreter's standard library (STDLIB_CALIBRATION)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for rel in STDLIB_CALIBRATION:
        path = root / rel
        if path.is_file():
            parts.append(path.read_text(encoding="utf-8"))
        else:
            log.debug("calibration file %s is absent in this Python", rel)
    if not parts:
        raise ImatrixError(f"no calibration sources found under {root}; pass --text")
    label = f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib:{len(parts)}-files"
    return "\n\n".join(parts), label

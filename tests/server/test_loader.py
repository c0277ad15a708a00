"""Loading through llama.cpp: the buffer sizes it logs must agree with the placement plan.

This build has no GPU backend, so the checks here are the CPU ones; bench/gpu.py makes the same
comparison for every preset on a GPU machine.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from types import SimpleNamespace

import llama_cpp
import pytest

from server import loader
from server.loader import (
    OVERRIDE_LINE,
    ModelLoadError,
    PlacedLlama,
    capture_llama_log,
    compare_buffers,
    cpu_buffer_type,
    is_host_buffer,
    open_model,
    parse_buffer_sizes,
    reported_bytes,
)
from server.placement import EXPERT_PATTERN, PlacementError, plan_for_gguf

MiB = 1 << 20
ROUNDING = MiB // 200 + 1  # the log prints MiB to two decimals


@pytest.fixture(scope="module")
def tiny_gguf(test_gguf: Path) -> Path:
    """The session's GGUF (tests/server/conftest.py): the reference model built by coder-quant when
    ../shared is present, else a synthetic "tiny" checkpoint; 4 layers either way."""
    return test_gguf


def settings(**fields) -> SimpleNamespace:
    base = dict(gpu_layers="attn", cpu_moe_layers=None, ctx_size=512, threads=2, batch=512, ubatch=512)
    return SimpleNamespace(**(base | fields))


def test_parse_buffer_sizes():
    text = (
        "load_tensors:   CPU_Mapped model buffer size =    31.61 MiB\n"
        "load_tensors:        CUDA0 model buffer size =  1024.00 MiB\n"
        "llama_kv_cache:      CUDA0 KV buffer size =     0.50 MiB\n"
        "llama_memory_recurrent:      CUDA0 RS buffer size =     0.21 MiB\n"
        "sched_reserve:  CUDA_Host compute buffer size =    14.57 MiB\n"
    )
    buffers = parse_buffer_sizes(text)
    assert buffers["model"] == {"CPU_Mapped": round(31.61 * MiB), "CUDA0": 1024 * MiB}
    assert buffers["compute"] == {"CUDA_Host": round(14.57 * MiB)}
    assert reported_bytes(buffers, host=False) == 1024 * MiB + round(0.50 * MiB) + round(0.21 * MiB)
    assert reported_bytes(buffers, host=True) == round(31.61 * MiB)


@pytest.mark.parametrize("mmap", [True, False])
def test_logged_buffers_match_the_plan(tiny_gguf, mmap):
    llama, summary = open_model(str(tiny_gguf), settings(gpu_layers="none", mmap=mmap))
    plan = plan_for_gguf(tiny_gguf, settings(gpu_layers="none"), gpu_backend=False)
    buffers = summary["buffers"]
    assert summary["mmap"] is mmap
    if not llama_cpp.llama_supports_gpu_offload():  # with a GPU backend, unmapped weights go to pinned memory
        assert set(buffers["model"]) == {"CPU_Mapped" if mmap else "CPU"}
    assert all(is_host_buffer(name) for name in buffers["model"])
    # a mapped buffer spans the file's tensor data, alignment padding included (32 bytes a tensor)
    slack = ROUNDING + 32 * len(plan.tensors)
    assert abs(sum(buffers["model"].values()) - plan.weight_bytes("cpu")) <= slack
    assert abs(buffers["kv"]["CPU"] - plan.cache_bytes("kv", "cpu")) <= ROUNDING
    assert abs(buffers["recurrent"]["CPU"] - plan.cache_bytes("recurrent", "cpu")) <= ROUNDING
    assert summary["reported_gpu_bytes"] == summary["gpu_bytes"] == 0
    assert compare_buffers(plan.to_json(), buffers)["ok"]
    assert llama.n_ctx() == plan.ctx_size
    assert llama.tokenize(b"def f():") and llama.create_completion("def f():", max_tokens=4)["choices"]


def test_repack_off_keeps_the_files_layout(tiny_gguf):
    llama, summary = open_model(str(tiny_gguf), settings(gpu_layers="none", mmap=False, repack=False))
    assert summary["repack"] is False
    assert not {"CPU_REPACK", "AMX"} & set(summary["buffers"]["model"])
    assert llama.create_completion("def f():", max_tokens=2)["choices"]


def test_threads_batch_defaults_to_threads():
    plan = SimpleNamespace(n_gpu_layers=0, ctx_size=512, gpu_backend=False, overrides=(), preset_requested="none")
    kwargs = loader.llama_arguments(settings(threads=3), plan, mmap=True)
    assert (kwargs["n_threads"], kwargs["n_threads_batch"]) == (3, 3)
    kwargs = loader.llama_arguments(settings(threads=3, threads_batch=5), plan, mmap=True)
    assert (kwargs["n_threads"], kwargs["n_threads_batch"]) == (3, 5)
    kwargs = loader.llama_arguments(settings(threads=None), plan, mmap=True)
    assert kwargs["n_threads"] == loader.default_threads() <= kwargs["n_threads_batch"]
    with pytest.raises(PlacementError):
        loader.llama_arguments(settings(threads_batch=0), plan, mmap=True)


def test_more_threads_than_cpus_are_warned_about(caplog):
    plan = SimpleNamespace(n_gpu_layers=0, ctx_size=512, gpu_backend=False, overrides=(), preset_requested="none")
    cpus = loader.usable_cpu_count()
    with caplog.at_level(logging.WARNING, logger="server.loader"):
        loader.llama_arguments(settings(threads=cpus), plan, mmap=True)
        loader.llama_arguments(settings(threads=None), plan, mmap=True)
    assert "may use" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="server.loader"):
        loader.llama_arguments(settings(threads=1, threads_batch=cpus + 1), plan, mmap=True)
    assert f"this process may use {cpus} CPUs" in caplog.text


def test_cpu_quota_reads_cgroup_v2_limits_along_the_path(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    (tmp_path / "a" / "cpu.max").write_text("150000 100000\n")
    (tmp_path / "a" / "b" / "cpu.max").write_text("200000 100000\n")
    assert loader.cpu_quota("0::/a/b\n", tmp_path) == 1.5  # the tightest, from a parent
    assert loader.cpu_quota("0::/\n", tmp_path) is None  # "max": no limit
    assert loader.cpu_quota("0::/elsewhere\n", tmp_path) is None  # nothing readable on the path but the root
    assert loader.cpu_quota("garbage\n", tmp_path) is None


def test_cpu_quota_reads_cgroup_v1_limits(tmp_path):
    base = tmp_path / "cpu,cpuacct"
    (base / "docker" / "x").mkdir(parents=True)
    for d, quota in ((base, "-1"), (base / "docker" / "x", "300000")):
        (d / "cpu.cfs_quota_us").write_text(quota + "\n")
        (d / "cpu.cfs_period_us").write_text("100000\n")
    text = "5:memory:/docker/x\n4:cpu,cpuacct:/docker/x\n"
    assert loader.cpu_quota(text, tmp_path) == 3.0
    assert loader.cpu_quota("4:cpu,cpuacct:/\n", tmp_path) is None  # -1: unlimited
    assert loader.cpu_quota("5:memory:/docker/x\n", tmp_path) is None  # no cpu controller line


def test_threads_follow_the_cpu_quota(monkeypatch):
    plan = SimpleNamespace(n_gpu_layers=0, ctx_size=512, gpu_backend=False, overrides=(), preset_requested="none")
    monkeypatch.setattr(loader, "cpu_quota", lambda: 1.0)  # a container started with --cpus 1
    assert loader.usable_cpu_count() == 1 == loader.default_threads()
    kwargs = loader.llama_arguments(settings(threads=None), plan, mmap=True)
    assert (kwargs["n_threads"], kwargs["n_threads_batch"]) == (1, 1)
    monkeypatch.setattr(loader, "cpu_quota", lambda: 1000.0)  # a quota above the CPUs changes nothing
    assert loader.usable_cpu_count() == len(loader._usable_cpus())


def test_default_threads_counts_physical_cores():
    cpus = loader._usable_cpus()
    assert 1 <= loader.default_threads() <= len(cpus)


@pytest.mark.parametrize("gpu, overrides, preset, expected", [
    (True, (EXPERT_PATTERN,), "attn", (4096, 4096)),  # experts in RAM beside a GPU
    (True, (), "all", (2048, 512)),
    (False, (EXPERT_PATTERN,), "attn", (2048, 512)),  # no GPU backend: llama.cpp's defaults
    (True, (EXPERT_PATTERN,), "auto", (2048, 512)),  # auto sized the compute buffer for these
])
def test_batch_sizes_follow_the_placement(gpu, overrides, preset, expected):
    plan = SimpleNamespace(gpu_backend=gpu, overrides=overrides, preset_requested=preset)
    assert loader.batch_sizes(settings(batch=None, ubatch=None), plan) == expected
    assert loader.batch_sizes(settings(batch=1024, ubatch=256), plan) == (1024, 256)
    assert loader.batch_sizes(settings(batch=256, ubatch=None), plan)[1] <= 256


def test_a_failed_load_with_the_large_default_micro_batch_is_retried_with_llamas(tiny_gguf, monkeypatch, caplog):
    """Where the larger compute buffer of ubatch 4096 does not fit the GPU, the load falls back to 512.
    The GPU is stood in for (this machine has none): the backend says it can offload, and the first
    context creation fails as an out-of-memory one does."""
    monkeypatch.setattr(loader.llama_cpp, "llama_supports_gpu_offload", lambda: True)
    real_init = loader.PlacedLlama.__init__
    tried = []

    def init(self, path, **kwargs):
        tried.append(kwargs["n_ubatch"])
        if kwargs["n_ubatch"] == loader.OFFLOAD_BATCH:  # llama.cpp's own refusal: a path it cannot open
            path = str(tiny_gguf) + ".absent"
        real_init(self, path, **kwargs)

    monkeypatch.setattr(loader.PlacedLlama, "__init__", init)
    with caplog.at_level(logging.WARNING, logger="server.loader"):
        llama, summary = open_model(str(tiny_gguf), settings(gpu_layers="attn", batch=None, ubatch=None, mmap=True))
    assert tried == [loader.OFFLOAD_BATCH, loader.DEFAULT_UBATCH]
    assert (summary["batch"], summary["ubatch"]) == (loader.DEFAULT_BATCH, loader.DEFAULT_UBATCH)
    assert "retrying with llama.cpp" in caplog.text
    # an explicit --ubatch is not second-guessed
    tried.clear()
    with pytest.raises(loader.ModelLoadError):
        open_model(str(tiny_gguf), settings(gpu_layers="attn", batch=4096, ubatch=4096, mmap=True))
    assert tried == [4096]


def test_the_context_keeps_logits_room_for_one_position_only(bigvocab_gguf):
    """n_outputs_max 1: llama.cpp's compute buffer holds no logits for the rest of a micro-batch."""
    compute = {}
    for n_outputs_max in (0, 1):  # 0: llama.cpp's default, one row of logits per token of the batch
        with capture_llama_log() as chunks:
            llama = PlacedLlama(str(bigvocab_gguf), n_outputs_max=n_outputs_max, n_ctx=2048, n_batch=2048,
                                n_ubatch=2048, n_threads=2, verbose=False)
        compute[n_outputs_max] = sum(parse_buffer_sizes("".join(chunks))["compute"].values())
        n_vocab = llama.n_vocab()
        llama.eval(list(range(300, 1300)))  # a long prompt still evaluates; the last position's logits come back
        assert llama._ctx.get_logits_ith(-1)[0] == llama._ctx.get_logits_ith(-1)[0]  # a number, not NaN
        llama.close()
    # most of the 268 MB of logits for 2048 tokens (the graph allocator overlaps some of it with other tensors)
    assert compute[0] - compute[1] >= 0.5 * 2048 * n_vocab * 4


def test_compare_buffers_finds_a_mismatch():
    plan = {"tensors": [{"device": "gpu"}, {"device": "cpu"}],
            "weights": {"gpu": {"total": 100 * MiB}, "cpu": {"total": 50 * MiB}},
            "kv_cache": {"gpu": 8 * MiB, "cpu": 0}, "recurrent_state": {"gpu": MiB, "cpu": 0}}
    logged = {"model": {"CUDA0": 100 * MiB, "CUDA_Host": 50 * MiB}, "kv": {"CUDA0": 8 * MiB},
              "recurrent": {"CUDA0": MiB}, "compute": {"CUDA0": 300 * MiB}}
    assert compare_buffers(plan, logged)["ok"]
    logged["model"]["CUDA0"] += MiB  # a tensor the plan put elsewhere
    check = compare_buffers(plan, logged)
    assert not check["ok"] and not check["rows"]["model_gpu"]["ok"] and check["rows"]["model_gpu"]["diff"] == MiB
    # mmap with repacked tensors: the mapped span counts them again, so only "at least" holds on the CPU
    mapped = {"model": {"CUDA0": 100 * MiB, "CPU_Mapped": 50 * MiB, "CPU_REPACK": 20 * MiB},
              "kv": {"CUDA0": 8 * MiB}, "recurrent": {"CUDA0": MiB}}
    assert compare_buffers(plan, mapped)["ok"] and compare_buffers(plan, mapped)["note"]


@pytest.mark.skipif(not llama_cpp.llama_supports_gpu_offload(), reason="this llama.cpp build has no GPU backend")
@pytest.mark.parametrize(("gpu_layers", "cpu_moe_layers"), [("attn", None), ("all", None), ("none", None),
                                                            ("2", None), ("attn", 2)])
def test_gpu_placement_matches_logged_buffers(tiny_gguf, gpu_layers, cpu_moe_layers):
    fields = settings(gpu_layers=gpu_layers, cpu_moe_layers=cpu_moe_layers)
    llama, summary = open_model(str(tiny_gguf), fields)
    plan = plan_for_gguf(tiny_gguf, fields, gpu_backend=True)
    check = compare_buffers(plan.to_json(), summary["buffers"])
    assert check["ok"], check
    assert summary["preset_effective"] == gpu_layers and summary["gpu_backend"] is True
    experts_in_ram = [t for t in plan.tensors if t.tclass == "routed_expert" and t.device == "cpu"]
    if plan.overrides:
        assert summary["overridden_tensors"] == len(experts_in_ram)
    assert llama.create_completion("x = ", max_tokens=2)["choices"]


def two_layer_budget(gguf: Path) -> SimpleNamespace:
    """Settings for `auto` with a --vram-budget that holds attn's part, the reserve and the last two
    layers' experts (and half a layer more)."""
    big = plan_for_gguf(gguf, settings(gpu_layers="auto", vram_budget=1 << 30), gpu_backend=True, free_bytes=1 << 40)
    reserve = big.auto["reserve_bytes"]  # the headroom's floor applies below 8 GiB, so a smaller limit keeps it
    two = plan_for_gguf(gguf, settings(gpu_layers="attn", cpu_moe_layers=2), gpu_backend=True)
    layer_1 = sum(t.nbytes for t in two.tensors if t.tclass == "routed_expert" and t.layer == 1)
    return settings(gpu_layers="auto", vram_budget=two.gpu_bytes + reserve + layer_1 // 2)


def test_a_two_layer_budget_plans_the_last_two_layers_experts_on_the_gpu(tiny_gguf):
    """The plan the GPU test below loads, computed here without a GPU."""
    plan = plan_for_gguf(tiny_gguf, two_layer_budget(tiny_gguf), gpu_backend=True, free_bytes=1 << 40)
    assert plan.auto["fits"] and plan.auto["cpu_moe_layers"] == 2
    experts = [t for t in plan.tensors if t.tclass == "routed_expert"]
    assert {t.layer for t in experts if t.device == "gpu"} == {2, 3}
    assert {t.layer for t in experts if t.device == "cpu"} == {0, 1}


@pytest.mark.skipif(not llama_cpp.llama_supports_gpu_offload(), reason="this llama.cpp build has no GPU backend")
def test_auto_with_a_small_budget_offloads_the_last_layers_experts(tiny_gguf):
    """On a GPU: `auto` under that budget keeps the first two layers' experts in RAM, and the buffers
    llama.cpp logs agree with the plan."""
    fields = two_layer_budget(tiny_gguf)
    llama, summary = open_model(str(tiny_gguf), fields)
    assert summary["auto"]["fits"] and summary["auto"]["cpu_moe_layers"] == 2, summary["auto"]
    plan = plan_for_gguf(tiny_gguf, fields, gpu_backend=True)
    assert compare_buffers(plan.to_json(), summary["buffers"])["ok"], summary["buffers"]
    experts = [t for t in plan.tensors if t.tclass == "routed_expert"]
    assert {t.layer for t in experts if t.device == "gpu"} == {2, 3}
    assert {t.layer for t in experts if t.device == "cpu"} == {0, 1}
    assert summary["overridden_tensors"] == sum(t.device == "cpu" for t in experts)
    assert llama.create_completion("x = ", max_tokens=2)["choices"]
    llama.close()


@pytest.mark.skipif(not llama_cpp.llama_supports_gpu_offload(), reason="this llama.cpp build has no GPU backend")
def test_no_host_buffer_keeps_the_experts_out_of_pinned_memory(tiny_gguf):
    for host_buffer in (True, False):
        llama, summary = open_model(str(tiny_gguf), settings(gpu_layers="attn", host_buffer=host_buffer))
        assert summary["host_buffer"] is host_buffer
        assert ("CUDA_Host" in summary["buffers"]["model"]) is host_buffer, summary["buffers"]
        assert llama.create_completion("x = ", max_tokens=2)["choices"]
        llama.close()


@pytest.mark.skipif(llama_cpp.llama_supports_gpu_offload(), reason="this llama.cpp build has a GPU backend")
def test_attn_without_gpu_backend_warns_once_and_runs_on_cpu(tiny_gguf, caplog):
    loader._warn_no_gpu_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="server.loader"):
        for _ in range(2):
            _, summary = open_model(str(tiny_gguf), settings(gpu_layers="attn"))
    warnings = [r for r in caplog.records if "no GPU backend" in r.getMessage()]
    assert len(warnings) == 1
    assert summary["preset_requested"] == "attn" and summary["preset_effective"] == "none"
    assert summary["gpu_backend"] is False and summary["overrides"] == [] and summary["gpu_layers_offloaded"] == 0
    assert summary["mmap"] is True


def test_overrides_reach_llama_cpp(tiny_gguf):
    """The override array is read by llama.cpp: it logs every expert tensor as sent to the CPU."""
    lib = llama_cpp.llama_cpp._lib
    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    lib.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    assert cpu_buffer_type() == lib.ggml_backend_dev_buffer_type(lib.ggml_backend_dev_by_type(0))  # 0: CPU

    with capture_llama_log() as chunks:
        llama = PlacedLlama(str(tiny_gguf), cpu_patterns=(EXPERT_PATTERN,), n_ctx=512, verbose=False)
    moved = OVERRIDE_LINE.findall("".join(chunks))
    plan = plan_for_gguf(tiny_gguf, settings(), gpu_backend=True)
    assert sorted(name for name, _ in moved) == sorted(t.name for t in plan.tensors if t.device == "cpu"
                                                       and t.tclass == "routed_expert")
    assert all(is_host_buffer(buft) for _, buft in moved)  # CPU, or CUDA_Host where a GPU backend exists
    assert llama.placement_overrides is not None  # kept alive by the model
    assert llama.create_completion("x = ", max_tokens=2)["choices"]


def test_log_capture_restores_the_previous_logger():
    def current() -> int | None:
        cb, data = llama_cpp.llama_log_callback(), ctypes.c_void_p()
        llama_cpp.llama_log_get(ctypes.byref(cb), ctypes.byref(data))
        return ctypes.cast(cb, ctypes.c_void_p).value

    before = current()
    with capture_llama_log():
        assert current() != before
    assert current() == before


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"ctx_size": -1}, "ctx_size"),
        ({"threads": 0}, "threads"),
        ({"batch": 1 << 20}, "batch"),
        ({"ubatch": "many"}, "ubatch"),
        ({"gpu_layers": "gpu"}, "gpu_layers"),
        ({"cpu_moe_layers": -2}, "cpu_moe_layers"),
    ],
)
def test_bad_settings_are_refused_before_native_code(tiny_gguf, fields, message):
    with pytest.raises(PlacementError, match=message):
        open_model(str(tiny_gguf), settings(**fields))


def test_missing_truncated_and_incomplete_models(tmp_path, tiny_gguf):
    import numpy as np
    from gguf import GGUFWriter

    with pytest.raises(PlacementError, match="not found"):
        open_model(str(tmp_path / "absent.gguf"), settings())
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: 2 * MiB])
    with pytest.raises(PlacementError, match="not a readable GGUF"):
        open_model(str(cut), settings(gpu_layers="none"))
    # a well-formed GGUF that llama.cpp cannot build a model from (keys and tensors missing)
    incomplete = tmp_path / "incomplete.gguf"
    writer = GGUFWriter(incomplete, "qwen3next")
    writer.add_block_count(1)
    writer.add_full_attention_interval(1)  # its one layer is full attention, which llama.cpp needs
    writer.add_context_length(512)
    writer.add_embedding_length(64)
    writer.add_head_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((32, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="could not load"):
        open_model(str(incomplete), settings(gpu_layers="none"))


def test_project_settings_model(tiny_gguf):
    from server.settings import Settings

    llama, summary = open_model(str(tiny_gguf), Settings(model=tiny_gguf, gpu_layers="none", ctx_size=256))
    assert summary["ctx_size"] == 256 and summary["preset_effective"] == "none"
    assert llama.n_ctx() == 256


@pytest.mark.parametrize("bound", [None, "close"])
def test_pin_threads_without_openmp_binding_in_place_warns(tiny_gguf, monkeypatch, caplog, bound):
    """Settings used outside the CLI cannot bind threads once llama.cpp is loaded: that is said, not hidden."""
    if bound is None:
        monkeypatch.delenv("OMP_PROC_BIND", raising=False)
    else:
        monkeypatch.setenv("OMP_PROC_BIND", bound)
    with caplog.at_level(logging.WARNING, logger="server.loader"):
        llama, summary = open_model(str(tiny_gguf), settings(gpu_layers="none", pin_threads=True))
    llama.close()
    assert ("pin_threads has no effect" in caplog.text) is (bound is None)
    assert summary["thread_binding"] == bound

#!/usr/bin/env bash
# On a GPU machine WITHOUT network: install from .offline-bundle/ (made by scripts/gpu-prepare.sh) and run
# the placement benchmark. From the repository root:
#
#   scripts/gpu-run.sh install              # compile llama-cpp-python with CUDA, install the wheels
#   scripts/gpu-run.sh bench [options...]   # bench/gpu.py --out "$OUT" [options...]
#   scripts/gpu-run.sh all [options...]     # both
#   scripts/gpu-run.sh test                 # the GPU cases of the loader tests (pytest)
#   scripts/gpu-run.sh deps                 # only the pure-Python wheels and the project (seconds)
#   scripts/gpu-run.sh python               # print the interpreter the phases install into and use
#   scripts/gpu-run.sh levers [options...]  # bench/gpu_levers.py --out "$OUT" [options...]: speed levers
#   scripts/gpu-run.sh loadcheck [args...]  # scripts/load_check.py: which placement/mmap/repack loads crash
#   scripts/gpu-run.sh http MODEL [opts] -- [serve flags]  # bench/http_overhead.py --out "$OUT": HTTP vs raw, one process
#   scripts/gpu-run.sh pack DIR             # the compiled llama-cpp-python as DIR/llama-cpp-cuda.tar.xz.* (15 MiB parts)
#
# A build packed on one machine installs on another of the same image without compiling: put the parts
# in .offline-bundle/prebuilt/ and `install` unpacks them (and compiles only if that build cannot offload).
#
# Results go to $OUT (default .offline-bundle/out): gpu-bench.json, gpu-bench.md, plus the server logs.
# Installs into the active virtual environment, or else into .venv (created with
# --system-site-packages so the machine's numpy, jinja2, cmake, ninja and scikit-build-core are
# used); the model is built under build/gpu-bench. Both are git-ignored, survive between runs and
# are reused, so each phase fits in a few minutes.
#   CUDA_ARCHITECTURES  GPU generation to compile for (default 90: Hopper, e.g. H100/H200)
#   JOBS                parallel compile jobs (default: the number of CPUs)
set -euo pipefail

cd "$(dirname "$0")/.."
DEV=.offline-bundle
VENV=.venv
OUT=${OUT:-$DEV/out}
LLAMA_VERSION=0.3.36
phase=${1:-all}
shift || true

fail() { echo "gpu-run: $*" >&2; exit 1; }

# The interpreter to install into: .venv if it exists; the active virtual environment if python3
# runs in one; otherwise a new .venv that sees the system's packages.
pick_python() {
    if [ -x "$VENV/bin/python" ]; then
        echo "$VENV/bin/python"
    elif python3 -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
        command -v python3
    else
        # --without-pip: the machine's pip (a system site package) installs into this venv
        python3 -m venv --system-site-packages --without-pip "$VENV" && echo "$VENV/bin/python"
    fi
}

deps() {
    [ -f "$DEV/requirements.txt" ] || fail "$DEV is missing; run scripts/gpu-prepare.sh on a machine with network"
    local py
    py=$(pick_python)
    echo "gpu-run: installing into $("$py" -c 'import sys; print(sys.prefix)') ($("$py" --version))"
    "$py" -m pip --version >/dev/null || fail "no pip for $(python3 --version)"
    "$py" -m pip install --quiet --no-index --find-links "$DEV/wheels" -r "$DEV/requirements.txt"
    # The project itself; the benchmarks run it from this tree (python -m) either way.
    "$py" -m pip install --quiet --no-index --find-links "$DEV/wheels" --no-deps --no-build-isolation . \
        || echo "gpu-run: warning: installing the project failed; running it from the source tree" >&2
}

install() {
    deps
    local py
    py=$(pick_python)
    if ! has_gpu_offload "$py" && compgen -G "$DEV/prebuilt/llama-cpp-cuda.tar.xz.*" >/dev/null; then
        echo "gpu-run: unpacking the prebuilt llama-cpp-python from $DEV/prebuilt"
        cat "$DEV"/prebuilt/llama-cpp-cuda.tar.xz.* | xz -d | tar -x -C "$(site_dir "$py")" \
            || echo "gpu-run: warning: the prebuilt package did not unpack" >&2
    fi
    if has_gpu_offload "$py"; then
        echo "gpu-run: llama-cpp-python with GPU offload is installed"
    else
        [ -f "$DEV/llama_cpp_python-$LLAMA_VERSION.tar.gz" ] || fail "$DEV is missing; run scripts/gpu-prepare.sh on a machine with network"
        command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ] || fail "nvcc not found: the CUDA toolkit is needed to compile llama.cpp"
        export PATH="$PATH:/usr/local/cuda/bin"
        echo "gpu-run: compiling llama-cpp-python $LLAMA_VERSION with CUDA (a few minutes)"
        CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES:-90} -DLLAVA_BUILD=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-$(nproc)} \
            "$py" -m pip install --no-build-isolation --no-deps --no-index --force-reinstall \
            "$DEV/llama_cpp_python-$LLAMA_VERSION.tar.gz"
    fi
    "$py" -c 'import llama_cpp; assert llama_cpp.llama_supports_gpu_offload(), "no GPU offload"; print("gpu-run: llama.cpp GPU offload: yes")'
}

has_gpu_offload() {
    "$1" -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)' 2>/dev/null
}

site_dir() {
    "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}

# The installed package with each shared library once (the wheel holds libX.so, libX.so.0 and
# libX.so.0.N as copies; here the copies become links), compressed and cut into parts that travel.
pack() {
    local py dest site
    py=$(pick_python)
    dest=${1:?usage: $0 pack DIR}
    has_gpu_offload "$py" || fail "no llama-cpp-python with GPU offload to pack"
    site=$(site_dir "$py")
    [ -d "$site/llama_cpp" ] || fail "llama_cpp is not under $site"
    "$py" - "$site/llama_cpp/lib" <<'PY'
import hashlib, os, sys
lib = sys.argv[1]
first = {}
for name in sorted(os.listdir(lib), key=len):
    path = os.path.join(lib, name)
    if os.path.islink(path) or not os.path.isfile(path):
        continue
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest in first:
        os.remove(path)
        os.symlink(first[digest], path)
    else:
        first[digest] = name
PY
    mkdir -p "$dest"
    tar -C "$site" --exclude=__pycache__ -cf - llama_cpp $(cd "$site" && ls -d llama_cpp_python-*.dist-info) \
        | xz -T0 -6 | split -b 15M -d - "$dest/llama-cpp-cuda.tar.xz."
    ls -l "$dest"/llama-cpp-cuda.tar.xz.*
}

bench() {
    local py
    py=$(pick_python)
    "$py" -c 'import llama_cpp' 2>/dev/null || fail "run '$0 install' first"
    mkdir -p "$OUT"
    "$py" bench/gpu.py --out "$OUT" --work build/gpu-bench "$@"
    cp build/gpu-bench/serve-*.log "$OUT"/ 2>/dev/null || true
}

run_tests() {
    local py
    py=$(pick_python)
    mkdir -p "$OUT"
    "$py" -X faulthandler -m pytest -q -rs tests/server/test_loader.py tests/server/test_placement.py "$@" 2>&1 | tee "$OUT/pytest-gpu.txt"
}

levers() {
    local py
    py=$(pick_python)
    mkdir -p "$OUT"
    "$py" bench/gpu_levers.py --out "$OUT" --work build/gpu-bench "$@"
}

http_overhead() {
    local py
    py=$(pick_python)
    mkdir -p "$OUT"
    "$py" bench/http_overhead.py --out "$OUT" "$@"
}

case "$phase" in
    deps) deps ;;
    http) http_overhead "$@" ;;
    python) pick_python ;;  # the interpreter the other phases use
    levers) levers "$@" ;;
    loadcheck) "$(pick_python)" scripts/load_check.py "$@" ;;
    install) install ;;
    pack) pack "$@" ;;
    bench) bench "$@" ;;
    test) run_tests "$@" ;;
    all) install && bench "$@" ;;
    *) fail "usage: $0 [install|deps|bench|levers|http|loadcheck|pack|all|test] [options...]" ;;
esac

#!/usr/bin/env bash
# Build .offline-bundle/ (git-ignored): everything a GPU machine WITHOUT network needs to run bench/gpu.py.
# Run it on a machine with network access to the package index, from anywhere:
#
#   scripts/gpu-prepare.sh [path/to/llama_cpp_python-0.3.36.tar.gz]
#
# .offline-bundle/ then holds
#   llama_cpp_python-0.3.36.tar.gz  the sdist, without llama.cpp's models, docs, tests, examples,
#                                   benches, tools/server, tools/ui and .git (not needed to build)
#   wheels/                         every Python dependency the GPU machine lacks, for CPython
#                                   3.10-3.14 on x86-64 and arm64 Linux
#   requirements.txt                what scripts/gpu-run.sh installs from wheels/
# The GPU machine is assumed to have Python with pip, scikit-build-core, cmake, ninja, numpy and
# jinja2, plus the CUDA toolkit; scripts/gpu-run.sh installs the rest from here.
set -euo pipefail

cd "$(dirname "$0")/.."
LLAMA_VERSION=0.3.36
DEST=.offline-bundle
LIMIT_MIB=64
PY_VERSIONS=(3.10 3.11 3.12 3.13 3.14)
PLATFORMS=(x86_64 aarch64)
# Present on the GPU machine already (and large): never carried.
PROVIDED='^(numpy|jinja2|markupsafe|scikit-build-core|cmake|ninja)$'

PYTHON=${PYTHON:-python3}
sdist=${1:-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

rm -rf "$DEST"
mkdir -p "$DEST/wheels"

# --- the llama-cpp-python sdist, stripped --------------------------------------------------------
if [ -z "$sdist" ]; then
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$tmp/dl"
    sdist=$(ls "$tmp"/dl/llama_cpp_python-*.tar.gz)
fi
tar -xzf "$sdist" -C "$tmp"
src="$tmp/llama_cpp_python-$LLAMA_VERSION"
[ -d "$src/vendor/llama.cpp" ] || { echo "gpu-prepare: $sdist is not the llama-cpp-python $LLAMA_VERSION sdist" >&2; exit 1; }
for dir in models docs tests examples benches tools/server tools/ui; do
    rm -rf "${src:?}/vendor/llama.cpp/$dir"
done
find "$src" -name .git -prune -exec rm -rf {} +
tar -C "$tmp" -czf "$DEST/llama_cpp_python-$LLAMA_VERSION.tar.gz" "llama_cpp_python-$LLAMA_VERSION"

# --- the Python dependencies ---------------------------------------------------------------------
# The project's own, less llama-cpp-python (built from the sdist) and what the machine provides;
# llama-cpp-python's small ones; setuptools to install the project itself; pytest and httpx to run
# the GPU cases of tests/server/test_loader.py there.
"$PYTHON" - "$DEST/requirements.txt" <<'EOF'
import re, sys, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
keep = [d for d in deps if not re.match(r"(llama-cpp-python|numpy|jinja2)\b", d, re.I)]
keep += ["diskcache>=5.6.1", "typing-extensions>=4.5", "setuptools>=70.1", "httpx>=0.27", "pytest>=8"]
open(sys.argv[1], "w").write("\n".join(keep) + "\n")
EOF

for py in "${PY_VERSIONS[@]}"; do
    for arch in "${PLATFORMS[@]}"; do
        platform_flags=(--platform "manylinux_2_28_$arch" --platform "manylinux_2_17_$arch" --platform "manylinux2014_$arch")
        # Resolve for that interpreter and platform without installing anything, then fetch each wheel.
        if ! "$PYTHON" -m pip install --quiet --dry-run --ignore-installed --only-binary=:all: \
            --python-version "$py" "${platform_flags[@]}" --target "$tmp/unused" \
            --report "$tmp/report.json" -r "$DEST/requirements.txt"; then
            echo "gpu-prepare: warning: no complete set of wheels for Python $py on $arch; skipped" >&2
            continue
        fi
        "$PYTHON" - "$tmp/report.json" "$PROVIDED" > "$tmp/pins.txt" <<'EOF'
import json, re, sys
report = json.load(open(sys.argv[1]))
for item in report["install"]:
    meta = item["metadata"]
    if not re.match(sys.argv[2], meta["name"].lower()):
        print(f"{meta['name']}=={meta['version']}")
EOF
        "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" \
            "${platform_flags[@]}" -d "$DEST/wheels" -r "$tmp/pins.txt"
    done
done

# --- size check ----------------------------------------------------------------------------------
size_kib=$(du -sk "$DEST" | cut -f1)
ls -1 "$DEST/wheels" > "$DEST/wheels.txt"
echo "gpu-prepare: $DEST is $((size_kib / 1024)) MiB ($(wc -l < "$DEST/wheels.txt") wheels)"
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "gpu-prepare: $DEST exceeds $LIMIT_MIB MiB" >&2
    exit 1
fi

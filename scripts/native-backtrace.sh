#!/usr/bin/env bash
# Run a command with a native backtrace printed if it crashes (SIGSEGV and friends), with each frame
# inside a shared library resolved to a function name (addr2line). Needs a C compiler and binutils.
#
#   scripts/native-backtrace.sh python -m pytest -q tests/server/test_loader.py
#
# Output: the command's standard output as it comes, its standard error when it ends (after a crash with
# "native backtrace: ..." and the raw frames), then a resolved copy of the frames. The exit status is the
# command's.
set -uo pipefail

cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
mkdir -p build
lib=build/segv_backtrace.so
if [ ! -f "$lib" ] || [ scripts/segv_backtrace.c -nt "$lib" ]; then
    cc -O1 -g -shared -fPIC -o "$lib.$$" scripts/segv_backtrace.c && mv -f "$lib.$$" "$lib" \
        || { echo "native-backtrace: cc failed" >&2; exit 2; }
fi
log=$(mktemp)
# standard error goes to a file and is shown when the command ends, so the frames are all there to read
LD_PRELOAD="$PWD/$lib${LD_PRELOAD:+:$LD_PRELOAD}" "$@" 2> "$log"
status=$?
cat "$log" >&2
if grep -q "^native backtrace:" "$log"; then
    echo "native-backtrace: frames resolved:" >&2
    # frames look like /path/lib.so(symbol+0x1f) [0x7f...] or /path/lib.so(+0x1234) [0x7f...]
    sed -n '/^native backtrace:/,$p' "$log" | grep -E '^/.+\(\+0x[0-9a-f]+\)' | while IFS= read -r frame; do
        file=${frame%%(*}
        offset=$(sed -E 's/.*\(\+(0x[0-9a-f]+)\).*/\1/' <<<"$frame")
        printf '  %s %s: %s\n' "$(basename "$file")" "$offset" \
            "$(addr2line -f -C -e "$file" "$offset" 2>/dev/null | head -1)" >&2
    done
fi
rm -f "$log"
exit $status

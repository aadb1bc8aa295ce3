#!/usr/bin/env bash
# Builds the n-gram extension mmfuse._ngram with AddressSanitizer and UndefinedBehaviorSanitizer into
# a temporary folder (the installed extension is untouched) and runs the n-gram tests against it.
#   tests/asan_ngram.sh                 # all n-gram tests
#   tests/asan_ngram.sh -k arpa -x      # extra arguments go to pytest
# PYTHON picks the interpreter (default: .venv/bin/python of this checkout, else python3); CXX the
# compiler (default g++); ASAN_BUILD_DIR a folder kept between runs (only changed sources are
# recompiled) instead of a temporary one. Any sanitizer report fails the run (halt_on_error); leaks
# are not checked (the Python host itself does not free everything at exit).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
[ -x "$py" ] || py=python3
cxx=${CXX:-g++}
if [ -n "${ASAN_BUILD_DIR:-}" ]; then
    work=$(mkdir -p "$ASAN_BUILD_DIR" && cd "$ASAN_BUILD_DIR" && pwd)
else
    work=$(mktemp -d "${TMPDIR:-/tmp}/mmfuse-asan.XXXXXX")
    trap 'rm -rf "$work"' EXIT
fi

# A package folder that is the source tree but for the sanitized extension.
rm -rf "$work/pkg"
mkdir -p "$work/obj" "$work/pkg/mmfuse"
for f in "$root"/engine/* "$root"/engine/.[!.]*; do
    [ -e "$f" ] || continue
    case $(basename "$f") in _ngram*.so|__pycache__) ;; *) ln -s "$f" "$work/pkg/mmfuse/" ;; esac
done
[ -d "$root/kernels" ] && ln -s "$root/kernels" "$work/pkg/mmfuse/kernels"

flags="-std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined -fPIC -pthread"
includes="$("$py" -m pybind11 --includes) -I$root/csrc/ngram"
suffix=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
echo "building the sanitized extension in $work ..." >&2
for src in "$root"/csrc/ngram/*.cpp; do  # sources newer than their object (or any header newer)
    obj="$work/obj/$(basename "$src" .cpp).o"
    stale=0
    for dep in "$src" "$root"/csrc/ngram/*.hh; do
        if [ "$dep" -nt "$obj" ]; then stale=1; fi
    done
    if [ $stale = 1 ]; then echo "$src"; fi
done | xargs -r -P "$(nproc)" -I{} sh -c "$cxx $flags $includes -c {} -o $work/obj/\$(basename {} .cpp).o"
$cxx -shared $flags -o "$work/pkg/mmfuse/_ngram$suffix" "$work"/obj/*.o

export PYTHONPATH="$work/pkg${PYTHONPATH:+:$PYTHONPATH}"
export LD_PRELOAD="$($cxx -print-file-name=libasan.so) $($cxx -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export MMFUSE_SANITIZED=1  # tests that need an address-space limit (which ASan cannot run under) skip it
"$py" -c "import mmfuse._ngram as m, sys; sys.exit(0 if m.__file__.startswith('$work') else 'not the sanitized build: ' + m.__file__)"
cd "$root"
"$py" -m pytest tests/test_ngram*.py -q -p no:cacheprovider "$@"

#!/usr/bin/env bash
# Builds llama.cpp's own command-line tools from the llama.cpp sources inside the llama-cpp-python
# sdist of exactly the version installed in the venv, for benchmarks/llamacpp_speed.py: by
# default llama-speculative-simple only (about 10 minutes on 2 cores); llama-server is not cheap
# (the multimodal library and the web UI come with it, well over 10 more minutes) and the
# benchmark does not use it. Outside the package's set-up: everything lands under
# build/llamacpp-tools/ (gitignored). Idempotent: a target whose binary is there is not rebuilt.
#
#   bash benchmarks/build_llamacpp_tools.sh            # prints the bin directory last
#   LLAMACPP_TARGETS="llama-speculative-simple llama-server" bash benchmarks/build_llamacpp_tools.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
jobs=${JOBS:-2}
targets=${LLAMACPP_TARGETS:-llama-speculative-simple}

version=$("$python" -c "import llama_cpp; print(llama_cpp.__version__)")
root=build/llamacpp-tools
src=$root/llama_cpp_python-$version
bin=$root/build-$version/bin
mkdir -p "$root"

missing=""
for t in $targets; do
    [ -x "$bin/$t" ] || missing="$missing $t"
done
if [ -z "$missing" ]; then
    echo "already built:$(printf ' %s' $targets)" >&2
    echo "$bin"
    exit 0
fi

if [ ! -d "$src/vendor/llama.cpp" ]; then
    sdist=$(ls "$root"/llama_cpp_python-"$version".tar.gz 2>/dev/null || true)
    if [ -z "$sdist" ]; then
        cached=$(find ~/.cache/pip -name "llama_cpp_python-$version.tar.gz" 2>/dev/null | head -n1)
        if [ -n "$cached" ]; then
            cp "$cached" "$root/"
        else
            # Only this package from source (":all:" would build its build dependencies too).
            "$python" -m pip download --no-deps --no-binary llama-cpp-python --dest "$root" \
                "llama-cpp-python==$version" >&2
        fi
        sdist=$root/llama_cpp_python-$version.tar.gz
    fi
    tar -xzf "$sdist" -C "$root"
fi

build=$root/build-$version
if [ ! -f "$build/CMakeCache.txt" ]; then
    nice -n 19 cmake -S "$src/vendor/llama.cpp" -B "$build" \
        -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=ON \
        -DBUILD_SHARED_LIBS=OFF >&2
fi
# shellcheck disable=SC2086
nice -n 19 cmake --build "$build" --config Release -j "$jobs" --target $missing >&2
echo "$bin"

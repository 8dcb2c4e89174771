#!/usr/bin/env bash
# Creates .venv (once) with torch 2.13.0 first, then the package and its extras.
# Usage: bash tools/setup.sh [extras]   (default extras: models,plot)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-models,plot}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
stamp=".venv/.specsample-setup-$extras"
if [ -f "$stamp" ] && [ pyproject.toml -ot "$stamp" ] && [ tools/setup.sh -ot "$stamp" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
echo "specsample: setting up .venv (torch 2.13.0, then .[$extras]) ..." >&2
quiet "${pip[@]}" "torch==2.13.0"
case ",$extras," in
  *,llamacpp,*)
    echo "specsample: the first set-up compiles llama.cpp (about 10 minutes on 2 cores);" \
      "pip's wheel cache keeps the build for later set-ups" >&2
    # llama.cpp compiles for this processor (-march=native). On processors with AMX tiles that
    # includes its AMX kernels, which crash with an illegal instruction on repacked Q4_K
    # weights in llama-cpp-python 0.3.36: compile without them (x86-64 compilers that know
    # the flags; the other kernels are unchanged).
    llama=("llama-cpp-python>=0.3")
    no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    if [ "$(uname -m)" = x86_64 ] && ${CC:-cc} $no_amx -E -x c /dev/null >/dev/null 2>&1; then
      llama+=(--config-settings="cmake.define.CMAKE_C_FLAGS=$no_amx"
        --config-settings="cmake.define.CMAKE_CXX_FLAGS=$no_amx")
    fi
    quiet "${pip[@]}" "${llama[@]}"
    has_amx='import llama_cpp, sys; sys.exit(b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info())'
    if [ "${#llama[@]}" -gt 1 ] && .venv/bin/python -c "$has_amx" 2>/dev/null; then
      # a build with AMX kernels (pip's wheel cache keys a build by its sources, not by the
      # flags it was compiled with): drop it from the cache and compile again without them
      echo "specsample: the installed llama.cpp has AMX kernels; compiling it again without" \
        "them (about 10 minutes on 2 cores)" >&2
      version=$(.venv/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)')
      .venv/bin/python -m pip cache remove llama_cpp_python >/dev/null 2>&1 || true
      quiet "${pip[@]}" --force-reinstall --no-deps "llama-cpp-python==$version" "${llama[@]:1}"
    fi
    ;;
esac
quiet "${pip[@]}" -e ".[$extras]"
touch "$stamp"

#!/usr/bin/env bash
# Creates .venv (once) with torch 2.13.0 first, then the package and its extras.
# Usage: bash tools/setup.sh [extras]   (default extras: models,plot)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-models,plot}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
stamp=".venv/.specsample-setup-$extras"
if [ -f "$stamp" ] && [ pyproject.toml -ot "$stamp" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
[ -d /opt/wheels ] && pip+=(--find-links /opt/wheels)
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
echo "specsample: setting up .venv (torch 2.13.0, then .[$extras]) ..." >&2
case ",$extras," in
  *,llamacpp,*) echo "specsample: the first set-up compiles llama.cpp (about 10 minutes on 2" \
    "cores); pip's wheel cache keeps the build for later set-ups" >&2 ;;
esac
quiet "${pip[@]}" "torch==2.13.0"
quiet "${pip[@]}" -e ".[$extras]"
touch "$stamp"

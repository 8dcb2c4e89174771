#!/usr/bin/env bash
# The main job, set-up included. Until speculative decoding on models lands, it explains one exact
# speculative sampling step (the worked example) in the terminal and as explain.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh models,plot
exec .venv/bin/specsample explain "$@"

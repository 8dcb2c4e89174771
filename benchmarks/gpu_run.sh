#!/usr/bin/env bash
# The one device run for the GPU work: the kernel and static-adapter tests on CUDA, then
# benchmarks/gpu.py, which rewrites benchmarks/gpu.md. Made for the lent H200 (its python3 holds
# torch, triton and transformers; specsample is used from src/ without installing it). Logs and
# the report are also copied to $OUT when it is set. Under 10 minutes (tests 200 s at most, the
# benchmark stops measuring after 330 s).
#
#   bash benchmarks/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
logs=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$logs/gpu_env.log"
"$python" -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" 2>&1 | tee -a "$logs/gpu_env.log"
timeout 200 "$python" -m pytest -q -p no:cacheprovider -x tests/kernels tests/adapters/test_hf_static.py 2>&1 | tee "$logs/gpu_tests.log"
tests_status=${PIPESTATUS[0]}
timeout 380 "$python" benchmarks/gpu.py --budget 330 2>&1 | tee "$logs/gpu_bench.log"
bench_status=${PIPESTATUS[0]}
cp benchmarks/gpu.md "$logs/gpu.md" 2>/dev/null
echo "tests exit $tests_status, benchmark exit $bench_status"

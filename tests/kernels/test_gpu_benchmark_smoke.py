"""benchmarks/gpu.py runs end to end in its tiny --smoke mode (CPU, Triton's interpreter), so the
one device run it is written for does not fail on a mistake a CPU could have found."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu.py"


@pytest.mark.slow
def test_gpu_benchmark_smoke_run_writes_every_section(tmp_path):
    pytest.importorskip("transformers", reason="the benchmark builds Qwen2 models")
    out = tmp_path / "gpu.md"
    env = dict(os.environ)
    if not torch.cuda.is_available():  # the kernels run in Triton's interpreter on CPU tensors
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = out.read_text()
    assert "FAILED" not in report, report
    for title in [
        "Verification (chain rules)",
        "Verification (tree rule)",
        "Decoding passes",
        "Predicted speedup",
    ]:
        assert f"## {title}" in report
    assert "| tiny | eager |" in report
    assert "| tiny | static |" in report  # HFStaticLM's passes (eager on CPU)

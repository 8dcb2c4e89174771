"""benchmarks/gpu.py runs end to end in its tiny --smoke mode (CPU, Triton's interpreter), so the
one device run it is written for does not fail on a mistake a CPU could have found."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu.py"


def load_benchmark(monkeypatch):
    """The script as a module (registered while the test runs: its dataclasses need that)."""
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_benchmark_smoke_run_writes_every_section(tmp_path, monkeypatch):
    pytest.importorskip("transformers", reason="the benchmark builds Qwen2 models")
    out = tmp_path / "gpu.md"
    # In this process: tests/kernels/conftest.py has switched Triton's interpreter on without CUDA.
    assert load_benchmark(monkeypatch).main(["--smoke", "--out", str(out)]) == 0
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

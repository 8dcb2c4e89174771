"""Shared pieces of the kernel tests: the device they run on, and the comparison with the loop
references."""

from __future__ import annotations

import pytest
import torch

# CUDA where present (the compiled kernels); otherwise CPU tensors through Triton's interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_MISSING = "triton is not installed (the gpu extra); the kernels cannot be tested"
# Triton 3.6's interpreter cannot take a loop bound from a kernel argument; 3.9's can.
INTERPRETER_MIN_TRITON = (3, 9)


def require_triton() -> None:
    """Skips the calling test module where the kernels cannot run: no triton, or (without CUDA)
    an interpreter older than INTERPRETER_MIN_TRITON."""
    triton = pytest.importorskip("triton", reason=TRITON_MISSING)
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if DEVICE.type != "cuda" and version < INTERPRETER_MIN_TRITON:
        pytest.skip(
            f"triton {triton.__version__}'s interpreter cannot run the kernels; the CPU tests "
            f"need triton >= {'.'.join(map(str, INTERPRETER_MIN_TRITON))}",
            allow_module_level=True,
        )


def on_device(case):
    """The tensors of a case moved to DEVICE (None and other values as they are)."""
    return tuple(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in case)


def assert_same(kernel_result, reference_result, fields=("tokens", "num_accepted")):
    """Every field of the kernel's result equals the reference's, position by position."""
    for field in fields:
        got = getattr(kernel_result, field).cpu()
        expected = getattr(reference_result, field)
        assert torch.equal(got, expected), f"{field}: kernel {got.tolist()} != {expected.tolist()}"

"""Shared pieces of the kernel tests: the device they run on, and the comparison with the loop
references."""

from __future__ import annotations

import torch

# CUDA where present (the compiled kernels); otherwise CPU tensors through Triton's interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_MISSING = "triton is not installed (the gpu extra); the kernels cannot be tested"


def on_device(case):
    """The tensors of a case moved to DEVICE (None and other values as they are)."""
    return tuple(t.to(DEVICE) if isinstance(t, torch.Tensor) else t for t in case)


def assert_same(kernel_result, reference_result, fields=("tokens", "num_accepted")):
    """Every field of the kernel's result equals the reference's, position by position."""
    for field in fields:
        got = getattr(kernel_result, field).cpu()
        expected = getattr(reference_result, field)
        assert torch.equal(got, expected), f"{field}: kernel {got.tolist()} != {expected.tolist()}"

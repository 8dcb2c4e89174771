"""The kernel tests run on CUDA where a device is present, and otherwise on CPU tensors through
Triton's interpreter, which must be switched on before the kernels are first imported."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

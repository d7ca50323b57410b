"""Suite-wide settings. Triton kernels run under the interpreter when there is no GPU;
the variable must be set before any Triton kernel module is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

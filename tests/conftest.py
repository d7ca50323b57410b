"""Suite-wide settings. Triton kernels run under the interpreter when there is no GPU;
the variable must be set before any Triton kernel module is imported. CPU tensors reuse
freed memory (tnl_model.cpu_allocator "retain", as the package's entry points do), set
here once so that no test's speed depends on whether an earlier test ran the CLI; tests
that measure resident memory run in subprocesses with their own allocator settings."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tnl_model.cpu_allocator import configure_cpu_allocator  # noqa: E402 - after TRITON_INTERPRET

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
configure_cpu_allocator("retain")

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


_SHM = "/dev/shm"
_SHM_PREFIX = "deepspeed_allreduce_buffer_"
_shm_before = set(os.listdir(_SHM)) if os.path.isdir(_SHM) else set()


def pytest_sessionfinish(session, exitstatus):
    """DeepSpeed's CPU allreduce op leaves a 66 MB buffer per rank in RAM-backed /dev/shm; runs the
    suite starts outside tnl_training.pretrain (transformers' Trainer) leak them: remove the new ones."""
    if not os.path.isdir(_SHM):
        return
    for name in set(os.listdir(_SHM)) - _shm_before:
        if name.startswith(_SHM_PREFIX):
            try:
                os.unlink(os.path.join(_SHM, name))
            except OSError:
                pass

"""How glibc's malloc hands memory to PyTorch's CPU tensors, and why it matters here.

Every CPU tensor above glibc's mmap threshold (128 KiB, raised dynamically up to
32 MiB) is a fresh ``mmap``, and memory at the top of the heap is given back to the
OS as soon as it is freed. Each new large tensor then pays a page fault per 4 KiB on
first touch: on a 2-core machine the lightning operator's forward+backward at 8K
tokens (H=8, D=64) took 440 ms with 67,000 page faults per call. Keeping freed
memory in the process cuts that to 111 ms and 6,800 faults, and helps every op in
the model the same way (a few faults remain: PyTorch allocates with posix_memalign,
whose split-off remainders can keep a freed block from merging back).

Modes (:func:`configure_cpu_allocator`):

* ``"retain"``: freed memory stays in the process and is reused; no page faults after
  warm-up. Resident memory stays at its high-water mark, as with jemalloc or tcmalloc.
  The ``tnl`` command line, pretraining and the benchmarks' timings use it on CPU.
* ``"strict"``: every allocation above 64 KiB is its own mapping, unmapped when freed, so
  resident memory follows live tensors; for measuring peak memory, slow otherwise.

Only glibc (Linux) has these knobs; elsewhere the call does nothing and returns False.
``TNL_CPU_ALLOCATOR=off`` makes :func:`configure_from_env` leave the allocator alone.
"""

import ctypes
import ctypes.util
import os
import sys

MODES = ("retain", "strict")
ENV_VAR = "TNL_CPU_ALLOCATOR"

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3

_SETTINGS = {
    # Allocations up to 1 GiB come from the heap, which is never trimmed and grows in 64 MiB steps.
    "retain": {_M_MMAP_THRESHOLD: 1 << 30, _M_TRIM_THRESHOLD: (1 << 31) - 1, _M_TOP_PAD: 64 << 20},
    "strict": {_M_MMAP_THRESHOLD: 64 << 10, _M_TRIM_THRESHOLD: 0, _M_TOP_PAD: 0},
}


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def configure_cpu_allocator(mode: str) -> bool:
    """Switch the process's malloc to ``mode`` (see the module docstring); True if it took effect.

    Takes effect for allocations made afterwards; switching to ``"strict"`` also returns the
    heap's free memory to the OS, so that resident memory starts from what is live.
    """
    if mode not in MODES:
        raise ValueError(f"CPU allocator mode must be one of {MODES}, got {mode!r}")
    libc = _glibc()
    if libc is None:
        return False
    accepted = all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS[mode].items())
    if mode == "strict":
        libc.malloc_trim(0)
    return accepted


def configure_from_env(default: str = "retain") -> str | None:
    """Apply ``$TNL_CPU_ALLOCATOR`` (``retain``, ``strict`` or ``off``), else ``default``.

    Returns the mode applied, or None when left alone (``off``, or not glibc).
    """
    mode = os.environ.get(ENV_VAR, default).strip().lower()
    if mode in ("off", "none", "0", ""):
        return None
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {MODES} or 'off', got {mode!r}")
    return mode if configure_cpu_allocator(mode) else None

"""Shared helpers for the benchmark scripts: timing medians, peak-memory sampling, result files.

Timings on CPU run under the "retain" allocator mode of ``tnl_model.cpu_allocator`` (the
one the package's entry points use). Peak memory on CPU is measured in separate runs
under its "strict" mode: the high-water mark of the bytes malloc has handed out (glibc's
``mallinfo2``; torch's CPU allocator has no counters) above the level just before the
measured call, sampled every millisecond. On CUDA it is ``torch.cuda.max_memory_allocated``
above the start.
"""

import ctypes
import json
import platform
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from tnl_model.cpu_allocator import configure_cpu_allocator

RESULTS = Path(__file__).resolve().parent / "results"


def fast_cpu_allocator() -> None:
    """Time under the allocator the package's entry points use on CPU (freed memory is reused, so
    large tensors pay no page faults: tnl_model.cpu_allocator). peak_memory() switches to the
    strict mode for its block (see peak_memory)."""
    configure_cpu_allocator("retain")


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats: int = 3, warmup: int = 1, device="cpu") -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_steps(model, ids, context: int, cache, device, memory_steps: int, timed_steps: int, skip: int) -> dict:
    """Feed ``ids[:, context:]`` one token at a time through ``cache``: the first ``memory_steps``
    under peak_memory(), then ``timed_steps`` timed ones. Returns the median ms per token (the
    first ``skip`` timed steps left out) and the memory growth of the measured steps."""
    with torch.no_grad():
        with peak_memory(device) as mem:
            for t in range(context, context + memory_steps):
                model(ids[:, t : t + 1], cache=cache, use_cache=True)
        per_token = []
        for t in range(context + memory_steps, context + memory_steps + timed_steps):
            synchronize(device)
            start = time.perf_counter()
            model(ids[:, t : t + 1], cache=cache, use_cache=True)
            synchronize(device)
            per_token.append(time.perf_counter() - start)
    return {"ms_per_token": 1e3 * statistics.median(per_token[skip:]), "peak_mb": mem["peak_mb"]}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo2():
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):  # not glibc >= 2.33
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def _cpu_bytes_in_use() -> int:
    """Bytes the process's malloc has handed out and not freed (all arenas plus mmapped blocks):
    live tensors and Python objects, whatever the heap's fragmentation. Resident memory would
    also count freed heap pages touched again by small allocations, which added 50-90 MiB at
    random to the same prefill. Without glibc: anonymous resident memory."""
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        return info.uordblks + info.hblkhd
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * 4096  # resident minus file-backed pages


@contextmanager
def peak_memory(device="cpu"):
    """Yields a dict whose ``"peak_mb"`` is filled with the peak growth during the block.

    On CPU the block runs under the strict allocator (every allocation above 64 KiB its own
    mapping, returned when freed: what the resident-memory fallback without glibc needs), which
    is slow: time other runs, not this one. Run the measured call once before (warm-up): the first
    call of a model also allocates what stays for later ones.
    """
    result = {}
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["peak_mb"] = (torch.cuda.max_memory_allocated() - start) / 2**20
        return
    configure_cpu_allocator("strict")
    start, peak, stop = _cpu_bytes_in_use(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _cpu_bytes_in_use())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result["peak_mb"] = max(0, max(peak[0], _cpu_bytes_in_use()) - start) / 2**20
        configure_cpu_allocator("retain")


def environment() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["cpu"] = platform.processor() or "cpu"
    return info


def write_results(name: str, payload: dict, out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    return path


def save_results(name: str, payload: dict, out_dir, plot) -> Path:
    """Write ``name.json`` and, through ``plot(payload, png_path)``, ``name.png``; say where."""
    out_dir = Path(out_dir)
    path = write_results(name, payload, out_dir)
    plot(payload, out_dir / f"{name}.png")
    print(f"\nwrote {path} and {path.with_suffix('.png')}")
    return path


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in header]] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))

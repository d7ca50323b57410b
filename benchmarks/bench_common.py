"""Shared helpers for the benchmark scripts: timing medians, peak-memory sampling, result files.

Timings on CPU run under the "retain" allocator mode of ``tnl_model.cpu_allocator`` (the
one the package's entry points use). Peak memory on CPU is measured in separate runs
under its "strict" mode: the resident-set high-water mark above the level just before
the measured call, sampled every millisecond from /proc (torch's CPU allocator has no
counters). On CUDA it is ``torch.cuda.max_memory_allocated`` above the start.
"""

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
    strict mode for its block, so that resident memory follows live tensors while it measures."""
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


def _rss_bytes() -> int:
    """Anonymous resident memory (resident minus file-backed pages): the pages of libtorch's
    shared objects that become resident the first time a code path runs are not the model's."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * 4096


@contextmanager
def peak_memory(device="cpu"):
    """Yields a dict whose ``"peak_mb"`` is filled with the peak growth during the block.

    On CPU the block runs under the strict allocator (every allocation above 64 KiB its own
    mapping, returned when freed), which is slow: time other runs, not this one.
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
    start, peak, stop = _rss_bytes(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result["peak_mb"] = max(0, max(peak[0], _rss_bytes()) - start) / 2**20
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

"""Benchmark of the lightning-attention operator (DESIGN.md section 8).

GPU run (default): bf16, H=32, D=E=128, T in {1K, ..., 32K}, in three sweeps — B=8,
B*T fixed at 64K tokens, and one sequence (B=1, long-context prefill) — timing in the
same process:

* ``triton``  - our Triton kernels (``tnl_kernels`` backend "triton"; the forward strategy
  chosen per call),
* ``triton_seq`` / ``triton_split`` - the same with every sequence walked (sequential
  forward, sequential state passes) or everything chunk-parallel (split forward, parallel
  states) forced: where they cross over is what tunes the automatic choices,
* ``torch``   - our chunked PyTorch path (backend "torch"),
* ``sdpa``    - causal ``scaled_dot_product_attention`` on the flash backend,
* ``fla``     - flash-linear-attention's ``chunk_simple_gla(g_gamma=-slopes, scale=1)`` when importable,

forward and forward+backward (median of ``triton.testing.do_bench``), plus decode
latency per token against context length (ours: one recurrent step, flat in T;
SDPA: one query over a T-long key/value cache). Reported: ms, TFLOP/s, achieved
GB/s and the fraction of the copy bandwidth measured in this run (the forward is
memory-bound: bytes = 2*(3*T*H*D)*B reads + the output write). Writes JSON and a
PNG (time vs T) to ``benchmarks/results/`` (or ``--out``).

``--cpu-smoke``: tiny sizes, torch paths only, wall-clock medians; prints the table
and writes nothing unless ``--out`` is given. It only checks that the script works.

    python benchmarks/bench_lightning_attn.py                 # on a GPU
    python benchmarks/bench_lightning_attn.py --cpu-smoke     # anywhere
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from tnl_kernels import build_slopes, lightning_attn, lightning_attn_decode

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GPU_LENGTHS = [1024, 2048, 4096, 8192, 16384, 32768]
GPU_SHAPE = dict(batch=8, heads=32, dim=128, tokens=65536)
SMOKE_LENGTHS = [64, 128, 256]
SMOKE_SHAPE = dict(batch=2, heads=2, dim=32, tokens=512)
CHUNK = 64  # block length of the chunked algorithms, for the FLOP count


# --------------------------------------------------------------------------- timing


class Timer:
    """Median time in ms of a callable: do_bench on the GPU, wall clock on the CPU."""

    def __init__(self, device: str, repeats: int):
        self.device, self.repeats = device, repeats

    def __call__(self, fn, grad_to_none=None) -> float:
        if self.device == "cuda":
            import triton.testing

            return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
        fn()  # warm-up
        samples = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)


def guarded(measure):
    """Run one measurement; an unavailable peer or an OOM becomes an entry, not a crash."""
    try:
        return {"ms": measure()}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"ms": None, "error": "out of memory"}
    except Exception as exc:  # noqa: BLE001 - a failing peer must not stop the other measurements
        return {"ms": None, "error": f"{type(exc).__name__}: {exc}"[:200]}


def copy_bandwidth_gbs(timer: Timer, device: str, n_bytes: int) -> float:
    """Device copy bandwidth (read + write), the roofline of a memory-bound kernel."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * n_bytes / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------- cost models


def lightning_forward_flops(batch, length, heads, dim):
    """Chunked form per token: QK^T and (QK^T)V on a C-block (2C(D+E)), inter and KV (4DE)."""
    return batch * heads * length * (2 * CHUNK * (dim + dim) + 4 * dim * dim)


def sdpa_forward_flops(batch, length, heads, dim):
    """Causal softmax attention: 4*T^2*D per head, halved by the mask."""
    return 2 * batch * heads * length * length * dim


def forward_bytes(batch, length, heads, dim, elem_bytes):
    """q, k, v reads plus the output write (DESIGN 8)."""
    return elem_bytes * (3 * length * heads * dim) * batch + elem_bytes * length * heads * dim * batch


# --------------------------------------------------------------------------- implementations


def make_inputs(batch, length, heads, dim, dtype, device, requires_grad):
    gen = torch.Generator(device=device).manual_seed(0)
    make = lambda: torch.randn(batch, length, heads, dim, device=device, dtype=dtype, generator=gen)  # noqa: E731
    q, k, v = (make().requires_grad_(requires_grad) for _ in range(3))
    return q, k, v, build_slopes(heads, 0, 24).to(device)


def lightning_call(backend):
    return lambda q, k, v, slopes: lightning_attn(q, k, v, slopes, backend=backend)[0]


def triton_forced_call(forward, states):
    """The Triton kernels with the forward strategy and the per-chunk state strategy forced."""
    from tnl_kernels import triton_backend

    def call(q, k, v, slopes):
        previous = triton_backend.FORWARD, triton_backend.STATES
        triton_backend.FORWARD, triton_backend.STATES = forward, states  # the backward keeps what the forward saw
        try:
            return lightning_attn(q, k, v, slopes, backend="triton")[0]
        finally:
            triton_backend.FORWARD, triton_backend.STATES = previous

    return call


def sdpa_call(q, k, v, slopes):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION] if q.is_cuda else [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION]
    with sdpa_kernel(backends):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
    return out.transpose(1, 2)


def fla_call():
    """flash-linear-attention's simple GLA with a per-head constant log-decay, or None."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception:  # noqa: BLE001 - absent or broken install
        return None

    def call(q, k, v, slopes):
        return chunk_simple_gla(q, k, v, g_gamma=-slopes, scale=1.0)[0]

    return call


def implementations(device):
    impls = {"torch": lightning_call("torch"), "sdpa": sdpa_call}
    if device == "cuda":
        impls["triton"] = lightning_call("triton")
        impls["triton_seq"] = triton_forced_call("sequential", "sequential")
        impls["triton_split"] = triton_forced_call("split", "parallel")
        fla = fla_call()
        if fla is not None:
            impls["fla"] = fla
    return impls


# --------------------------------------------------------------------------- measurements


def measure_point(name, fn, batch, length, heads, dim, dtype, device, timer, bandwidth):
    """Forward and forward+backward of one implementation at one shape."""
    point = _measure_point(name, fn, batch, length, heads, dim, dtype, device, timer, bandwidth)
    if device == "cuda":
        torch.cuda.empty_cache()  # the inputs died with _measure_point
    return point


def _measure_point(name, fn, batch, length, heads, dim, dtype, device, timer, bandwidth):
    q, k, v, slopes = make_inputs(batch, length, heads, dim, dtype, device, requires_grad=True)
    grad = torch.randn(batch, length, heads, dim, device=device, dtype=dtype)

    def forward():
        with torch.no_grad():
            fn(q, k, v, slopes)

    def forward_backward():
        fn(q, k, v, slopes).backward(grad)

    fwd = guarded(lambda: timer(forward))
    fwd_bwd = guarded(lambda: timer(forward_backward, grad_to_none=[q, k, v]))
    flops = sdpa_forward_flops(batch, length, heads, dim) if name == "sdpa" else lightning_forward_flops(batch, length, heads, dim)
    n_bytes = forward_bytes(batch, length, heads, dim, torch.finfo(dtype).bits // 8)
    if fwd["ms"]:
        seconds = fwd["ms"] * 1e-3
        fwd.update(tflops=flops / seconds / 1e12, gbs=n_bytes / seconds / 1e9, roofline_fraction=n_bytes / seconds / 1e9 / bandwidth)
    if fwd_bwd["ms"]:
        # Backward ~ 3 more lightning runs (ours, fla) or 2.5x the forward (flash attention).
        factor = 3.5 if name == "sdpa" else 4.0
        fwd_bwd.update(tflops=factor * flops / (fwd_bwd["ms"] * 1e-3) / 1e12)
    return {"impl": name, "B": batch, "T": length, "H": heads, "D": dim, "forward": fwd, "forward_backward": fwd_bwd}


def measure_decode(length, batch, heads, dim, dtype, device, timer, backend):
    """One generated token at context length T: our recurrent step vs one-query SDPA over a KV cache."""
    gen = torch.Generator(device=device).manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, device=device, dtype=dtype, generator=gen)  # noqa: E731
    q, k, v = rand(batch, heads, dim), rand(batch, heads, dim), rand(batch, heads, dim)
    slopes = build_slopes(heads, 0, 24).to(device)
    state = torch.zeros(batch, heads, dim, dim, device=device, dtype=torch.float32)
    ours = guarded(lambda: timer(lambda: lightning_attn_decode(q, k, v, slopes, state, backend=backend)))
    cache_k, cache_v = rand(batch, heads, length, dim), rand(batch, heads, length, dim)
    query = q.unsqueeze(2)
    softmax = guarded(lambda: timer(lambda: torch.nn.functional.scaled_dot_product_attention(query, cache_k, cache_v)))
    return {"T": length, "B": batch, "lightning_decode": ours, "sdpa_decode": softmax}


def sweeps(lengths, shape):
    """The three sweeps: fixed batch, fixed token count B*T, and a single sequence."""
    fixed_batch = [(shape["batch"], t) for t in lengths]
    fixed_tokens = [(max(1, shape["tokens"] // t), t) for t in lengths]
    one_sequence = [(1, t) for t in lengths]
    return {"fixed_batch": fixed_batch, "fixed_tokens": fixed_tokens, "one_sequence": one_sequence}


# --------------------------------------------------------------------------- output


def fmt(value, pattern):
    return "-" if value is None else pattern.format(value)


def print_table(results):
    print(f"copy bandwidth: {results['copy_bandwidth_gbs']:.1f} GB/s on {results['device']}")
    header = f"{'sweep':13} {'impl':12} {'B':>4} {'T':>6} {'fwd ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'roof':>6} {'fwd+bwd ms':>11}"
    print(header)
    print("-" * len(header))
    for sweep, rows in results["sweeps"].items():
        for row in rows:
            f, fb = row["forward"], row["forward_backward"]
            print(
                f"{sweep:13} {row['impl']:12} {row['B']:>4} {row['T']:>6} {fmt(f['ms'], '{:9.3f}'):>9} "
                f"{fmt(f.get('tflops'), '{:8.2f}'):>8} {fmt(f.get('gbs'), '{:8.1f}'):>8} "
                f"{fmt(f.get('roofline_fraction'), '{:6.1%}'):>6} {fmt(fb['ms'], '{:11.3f}'):>11}"
                + (f"  ({f['error']})" if f.get("error") else "")
            )
    print(f"\n{'decode T':>9} {'lightning ms':>13} {'sdpa ms':>9}")
    for row in results["decode"]:
        print(f"{row['T']:>9} {fmt(row['lightning_decode']['ms'], '{:13.4f}'):>13} {fmt(row['sdpa_decode']['ms'], '{:9.4f}'):>9}")


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    sweep_names = list(results["sweeps"])
    fig, axes = plt.subplots(1, len(sweep_names) + 1, figsize=(6 * (len(sweep_names) + 1), 4.5))
    for ax, sweep in zip(axes, sweep_names):
        rows = results["sweeps"][sweep]
        for impl in sorted({r["impl"] for r in rows}):
            for phase, style in (("forward", "-o"), ("forward_backward", "--x")):
                points = [(r["T"], r[phase]["ms"]) for r in rows if r["impl"] == impl and r[phase]["ms"]]
                if points:
                    ax.plot(*zip(*points), style, label=f"{impl} {phase.replace('_', '+')}")
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="ms", title=sweep.replace("_", " "))
        ax.legend(fontsize=7)
    decode = results["decode"]
    for key in ("lightning_decode", "sdpa_decode"):
        points = [(r["T"], r[key]["ms"]) for r in decode if r[key]["ms"]]
        if points:
            axes[-1].plot(*zip(*points), "-o", label=key)
    axes[-1].set(xscale="log", yscale="log", xlabel="context T", ylabel="ms / token", title="decode")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# --------------------------------------------------------------------------- main


def run(args):
    smoke = args.cpu_smoke
    if not smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke for the CPU sanity run")
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    lengths, shape = (SMOKE_LENGTHS, SMOKE_SHAPE) if smoke else (GPU_LENGTHS, GPU_SHAPE)
    timer = Timer(device, repeats=args.repeats)
    bandwidth = copy_bandwidth_gbs(timer, device, n_bytes=(64 << 20) if smoke else (2 << 30))
    impls = implementations(device)
    results = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype),
        "copy_bandwidth_gbs": bandwidth,
        "shape": shape,
        "implementations": sorted(impls),
        "sweeps": {},
        "decode": [],
    }
    for sweep, points in sweeps(lengths, shape).items():
        results["sweeps"][sweep] = []
        for batch, length in points:
            for name, fn in impls.items():
                point = measure_point(name, fn, batch, length, shape["heads"], shape["dim"], dtype, device, timer, bandwidth)
                results["sweeps"][sweep].append(point)
                # one line per point as it is measured: a run cut short still leaves its numbers in the log
                ms = [point[part].get("ms") for part in ("forward", "forward_backward")]
                print(f"{sweep} {name} B={batch} T={length}: " + ", ".join(
                    f"{part} {'failed' if t is None else f'{t:.3g} ms'}" for part, t in zip(("fwd", "fwd+bwd"), ms)),
                    flush=True)
    decode_backend = "torch" if smoke else "triton"
    results["decode"] = [
        measure_decode(length, shape["batch"], shape["heads"], shape["dim"], dtype, device, timer, decode_backend)
        for length in lengths
    ]
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes, torch paths only, no files unless --out")
    parser.add_argument("--out", type=Path, default=None, help="folder for JSON and PNG (GPU default: benchmarks/results)")
    parser.add_argument("--repeats", type=int, default=5, help="CPU timing repeats (the GPU uses do_bench)")
    args = parser.parse_args()
    results = run(args)
    print_table(results)
    out_dir = args.out if args.out is not None or args.cpu_smoke else RESULTS_DIR
    if out_dir is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "lightning_attn_cpu_smoke" if args.cpu_smoke else "lightning_attn"
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out_dir / f'{stem}.json'}")
    plot(results, out_dir / f"{stem}.png")


if __name__ == "__main__":
    main()

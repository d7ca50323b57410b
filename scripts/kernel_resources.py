"""Registers, spills and shared memory of the Triton kernels, compiled for a GPU that isn't there.

Triton compiles for any CUDA target on a machine without a GPU (it ships ptxas and
cuobjdump), so register pressure can be checked, and tiles tuned, between GPU sessions:

    python scripts/kernel_resources.py              # sm_90 (H100/H200), bf16, D = E in 64/128/256
    python scripts/kernel_resources.py --arch 80 --dims 128

A ``stack`` above 0 means the kernel spills registers to local memory, which is slow.
"""

import argparse
import inspect
import os
import re
import subprocess

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("unset TRITON_INTERPRET: under the interpreter Triton does not compile kernels")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tnl_kernels import triton_backend as tb  # noqa: E402

INDEX_POINTERS = ("bounds", "chunk_seq", "chunk_lstart", "chunk_len", "chunk_offsets")
# fp32 buffers; the per-chunk forward ``states`` of the sequential state pass are in the input dtype.
STATE_POINTERS = ("initial", "final", "state", "slopes", "kv", "grad_states")


def argument_types(kernel, dtype: str) -> dict:
    """Triton signature types: tensors of the input dtype, fp32 states, int32 indices, scalars."""
    types = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in INDEX_POINTERS:
            types[name] = "*i32"
        elif name in STATE_POINTERS:
            types[name] = "*fp32"
        elif name == "scale":
            types[name] = "fp32"
        elif name.startswith("stride") or name == "H":
            types[name] = "i32"
        else:
            types[name] = f"*{dtype}"
    return types


def resources(kernel, constexprs: dict, dtype: str, arch: int, num_warps: int) -> dict:
    names = list(inspect.signature(kernel.fn).parameters)
    types = argument_types(kernel, dtype)
    signature = {name: "constexpr" if name in constexprs else types[name] for name in names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": 2})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = f"/tmp/tnl_kernel_{os.getpid()}.cubin"
    with open(path, "wb") as f:
        f.write(compiled.asm["cubin"])
    usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    os.remove(path)
    match = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    # Triton allocates its shared memory dynamically: the cubin's static figure is not it.
    return {"registers": int(match.group(1)), "stack": int(match.group(2)), "shared": compiled.metadata.shared}


def kernels_at(dim: int, dtype: str):
    """(name, kernel, constexprs, num_warps) as the backend launches them for D = E = dim."""
    precision = "ieee" if dtype == "fp32" else "tf32"
    tile, narrow = tb._head_tile(dim), tb._narrow_tile(dim)
    shape = dict(D=dim, E=dim, C=tb.CHUNK_SIZE)
    seq_chunk, seq_d, seq_e = tb._sequential_config(dim, dim)
    kernels = [
        ("state_pass", tb._state_pass_kernel, dict(shape, BLOCK_D=narrow, BLOCK_E=narrow, HAS_INITIAL=True,
                                                    BACKWARDS=False, DOT_PRECISION=precision), 8),
        ("chunk_kv", tb._chunk_kv_kernel, dict(shape, BLOCK_D=tile, BLOCK_E=tile, DECAY_FROM_START=False,
                                                DOT_PRECISION=precision), 4),
        ("state_scan", tb._state_scan_kernel, dict(D=dim, E=dim, BLOCK_D=tile, BLOCK_E=tile, HAS_INITIAL=True,
                                                   BACKWARDS=False), 4),
        ("chunk_output", tb._chunk_output_kernel, dict(shape, BLOCK_D=tile, BLOCK_E=tile, DOT_PRECISION=precision), 8),
        ("chunk_grad", tb._chunk_grad_kernel, dict(shape, BLOCK_D=narrow, BLOCK_E=narrow, DOT_PRECISION=precision), 8),
        ("decode", tb._decode_kernel, dict(D=dim, E=dim, BLOCK_D=tile, BLOCK_E=tile), 4),
    ]
    if dim <= tb.MAX_SEQUENTIAL_HEAD_DIM:
        kernels.insert(0, ("sequential_fwd", tb._sequential_forward_kernel,
                           dict(shape, C=seq_chunk, BLOCK_D=seq_d, BLOCK_E=seq_e, HAS_INITIAL=True,
                                DOT_PRECISION=precision), 8))
    return kernels


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for sm_90")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--kernels", nargs="+", default=None, help="only these (sequential_fwd, state_pass, "
                        "chunk_kv, state_scan, chunk_output, chunk_grad, decode)")
    args = parser.parse_args(argv)
    print(f"{'kernel':14s} {'D=E':>5s} {'warps':>5s} {'regs':>5s} {'stack':>6s} {'shared':>7s}")
    for dim in args.dims:
        for name, kernel, constexprs, warps in kernels_at(dim, args.dtype):
            if args.kernels and name not in args.kernels:
                continue
            usage = resources(kernel, constexprs, args.dtype, args.arch, warps)
            print(f"{name:14s} {dim:5d} {warps:5d} {usage['registers']:5d} {usage['stack']:6d} {usage['shared']:7d}")


if __name__ == "__main__":
    main()

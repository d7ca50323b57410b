"""Public entry points of ``tnl_kernels`` (DESIGN.md section 4).

``backend="auto"`` uses the Triton kernels for CUDA tensors and the chunked
PyTorch path otherwise; ``"torch"`` and ``"triton"`` force one (Triton on CPU
tensors needs ``TRITON_INTERPRET=1``).
"""

import torch

from .chunked import ChunkedLightningAttn, default_block_size

BACKENDS = ("auto", "torch", "triton")


def _triton_module():
    """The Triton backend module, or None when Triton (or the backend) is unavailable."""
    try:
        from . import triton_backend
    except ImportError:
        return None
    return triton_backend


def _triton_forward(q, k, v, slopes, scale, initial_state, cu_seqlens):
    if torch.compiler.is_compiling():
        # The eager autograd.Function builds chunk tables on the host and cannot be traced; the
        # same launches wrapped as custom operators keep a compiled layer in one graph.
        from .triton_ops import lightning_attn_compilable

        return lightning_attn_compilable(q, k, v, slopes, scale=scale, initial_state=initial_state,
                                         cu_seqlens=cu_seqlens)
    return _triton_module().lightning_attn_triton(q, k, v, slopes, scale=scale, initial_state=initial_state,
                                                  cu_seqlens=cu_seqlens)


# The decode kernel writes its state in place: under torch.compile it runs as one eager call (a
# graph break), so compiled models get exactly the tested launch.
@torch.compiler.disable
def _triton_decode(q, k, v, slopes, state, scale):
    return _triton_module().lightning_attn_decode_triton(q, k, v, slopes, state, scale=scale)


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_module() is not None else "torch"
    if backend == "triton" and _triton_module() is None:
        raise RuntimeError("backend='triton' requested but the Triton backend is not importable (is triton installed?)")
    return backend


def _resolve_decode_backend(backend: str, q, k, v, state) -> str:
    """The decode kernel writes its state in place and records no graph: when autograd would be
    needed, ``"auto"`` takes the differentiable PyTorch step and a forced ``"triton"`` is refused."""
    resolved = _resolve_backend(backend, q.device)
    needs_graph = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, state))
    if resolved == "triton" and needs_graph:
        if backend == "triton":
            raise ValueError("the Triton decode step is not differentiable: use backend='torch' (or 'auto') when "
                             "gradients must flow through decode, or run it under torch.no_grad()")
        return "torch"
    return resolved


def _check_inputs(q, k, v, slopes, initial_state, cu_seqlens):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, E] matching q's [B, T, H]; got {tuple(v.shape)} vs {tuple(q.shape)}")
    batch, _, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    if slopes.shape != (heads,):
        raise ValueError(f"slopes must have shape [H]=({heads},), got {tuple(slopes.shape)}")
    if cu_seqlens is not None:
        if batch != 1:
            raise ValueError(f"cu_seqlens requires B == 1 (sequences packed along T), got B={batch}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError("cu_seqlens must be a non-empty 1-D int32 tensor of sequence boundaries [N+1]")
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[1] or bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at T={q.shape[1]}")
    n_seqs = batch if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (n_seqs, heads, dim_k, dim_v):
        raise ValueError(
            f"initial_state must be [N, H, D, E]=({n_seqs}, {heads}, {dim_k}, {dim_v}), got {tuple(initial_state.shape)}"
        )


def lightning_attn(
    q, k, v, slopes, *, scale=1.0, initial_state=None, output_final_state=False, cu_seqlens=None, backend="auto", block_size=None
):
    """Causal lightning attention with per-head exponential decay.

    Args:
        q, k: ``[B, T, H, D]``; v: ``[B, T, H, E]``; slopes: ``[H]`` decay rates (0 = no decay).
        scale: multiplies the output (1 for TransNormerLLM / MiniMax).
        initial_state: ``[N, H, D, E]`` fp32 state to continue from (N = B, or sequences in ``cu_seqlens``).
        output_final_state: also return the fp32 state after the last token of each sequence.
        cu_seqlens: int32 ``[N+1]`` boundaries of sequences packed along T (B must be 1); states reset per sequence.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        block_size: block length of the chunked algorithm (default: chosen for the head dim).

    Returns:
        ``(o [B, T, H, E] in q.dtype, final_state [N, H, D, E] fp32 or None)``.
    """
    _check_inputs(q, k, v, slopes, initial_state, cu_seqlens)
    backend = _resolve_backend(backend, q.device)
    if block_size is None:
        block_size = default_block_size(q.shape[-1])
    slopes = slopes.to(device=q.device, dtype=torch.float32)
    if backend == "triton":
        out, final_state = _triton_forward(q, k, v, slopes, scale, initial_state, cu_seqlens)
    else:
        out, final_state = ChunkedLightningAttn.apply(q, k, v, slopes, scale, initial_state, cu_seqlens, block_size)
    return out, (final_state if output_final_state else None)


def lightning_attn_decode(q, k, v, slopes, state, *, scale=1.0, backend="auto"):
    """One token of lightning attention; updates ``state`` in place.

    q, k: ``[B, H, D]``; v: ``[B, H, E]``; state: ``[B, H, D, E]`` fp32. Returns o ``[B, H, E]`` in q.dtype.
    """
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"decode expects q, k [B, H, D] and v [B, H, E]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    expected = (*q.shape, v.shape[-1])
    if tuple(state.shape) != expected:
        raise ValueError(f"state must be [B, H, D, E]={expected}, got {tuple(state.shape)}")
    if state.dtype != torch.float32:
        raise ValueError(f"the recurrent state must be fp32 (long decodes drift otherwise), got {state.dtype}")
    if slopes.shape != (q.shape[1],):
        raise ValueError(f"slopes must have shape [H]=({q.shape[1]},), got {tuple(slopes.shape)}")
    backend = _resolve_decode_backend(backend, q, k, v, state)
    slopes = slopes.to(device=q.device, dtype=torch.float32)
    if backend == "triton":
        return _triton_decode(q, k, v, slopes, state, scale)
    batch, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    if not state.is_contiguous():
        raise ValueError("state must be contiguous (it is updated in place)")
    flat_state = state.view(batch * heads, dim_k, dim_v)
    state.mul_(torch.exp(-slopes).view(1, -1, 1, 1))
    # S += k^T v, accumulated in place: no [B, H, D, E] temporary per token.
    flat_state.baddbmm_(k.float().reshape(batch * heads, dim_k, 1), v.float().reshape(batch * heads, 1, dim_v))
    out = torch.bmm(q.float().reshape(batch * heads, 1, dim_k), flat_state).view(batch, heads, dim_v)
    return (out * scale).to(q.dtype)

"""The Triton lightning-attention kernels as PyTorch custom operators, for torch.compile.

Eager calls go through ``triton_backend.LightningAttnTriton`` (an autograd.Function). Under
torch.compile that Function cannot be traced (its launches build chunk tables on the host), so
``tnl_kernels.lightning_attn`` calls :func:`lightning_attn_compilable` instead: the forward and
the backward are each one opaque operator with a shape-only "fake" implementation, so a
compiled lightning layer stays in one graph. Both operators run the same ``_forward`` /
``_backward`` launches as the eager path, so the results are the same to the bit.
"""

import torch

from . import triton_backend as tb


def _layout(q, cu_seqlens, chunk_size):
    return tb.ChunkLayout(q.shape[0], q.shape[1], cu_seqlens, chunk_size, q.device)


def _n_seqs(q, cu_seqlens):
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


@torch.library.custom_op("tnl_kernels::lightning_fwd", mutates_args=())
def lightning_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, scale: float,
                  initial_state: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
                  chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, final_state)``; inputs already contiguous, slopes and initial_state fp32."""
    return tb._forward(q, k, v, slopes, scale, initial_state, _layout(q, cu_seqlens, chunk_size))


@lightning_fwd.register_fake
def _(q, k, v, slopes, scale, initial_state, cu_seqlens, chunk_size):
    batch, length, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    return (q.new_empty(batch, length, heads, dim_v),
            q.new_empty(_n_seqs(q, cu_seqlens), heads, dim_k, dim_v, dtype=torch.float32))


@torch.library.custom_op("tnl_kernels::lightning_bwd", mutates_args=())
def lightning_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_out: torch.Tensor, slopes: torch.Tensor,
                  scale: float, initial_state: torch.Tensor | None, grad_final: torch.Tensor | None,
                  cu_seqlens: torch.Tensor | None, chunk_size: int,
                  states_strategy: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, d_initial_state)``; d_initial_state is fp32 and always returned."""
    return tb._backward(q, k, v, grad_out, slopes, scale, initial_state, grad_final,
                        _layout(q, cu_seqlens, chunk_size), states_strategy)


@lightning_bwd.register_fake
def _(q, k, v, grad_out, slopes, scale, initial_state, grad_final, cu_seqlens, chunk_size, states_strategy):
    heads, dim_k, dim_v = q.shape[2], q.shape[3], v.shape[-1]
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(_n_seqs(q, cu_seqlens), heads, dim_k, dim_v, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    q, k, v, slopes, scale, initial_state, cu_seqlens, chunk_size = inputs
    ctx.save_for_backward(q, k, v, slopes, initial_state, cu_seqlens)
    ctx.scale, ctx.chunk_size = scale, chunk_size
    ctx.states_strategy = tb.STATES  # as set when the graph was recorded


def _backward(ctx, grad_out, grad_final):
    q, k, v, slopes, initial_state, cu_seqlens = ctx.saved_tensors
    grad_out = torch.zeros_like(v) if grad_out is None else grad_out.to(q.dtype)
    grad_final = None if grad_final is None else grad_final.contiguous()
    dq, dk, dv, d_state0 = lightning_bwd(q, k, v, grad_out, slopes, ctx.scale, initial_state, grad_final, cu_seqlens,
                                         ctx.chunk_size, ctx.states_strategy)
    d_initial = d_state0 if initial_state is not None and ctx.needs_input_grad[5] else None
    return dq, dk, dv, None, None, d_initial, None, None


lightning_fwd.register_autograd(_backward, setup_context=_setup_context)


def lightning_attn_compilable(q, k, v, slopes, *, scale=1.0, initial_state=None, cu_seqlens=None,
                              chunk_size=tb.CHUNK_SIZE):
    """Same contract as ``triton_backend.lightning_attn_triton``, as traceable custom operators."""
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    # (autograd through .float() returns d(initial_state) in the caller's dtype)
    state0 = None if initial_state is None else initial_state.float().contiguous()
    slopes = slopes.to(device=q.device, dtype=torch.float32).contiguous()
    bounds = None if cu_seqlens is None else cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    return lightning_fwd(q.contiguous(), k.contiguous(), v.contiguous(), slopes, float(scale), state0, bounds,
                         chunk_size)

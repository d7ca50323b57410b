"""The chunked PyTorch path of lightning attention: the CPU production backend.

Work is batched over blocks (one batched matmul for every block's intra-block
attention, one for every block's key-value summary), and only the cheap
``[B, H, D, E]`` state recurrence walks the blocks in order. Long inputs are cut
into segments so that the ``[T, C]`` score tensor stays bounded.

The backward is written for the operator instead of being taped by autograd: the
gradients of a linear recurrence are themselves lightning attentions (forward in
time for dq, backward in time for dk and dv), so ``backward`` runs this same
forward three times and keeps nothing but q, k, v and the initial state alive.

Internal layout is ``[B, H, T, D]`` fp32; the public wrapper transposes.
"""

import torch

# Tokens per segment of the blocked forward: bounds the [B, H, T_seg, C] score tensor.
SEGMENT_TOKENS = 8192


def default_block_size(head_dim: int) -> int:
    """Block length balancing the intra cost (T*C*(D+E)) against the inter cost (2*T*D*E)."""
    block = 32
    while block < head_dim and block < 128:
        block *= 2
    return block


class _BlockDecays:
    """Decay factors of one block length for all heads, every factor <= 1."""

    def __init__(self, rates: torch.Tensor, length: int):
        # rates: [1, H, 1, 1] fp32
        pos = torch.arange(length, device=rates.device, dtype=rates.dtype)
        distance = pos[:, None] - pos[None, :]
        self.intra = torch.exp(torch.where(distance >= 0, -rates * distance, float("-inf")))  # [1, H, C, C]
        self.query = torch.exp(-rates * (pos + 1).view(1, 1, -1, 1))  # lambda^{i+1}
        self.key = torch.exp(-rates * (length - 1 - pos).view(1, 1, -1, 1))  # lambda^{c-1-j}
        self.block = torch.exp(-rates * length)  # lambda^{c}


def _forward_blocks(q, k, v, state, decays: _BlockDecays, block: int):
    """All blocks of a segment whose length is a multiple of ``block``."""
    batch, heads, length, dim_k = q.shape
    dim_v = v.shape[-1]
    n_blocks = length // block
    qb = q.reshape(batch, heads, n_blocks, block, dim_k)
    kb = k.reshape(batch, heads, n_blocks, block, dim_k)
    vb = v.reshape(batch, heads, n_blocks, block, dim_v)
    scores = torch.matmul(qb, kb.transpose(-1, -2)) * decays.intra.unsqueeze(2)
    out = torch.matmul(scores, vb)
    del scores
    block_kv = torch.matmul((kb * decays.key.unsqueeze(2)).transpose(-1, -2), vb)  # [B, H, N, D, E]
    states_before = torch.empty(batch, heads, n_blocks, dim_k, dim_v, dtype=q.dtype, device=q.device)
    for n in range(n_blocks):
        states_before[:, :, n] = state
        state = decays.block * state + block_kv[:, :, n]
    out += torch.matmul(qb * decays.query.unsqueeze(2), states_before)
    return out.reshape(batch, heads, length, dim_v), state


def chunked_forward(q, k, v, rates, state, block_size: int):
    """Lightning attention on ``[B, H, T, *]`` fp32 tensors (unscaled).

    ``rates``: ``[H]`` fp32; ``state``: ``[B, H, D, E]`` fp32. Returns ``(o, final_state)``.
    """
    rates = rates.view(1, -1, 1, 1)
    length = q.shape[2]
    full_decays = _BlockDecays(rates, block_size)
    segment = max(block_size, SEGMENT_TOKENS // block_size * block_size)
    pieces = []
    start = 0
    while length - start >= block_size:
        stop = min(length, start + segment)
        stop = start + (stop - start) // block_size * block_size
        out, state = _forward_blocks(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], state, full_decays, block_size)
        pieces.append(out)
        start = stop
    if start < length:  # the tail block, shorter than block_size
        tail = length - start
        out, state = _forward_blocks(q[:, :, start:], k[:, :, start:], v[:, :, start:], state, _BlockDecays(rates, tail), tail)
        pieces.append(out)
    if not pieces:
        return v.new_zeros(v.shape), state
    return (torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]), state


def _suffix_decay(rates, length, like):
    """``lambda^{T-1-j}`` for every position j: how much of token j survives into the final state."""
    pos = torch.arange(length, device=like.device, dtype=like.dtype)
    return torch.exp(-rates.view(1, -1, 1, 1) * (length - 1 - pos).view(1, 1, -1, 1))


def chunked_backward(q, k, v, rates, state0, grad_out, grad_final, scale, block_size, need_state_grad):
    """Gradients of ``o = scale * lightning(q, k, v; S0)`` and of its final state.

    Returns ``(dq, dk, dv, d_state0)`` in fp32, ``[B, H, T, *]`` layout.
    """
    length = q.shape[2]
    flip = lambda x: x.flip(2)  # noqa: E731 - reversal in time
    zeros_ed = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1], q.shape[-1])
    # dq_t = scale * sum_{j<=t} lambda^{t-j} (do_t . v_j) k_j + scale * lambda^{t+1} do_t S0^T
    dq, _ = chunked_forward(grad_out, v, k, rates, state0.transpose(-1, -2).contiguous(), block_size)
    # dk_j = scale * sum_{t>=j} lambda^{t-j} (v_j . do_t) q_t : the same operator backwards in time.
    dk_rev, sum_do_q = chunked_forward(flip(v), flip(grad_out), flip(q), rates, zeros_ed, block_size)
    dv_rev, _ = chunked_forward(flip(k), flip(q), flip(grad_out), rates, zeros_ed.transpose(-1, -2), block_size)
    dq, dk, dv = dq * scale, flip(dk_rev) * scale, flip(dv_rev) * scale
    decay = torch.exp(-rates.view(1, -1, 1, 1))
    d_state0 = None
    if need_state_grad:
        # sum_do_q = sum_t lambda^t do_t^T q_t; dS0 needs lambda^{t+1} q_t^T do_t.
        d_state0 = scale * decay * sum_do_q.transpose(-1, -2)
    if grad_final is not None:
        survive = _suffix_decay(rates, length, q)
        dk = dk + survive * torch.matmul(v, grad_final.transpose(-1, -2))
        dv = dv + survive * torch.matmul(k, grad_final)
        if need_state_grad:
            d_state0 = d_state0 + torch.exp(-rates.view(1, -1, 1, 1) * length) * grad_final
    return dq, dk, dv, d_state0


def _sequence_bounds(cu_seqlens, batch, length):
    """(batch index, start, stop) for each sequence: whole rows, or the varlen pieces of row 0."""
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


class ChunkedLightningAttn(torch.autograd.Function):
    """Autograd wrapper: public ``[B, T, H, *]`` layout in, fp32 compute, analytic backward."""

    @staticmethod
    def forward(ctx, q, k, v, rates, scale, initial_state, cu_seqlens, block_size):
        qf, kf, vf = (x.transpose(1, 2).float() for x in (q, k, v))
        batch, heads, length, dim_k = qf.shape
        dim_v = vf.shape[-1]
        rates = rates.float()
        out = torch.empty(batch, heads, length, dim_v, dtype=torch.float32, device=q.device)
        seqs = _sequence_bounds(cu_seqlens, batch, length)
        finals = []
        for n, (b, start, stop) in enumerate(seqs):
            if initial_state is None:
                state = qf.new_zeros(1, heads, dim_k, dim_v)
            else:
                state = initial_state[n : n + 1].float()
            piece, final = chunked_forward(
                qf[b : b + 1, :, start:stop], kf[b : b + 1, :, start:stop], vf[b : b + 1, :, start:stop], rates, state, block_size
            )
            out[b : b + 1, :, start:stop] = piece * scale
            finals.append(final)
        final_state = torch.cat(finals, dim=0) if finals else qf.new_zeros(0, heads, dim_k, dim_v)
        ctx.save_for_backward(q, k, v, rates, initial_state, cu_seqlens)
        ctx.scale, ctx.block_size = scale, block_size
        ctx.mark_non_differentiable(rates)
        return out.transpose(1, 2).to(q.dtype), final_state

    @staticmethod
    def backward(ctx, grad_out, grad_final):
        q, k, v, rates, initial_state, cu_seqlens = ctx.saved_tensors
        qf, kf, vf = (x.transpose(1, 2).float() for x in (q, k, v))
        batch, heads, length, dim_k = qf.shape
        dim_v = vf.shape[-1]
        go = grad_out.transpose(1, 2).float() if grad_out is not None else torch.zeros_like(vf)
        need_state_grad = initial_state is not None and ctx.needs_input_grad[5]
        dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        d_states = []
        for n, (b, start, stop) in enumerate(_sequence_bounds(cu_seqlens, batch, length)):
            rows = (slice(b, b + 1), slice(None), slice(start, stop))
            if initial_state is None:
                state0 = qf.new_zeros(1, heads, dim_k, dim_v)
            else:
                state0 = initial_state[n : n + 1].float()
            gf = grad_final[n : n + 1].float() if grad_final is not None else None
            dq_n, dk_n, dv_n, ds_n = chunked_backward(
                qf[rows], kf[rows], vf[rows], rates, state0, go[rows], gf, ctx.scale, ctx.block_size, need_state_grad
            )
            dq[rows], dk[rows], dv[rows] = dq_n, dk_n, dv_n
            d_states.append(ds_n)
        d_initial = torch.cat(d_states, dim=0).to(initial_state.dtype) if need_state_grad else None
        back = lambda g, like: g.transpose(1, 2).to(like.dtype)  # noqa: E731
        return back(dq, q), back(dk, k), back(dv, v), None, None, d_initial, None, None

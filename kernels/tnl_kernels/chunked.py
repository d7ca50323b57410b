"""The chunked PyTorch path of lightning attention: the CPU production backend.

Work is batched over blocks (one batched matmul for every block's intra-block
attention, one for every block's key-value summary), and only the cheap
``[B, H, D, E]`` state recurrence walks the blocks in order. Long inputs are cut
into segments so that the ``[T, C]`` score tensor stays bounded.

The backward is written for the operator instead of being taped by autograd: the
gradients of a linear recurrence are themselves lightning attentions (forward in
time for dq, backward in time for dk and dv). ``chunked_backward`` computes all
three in one backwards walk over the blocks, sharing the intra-block score
matrices between them, and keeps nothing but q, k, v and the initial state alive
between forward and backward.

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
        self.causal = distance >= 0  # [C, C] (the decay alone can underflow to 0 inside the causal part)
        self.intra = torch.exp(torch.where(self.causal, -rates * distance, float("-inf")))  # [1, H, C, C]
        self.query = torch.exp(-rates * (pos + 1).view(1, 1, -1, 1))  # lambda^{i+1}
        self.key = torch.exp(-rates * (length - 1 - pos).view(1, 1, -1, 1))  # lambda^{c-1-j}
        self.block = torch.exp(-rates * length)  # lambda^{c}


def _write_into(destination, op, *args):
    """``op(*args, out=destination)``: no temporary in eager mode. torch.compile refuses ``out=`` into
    a strided view, so a compiled graph computes the result and copies it (and fuses the two)."""
    if torch.compiler.is_compiling():
        destination.copy_(op(*args))
    else:
        op(*args, out=destination)


def _scan(block_sums, state, block_decay, reverse: bool = False):
    """States entering each block of ``state <- block_decay * state + block_sums[n]`` (in reverse
    order when ``reverse``), written straight into one buffer; returns ``(entering, final)``."""
    n_blocks = block_sums.shape[2]
    entering = torch.empty_like(block_sums)
    order = range(n_blocks - 1, -1, -1) if reverse else range(n_blocks)
    previous = None
    for n in order:
        if previous is None:
            entering[:, :, n] = state
        else:
            _write_into(entering[:, :, n], torch.addcmul, block_sums[:, :, previous], entering[:, :, previous],
                        block_decay)
        previous = n
    final = torch.addcmul(block_sums[:, :, previous], entering[:, :, previous], block_decay)
    return entering, final


def _causal_products(scores, values, causal):
    """``(scores * causal) @ values`` in which a product the mask removes is exactly zero even when
    its value is NaN or inf (a matmul forms ``0 * NaN = NaN`` for every row). A broadcast product
    of ``[.., C, C, E]``: only for the rare blocks with non-finite keys or values."""
    return torch.where(causal[..., None], scores[..., None] * values[..., None, :, :], 0).sum(-2)


def _nonfinite_blocks(block_kv) -> list[int]:
    """The blocks whose keys or values hold a NaN or inf: exactly those whose key-value summary
    ``[B, H, N, D, E]`` does (a non-finite factor reaches every sum it is in)."""
    return (~torch.isfinite(block_kv)).flatten(3).any(-1).any(1).any(0).nonzero().flatten().tolist()


def _check_nonfinite(state) -> bool:
    """Whether a segment needs the NaN isolation below: its final state is non-finite (a NaN or inf
    in its keys or values reaches it; one in q does not, and reaches only its own output row).
    One reduction over the small state: the finite path pays nothing else. Under torch.compile the
    check would break the graph, so compiled code skips it (and a NaN then reaches its block)."""
    return not torch.compiler.is_compiling() and not bool(torch.isfinite(state).all())


def _forward_blocks(q, k, v, state, decays: _BlockDecays, block: int):
    """All blocks of a segment whose length is a multiple of ``block``.

    NaN isolation: a NaN (or inf) in k or v at position p makes the outputs at p and after it
    non-finite, and no output before it (in the matmuls, masked scores times a NaN value would be
    NaN at every row of p's block). Blocks with such inputs are recomputed with the mask applied
    by ``where`` (:func:`_causal_products`), found through the final state, so clean inputs take
    exactly the fast path."""
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
    states_before, state = _scan(block_kv, state, decays.block)
    out += torch.matmul(qb * decays.query.unsqueeze(2), states_before)
    if _check_nonfinite(state):
        for n in _nonfinite_blocks(block_kv):
            scores = torch.matmul(qb[:, :, n], kb[:, :, n].transpose(-1, -2)) * decays.intra
            out[:, :, n] = _causal_products(scores, vb[:, :, n], decays.causal) + torch.matmul(
                qb[:, :, n] * decays.query, states_before[:, :, n])
    return out.reshape(batch, heads, length, dim_v), state


def _pieces(length: int, block: int) -> list[tuple[int, int, int]]:
    """``(start, stop, block_length)`` in time order: segments of whole blocks, then the short tail."""
    segment = max(block, SEGMENT_TOKENS // block * block)
    pieces, start = [], 0
    while length - start >= block:
        stop = start + (min(length, start + segment) - start) // block * block
        pieces.append((start, stop, block))
        start = stop
    if start < length:
        pieces.append((start, length, length - start))
    return pieces


def chunked_forward(q, k, v, rates, state, block_size: int):
    """Lightning attention on ``[B, H, T, *]`` fp32 tensors (unscaled).

    ``rates``: ``[H]`` fp32; ``state``: ``[B, H, D, E]`` fp32. Returns ``(o, final_state)``.
    """
    rates = rates.view(1, -1, 1, 1)
    decays = {}
    outs = []
    for start, stop, block in _pieces(q.shape[2], block_size):
        if block not in decays:
            decays[block] = _BlockDecays(rates, block)
        out, state = _forward_blocks(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop], state,
                                     decays[block], block)
        outs.append(out)
    if not outs:
        # A copy: the caller may update the returned state in place (decode) and must not write
        # through it into the initial state it passed.
        return v.new_zeros(v.shape), state.clone()
    return (torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]), state


def _state_after(k, v, state, decays: _BlockDecays, block: int):
    """The state after a piece of whole blocks, without computing any output."""
    batch, heads, length, dim_k = k.shape
    n_blocks = length // block
    kb = k.reshape(batch, heads, n_blocks, block, dim_k)
    vb = v.reshape(batch, heads, n_blocks, block, v.shape[-1])
    block_kv = torch.matmul((kb * decays.key.unsqueeze(2)).transpose(-1, -2), vb)
    for n in range(n_blocks):
        state = torch.addcmul(block_kv[:, :, n], state, decays.block)
    return state


def _backward_blocks(q, k, v, do, state_in, grad_state, decays: _BlockDecays, block: int):
    """Gradients for one piece of whole blocks, walking it backwards in time.

    ``state_in``: the forward state before the piece; ``grad_state``: the gradient reaching the
    state at the piece's end from everything after it. Returns ``(dq, dk, dv, grad_state_in)``.
    With ``M[i, j] = lambda^(i-j)`` (i >= j, else 0) inside a block, the intra-block parts share two
    score matrices: ``A = (dO V^T) * M`` gives dq = A K and dk = A^T Q; ``P = (Q K^T) * M`` gives
    dv = P^T dO. The inter-block parts read the forward states ``S_n`` (before block n) and the
    reverse states ``R_n`` (gradient at the end of block n): dq += (dO * lambda^(i+1)) S_n^T,
    dk += (V R_n^T) * lambda^(c-1-j), dv += (K * lambda^(c-1-j)) R_n.
    """
    batch, heads, length, dim_k = q.shape
    dim_v = v.shape[-1]
    n_blocks = length // block
    qb = q.reshape(batch, heads, n_blocks, block, dim_k)
    kb = k.reshape(batch, heads, n_blocks, block, dim_k)
    vb = v.reshape(batch, heads, n_blocks, block, dim_v)
    dob = do.reshape(batch, heads, n_blocks, block, dim_v)
    query_decay, key_decay, intra = decays.query.unsqueeze(2), decays.key.unsqueeze(2), decays.intra.unsqueeze(2)

    key_scaled = kb * key_decay
    block_kv = torch.matmul(key_scaled.transpose(-1, -2), vb)  # [B, H, N, D, E]
    states_before, state_out = _scan(block_kv, state_in, decays.block)
    nonfinite = _nonfinite_blocks(block_kv) if _check_nonfinite(state_out) else []
    del block_kv
    do_scaled = dob * query_decay
    block_qdo = torch.matmul((qb * query_decay).transpose(-1, -2), dob)  # [B, H, N, D, E]
    grads_after, grad_state = _scan(block_qdo, grad_state, decays.block, reverse=True)
    del block_qdo

    scores = torch.matmul(dob, vb.transpose(-1, -2)).mul_(intra)  # A
    dq = torch.matmul(scores, kb).add_(torch.matmul(do_scaled, states_before.transpose(-1, -2)))
    for n in nonfinite:  # NaN isolation (see _forward_blocks): A K would carry a NaN in K or V to every row
        grads = torch.matmul(dob[:, :, n], vb[:, :, n].transpose(-1, -2)) * decays.intra
        dq[:, :, n] = _causal_products(grads, kb[:, :, n], decays.causal) + torch.matmul(
            do_scaled[:, :, n], states_before[:, :, n].transpose(-1, -2))
    dk = torch.matmul(scores.transpose(-1, -2), qb).add_(
        torch.matmul(vb, grads_after.transpose(-1, -2)).mul_(key_decay))
    scores = torch.matmul(qb, kb.transpose(-1, -2)).mul_(intra)  # P
    dv = torch.matmul(scores.transpose(-1, -2), dob).add_(torch.matmul(key_scaled, grads_after))
    shape = lambda x: x.reshape(batch, heads, length, x.shape[-1])  # noqa: E731
    return shape(dq), shape(dk), shape(dv), grad_state


def chunked_backward(q, k, v, rates, state0, grad_out, grad_final, scale, block_size, need_state_grad, out=None):
    """Gradients of ``o = scale * lightning(q, k, v; S0)`` and of its final state.

    One pass forward over the pieces finds the state entering each (a cheap scan), then one pass
    backwards computes every gradient of a piece from its q, k, v, dO and the two states, so
    nothing of size T is stored beyond the gradients themselves. Returns ``(dq, dk, dv, d_state0)``
    in fp32, ``[B, H, T, *]`` layout (written into ``out = (dq, dk, dv)`` when given, which may be
    strided views); ``d_state0`` is None unless ``need_state_grad``. Inputs should be contiguous:
    every block view of them is then free.
    """
    rates = rates.view(1, -1, 1, 1)
    pieces = _pieces(q.shape[2], block_size)
    decays = {block: _BlockDecays(rates, block) for _, _, block in pieces}
    states_in, state = [], state0
    for start, stop, block in pieces[:-1]:
        states_in.append(state)
        state = _state_after(k[:, :, start:stop], v[:, :, start:stop], state, decays[block], block)
    states_in.append(state)
    do = grad_out * scale  # o is scaled, the final state is not
    grad_state = grad_final if grad_final is not None else state0.new_zeros(state0.shape)
    dq, dk, dv = out if out is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
    for (start, stop, block), state_in in zip(reversed(pieces), reversed(states_in)):
        window = (slice(None), slice(None), slice(start, stop))
        dq[window], dk[window], dv[window], grad_state = _backward_blocks(
            q[window], k[window], v[window], do[window], state_in, grad_state, decays[block], block)
    return dq, dk, dv, (grad_state if need_state_grad else None)


def _sequences(cu_seqlens, batch):
    """``(rows, start, stop, states)``: the whole batch at once, or each packed document of row 0."""
    if cu_seqlens is None:
        return [(slice(0, batch), 0, None, slice(0, batch))]
    bounds = cu_seqlens.tolist()
    return [(slice(0, 1), bounds[i], bounds[i + 1], slice(i, i + 1)) for i in range(len(bounds) - 1)]


def _heads_first(x, rows, start, stop):
    """``x[rows, start:stop]`` of a ``[B, T, H, *]`` tensor as a contiguous fp32 ``[b, H, t, *]`` copy:
    one copy here makes every block view and batched matmul below copy-free."""
    source = x[rows, start:stop].transpose(1, 2)
    # (`.to(float32, memory_format=...)` returns a strided fp32 input unchanged, hence the explicit copy)
    return torch.empty(source.shape, dtype=torch.float32, device=x.device).copy_(source)


def _stacked(states: list, empty_shape: tuple, device) -> torch.Tensor:
    """Per-sequence fp32 states as one ``[N, ...]`` tensor (``cu_seqlens=[0]`` packs no sequence)."""
    if not states:
        return torch.zeros(empty_shape, dtype=torch.float32, device=device)
    return torch.cat(states, dim=0) if len(states) > 1 else states[0]


def _starting_state(initial_state, states, rows: slice, q: torch.Tensor, dim_v: int) -> torch.Tensor:
    """fp32 ``[rows, H, D, E]``: the given initial states of these sequences, or zeros."""
    if initial_state is not None:
        return initial_state[states].float()
    return q.new_zeros(rows.stop - rows.start, q.shape[2], q.shape[3], dim_v, dtype=torch.float32)


class ChunkedLightningAttn(torch.autograd.Function):
    """Autograd wrapper: public ``[B, T, H, *]`` layout in and out, fp32 compute, analytic backward."""

    @staticmethod
    def forward(ctx, q, k, v, rates, scale, initial_state, cu_seqlens, block_size):
        batch, length, heads, dim_k = q.shape
        dim_v = v.shape[-1]
        rates = rates.float()
        out = torch.empty(batch, length, heads, dim_v, dtype=torch.float32, device=q.device)
        finals = []
        for rows, start, stop, states in _sequences(cu_seqlens, batch):
            state = _starting_state(initial_state, states, rows, q, dim_v)
            piece, final = chunked_forward(_heads_first(q, rows, start, stop), _heads_first(k, rows, start, stop),
                                           _heads_first(v, rows, start, stop), rates, state, block_size)
            _write_into(out[rows, start:stop].transpose(1, 2), torch.mul, piece, scale)
            finals.append(final)
        final_state = _stacked(finals, (0, heads, dim_k, dim_v), q.device)
        ctx.save_for_backward(q, k, v, rates, initial_state, cu_seqlens)
        ctx.scale, ctx.block_size = scale, block_size
        ctx.mark_non_differentiable(rates)
        return out.to(q.dtype), final_state

    @staticmethod
    @torch.autograd.function.once_differentiable  # the analytic backward is not itself differentiable
    def backward(ctx, grad_out, grad_final):
        q, k, v, rates, initial_state, cu_seqlens = ctx.saved_tensors
        batch, length, heads, dim_k = q.shape
        dim_v = v.shape[-1]
        if grad_out is None:
            grad_out = v.new_zeros(v.shape)
        need_state_grad = initial_state is not None and ctx.needs_input_grad[5]
        grads = [torch.empty(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v)]
        d_states = []
        for rows, start, stop, states in _sequences(cu_seqlens, batch):
            state0 = _starting_state(initial_state, states, rows, q, dim_v)
            gf = grad_final[states].float() if grad_final is not None else None
            views = tuple(g[rows, start:stop].transpose(1, 2) for g in grads)
            _, _, _, ds = chunked_backward(
                _heads_first(q, rows, start, stop), _heads_first(k, rows, start, stop),
                _heads_first(v, rows, start, stop), rates, state0, _heads_first(grad_out, rows, start, stop), gf,
                ctx.scale, ctx.block_size, need_state_grad, out=views)
            d_states.append(ds)
        d_initial = None
        if need_state_grad:
            d_initial = _stacked(d_states, (0, heads, dim_k, dim_v), q.device).to(initial_state.dtype)
        dq, dk, dv = (g.to(x.dtype) for g, x in zip(grads, (q, k, v)))
        return dq, dk, dv, None, None, d_initial, None, None

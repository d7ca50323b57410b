"""Sequence-parallel lightning attention, LASP-2 style (DESIGN.md section 9).

A batch of B sequences is cut into P contiguous shards, one per rank of a process group
(rank order = sequence order). Each rank holds ``q, k: [B, T_r, H, D]`` and ``v: [B, T_r, H, E]``
of its shard; shard lengths may differ. Rank r

1. computes from its shard alone its *contribution* ``M_r``: the state after its shard when
   started from zero (rank 0 also folds in the decayed initial state), one weighted ``kᵀv``
   product (:func:`local_state_contribution`);
2. all-gathers the ``M_r`` (``P·B·H·D·E`` fp32 values, independent of the sequence length);
3. forms the state entering its shard (:func:`incoming_state`) and runs the ordinary operator
   :func:`tnl_kernels.lightning_attn` on its shard from that state (:func:`shard_attention`);
   the state after the whole sequence is the same combination over all P contributions
   (:func:`final_state_from_contributions`).

The backward is exact: autograd runs through the operator's gradient with respect to its
initial state, through a differentiable all-gather (:class:`_GatherShards`, whose backward is
one reduce-scatter), and through ``M_r`` into k, v and the initial state. The derivation is in
``docs/sequence_parallel.md``.

The pure functions compose in a single process (that is how the tests simulate P ranks);
:func:`lightning_attn_sequence_parallel` is the distributed entry point.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .api import BACKENDS, lightning_attn

__all__ = [
    "lightning_attn_sequence_parallel",
    "gather_shards",
    "local_state_contribution",
    "incoming_state",
    "final_state_from_contributions",
    "shard_attention",
    "state_gather_bytes",
    "metadata_gather_bytes",
]

# Per-rank metadata exchanged before the states: [ok, T_r, B, H, D, E, grad_enabled, needs_grad].
_META_FIELDS = 8


# ----------------------------------------------------------------------------------------------
# Pure functions (no communication): a single process can compose them over P simulated shards.
# ----------------------------------------------------------------------------------------------


def _decay(slopes: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``λ^n = exp(-slope·n)``, ``[len(n), H]`` fp32: an exponent ``<= 0``, so it never overflows
    (it underflows to 0 for long spans, which is the right limit)."""
    return torch.exp(-n.to(torch.float32)[:, None] * slopes.to(torch.float32)[None, :])


def local_state_contribution(k, v, slopes, initial_state=None) -> torch.Tensor:
    """``M = Σ_j λ^{T-1-j} k_jᵀ v_j (+ λ^T S0)``: the state after this shard started from zero
    (from ``initial_state`` S0 when given: rank 0 only). fp32 ``[B, H, D, E]``.

    One weighted ``kᵀv`` matmul in fp32 (no output is computed): the state recurrence is linear,
    so its value after the shard is the sum of every token's ``k_jᵀ v_j`` decayed by the number of
    steps that follow it inside the shard.
    """
    batch, length, heads, dim_k = k.shape
    with torch.autocast(device_type=k.device.type, enabled=False):
        rates = slopes.to(device=k.device, dtype=torch.float32)
        steps_after = torch.arange(length - 1, -1, -1, device=k.device, dtype=torch.float32)  # T-1-j
        weights = _decay(rates, steps_after)  # [T, H]
        keys = (k.float() * weights[None, :, :, None]).permute(0, 2, 3, 1)  # [B, H, D, T]
        state = torch.matmul(keys, v.float().transpose(1, 2))  # [B, H, D, E]
        if initial_state is not None:
            shard_decay = torch.exp(-rates * length).view(1, heads, 1, 1)
            state = state + shard_decay * initial_state.float()
    return state


def _stack(contributions) -> torch.Tensor:
    if isinstance(contributions, torch.Tensor):
        return contributions
    return torch.stack(list(contributions))


def incoming_state(contributions, lengths: Sequence[int], slopes, rank: int) -> torch.Tensor:
    """The state entering shard ``rank`` (without rank 0's initial state, which rank 0 passes
    to the operator itself; it reaches later shards inside ``M_0``)::

        S_in(r) = Σ_{r' < r} λ^{T_{r'+1} + … + T_{r-1}} M_{r'}

    ``contributions``: ``[P, B, H, D, E]`` (or a list of P ``[B, H, D, E]``) fp32;
    ``lengths``: the P shard lengths; ``rank`` in ``[0, P]`` (``rank = P`` gives the state after
    the whole sequence, see :func:`final_state_from_contributions`). Zeros for ``rank = 0``.
    """
    stacked = _stack(contributions)
    lengths = [int(n) for n in lengths]
    world = stacked.shape[0]
    if len(lengths) != world:
        raise ValueError(f"got {len(lengths)} shard lengths for {world} contributions")
    if not 0 <= rank <= world:
        raise ValueError(f"rank must be in [0, {world}], got {rank}")
    if rank == 0:
        return torch.zeros_like(stacked[0], dtype=torch.float32)
    # tokens between the end of shard r' and the start of shard `rank`: T_{r'+1} + … + T_{rank-1}
    between = [sum(lengths[r + 1 : rank]) for r in range(rank)]
    with torch.autocast(device_type=stacked.device.type, enabled=False):
        decay = _decay(slopes.to(stacked.device), torch.tensor(between, device=stacked.device, dtype=torch.float32))
        return torch.einsum("rh,rbhde->bhde", decay, stacked[:rank].float())


def final_state_from_contributions(contributions, lengths: Sequence[int], slopes) -> torch.Tensor:
    """The state after the last token of the whole sequence: ``S_in(P)``, fp32 ``[B, H, D, E]``."""
    return incoming_state(contributions, lengths, slopes, _stack(contributions).shape[0])


def shard_attention(q, k, v, slopes, contributions, lengths, rank, *, scale=1.0, initial_state=None,
                    output_final_state=False, backend="auto", block_size=None):
    """One shard's part of the sequence-parallel operator, given every shard's contribution.

    Rank 0 runs from ``initial_state`` (the state before the whole sequence, ``None`` = zeros);
    rank ``r > 0`` from :func:`incoming_state` (``initial_state`` must then be None). Returns
    ``(o [B, T_r, H, E] in q.dtype, final_state [B, H, D, E] fp32 or None)``.
    """
    if rank == 0:
        state_in = initial_state
    else:
        if initial_state is not None:
            raise ValueError("initial_state is the state before the whole sequence: only rank 0 takes it")
        state_in = incoming_state(contributions, lengths, slopes, rank)
    out, _ = lightning_attn(q, k, v, slopes, scale=scale, initial_state=state_in, backend=backend,
                            block_size=block_size)
    final = final_state_from_contributions(contributions, lengths, slopes) if output_final_state else None
    return out, final


def state_gather_bytes(batch: int, heads: int, dim_k: int, dim_v: int, world: int) -> int:
    """Bytes of the state all-gather of one call (forward), as counted for the traffic benchmark:
    the gathered fp32 buffer, ``P·B·H·D·E·4``. It does not depend on the sequence length. (A ring
    all-gather puts ``(P-1)/P`` of it on each rank's link; the backward reduce-scatters a buffer of
    the same size, the same traffic again. The small metadata gather is :func:`metadata_gather_bytes`.)"""
    return world * batch * heads * dim_k * dim_v * 4


def metadata_gather_bytes(world: int) -> int:
    """Bytes of the per-call metadata gather (shard lengths, shapes, flags: 8 int64 per rank)."""
    return world * _META_FIELDS * 8


# ----------------------------------------------------------------------------------------------
# Communication
# ----------------------------------------------------------------------------------------------


class _GatherShards(torch.autograd.Function):
    """Differentiable all-gather of one tensor per rank into ``[P, *shape]`` (the lightning states here,
    the softmax layers' keys and values in ``tnl_model.sequence_parallel``).

    Backward: every rank holds the gradient of its own loss with respect to all P gathered
    pieces; the gradient of the summed loss with respect to this rank's piece is the sum
    over ranks of slice ``rank``: one reduce-scatter (SUM), which sends what the forward's
    all-gather sent, half an all-reduce's volume (NCCL runs it as a ring; gloo emulates it with
    an all-reduce, so on CPU the traffic is an all-reduce's). Not
    ``torch.distributed.nn.functional.all_gather``: on every backend but NCCL/XCCL its backward
    emulates the reduce-scatter with P scatter collectives (P rounds instead of one), and it returns
    a tuple of P tensors to re-stack.
    """

    @staticmethod
    def forward(ctx, local, group, world, rank):
        ctx.group, ctx.rank = group, rank
        return _all_gather(local, group, world)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        mine = torch.empty(grad.shape[1:], dtype=grad.dtype, device=grad.device)
        # [1, *shape] out of [P, *shape]: the layout gloo checks (dim 0 times P), and NCCL accepts
        dist.reduce_scatter_tensor(mine.unsqueeze(0), grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return mine, None, None, None


def gather_shards(x: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``x`` (same shape on each), stacked in rank order as ``[P, *x.shape]``; differentiable
    (:class:`_GatherShards`): each rank's ``x`` gets the gradient of every rank's loss."""
    return _GatherShards.apply(x, group, dist.get_world_size(group), dist.get_rank(group))


class _JoinGather(torch.autograd.Function):
    """Identity on ``out`` whose backward also hands a zero gradient to ``gathered``.

    Rank 0's outputs do not read the gathered states, but rank 0 must still join the reduce-scatter
    of the gather's backward (it receives there the gradient of every later rank's loss with
    respect to ``M_0``, and the other ranks would wait for it forever otherwise): this node puts
    the gather into rank 0's graph without changing any value or gradient. (A ``0 * x`` term
    would turn a NaN or inf of a later shard into NaN on rank 0; this does not.)
    """

    @staticmethod
    def forward(ctx, out, gathered):
        ctx.gathered_meta = (gathered.shape, gathered.dtype, gathered.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        shape, dtype, device = ctx.gathered_meta
        return grad_out, torch.zeros(shape, dtype=dtype, device=device)


def _all_gather(local: torch.Tensor, group, world: int) -> torch.Tensor:
    # gathered into a flat buffer, the layout every backend accepts (gloo refuses a stacked output)
    out = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
    dist.all_gather_into_tensor(out, local.contiguous().view(-1), group=group)
    return out.view(world, *local.shape)


def _metadata_device(group):
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _local_error(q, k, v, slopes, initial_state, rank: int, backend, block_size) -> Optional[str]:
    """What is wrong with this rank's inputs, checked locally (no communication), or None."""
    if not all(isinstance(x, torch.Tensor) for x in (q, k, v, slopes)):
        return "q, k, v and slopes must be tensors"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return (f"q, k must be [B, T_r, H, D] and v [B, T_r, H, E] (this rank's shard); got shapes "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape != k.shape:
        return f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}"
    if v.shape[:3] != q.shape[:3]:
        return f"v must be [B, T_r, H, E] matching q's [B, T_r, H]; got {tuple(v.shape)} vs {tuple(q.shape)}"
    batch, length, heads, dim_k = q.shape
    if length < 1:
        return f"every rank's shard must hold at least one token (T_r >= 1), got T_r = {length} on rank {rank}"
    if slopes.shape != (heads,):
        return f"slopes must have shape [H]=({heads},), got {tuple(slopes.shape)}"
    if initial_state is not None:
        if rank != 0:
            return (f"initial_state is the state before the whole sequence and is read on rank 0 only; pass "
                    f"initial_state=None on rank {rank} (its gradient flows to rank 0's tensor)")
        expected = (batch, heads, dim_k, v.shape[-1])
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != expected:
            got = tuple(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state)
            return f"initial_state must be [B, H, D, E]={expected}, got {got}"
        if not initial_state.is_floating_point():
            return f"initial_state must be a floating-point (fp32) tensor, got {initial_state.dtype}"
    if backend not in BACKENDS:
        return f"backend must be one of {BACKENDS}, got {backend!r}"
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        return f"block_size must be a positive int or None, got {block_size!r}"
    return None


def _needs_grad(k, v, initial_state) -> bool:
    tensors = [k, v] + ([initial_state] if initial_state is not None else [])
    return torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tensors)


def _exchange_metadata(q, k, v, initial_state, error, group, world):
    """All-gather ``[ok, T_r, B, H, D, E, grad_enabled, needs_grad]`` of every rank (int64)."""
    shape = (0, 0, 0, 0, 0)
    if error is None:
        batch, length, heads, dim_k = q.shape
        shape = (length, batch, heads, dim_k, v.shape[-1])
    local = torch.tensor([error is None, *shape, torch.is_grad_enabled(),
                          error is None and _needs_grad(k, v, initial_state)],
                         dtype=torch.int64, device=_metadata_device(group))
    return _all_gather(local, group, world).tolist()


def _agree_on_inputs(q, k, v, initial_state, error, group, world: int, rank: int):
    """Every rank's shard length and whether any rank needs gradients, from one metadata all-gather; a bad
    input on any rank raises on every rank (none is left waiting in a collective)."""
    meta = _exchange_metadata(q, k, v, initial_state, error, group, world)
    if error is not None:
        raise ValueError(f"rank {rank} of the sequence-parallel group: {error}")
    rejected = [r for r, row in enumerate(meta) if not row[0]]
    if rejected:
        raise ValueError(f"rank(s) {rejected} of the sequence-parallel group rejected their inputs (see the error "
                         f"raised there); no state was exchanged")
    dims = {tuple(row[2:6]) for row in meta}
    if len(dims) != 1:
        per_rank = {r: tuple(row[2:6]) for r, row in enumerate(meta)}
        raise ValueError(f"B, H, D, E must be the same on every rank of the sequence-parallel group; got "
                         f"(B, H, D, E) per rank {per_rank}")
    lengths = [row[1] for row in meta]
    differentiable = any(row[7] for row in meta)
    if differentiable and not all(row[6] for row in meta):
        off = [r for r, row in enumerate(meta) if not row[6]]
        raise RuntimeError(f"rank(s) {off} run with gradients disabled while others need gradients: every rank must "
                           f"run the backward (it holds a collective), so enable grad on all ranks or none")
    return lengths, differentiable


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def lightning_attn_sequence_parallel(q, k, v, slopes, *, group=None, scale=1.0, initial_state=None,
                                     output_final_state=False, backend="auto", block_size=None, cu_seqlens=None,
                                     shard_lengths: Optional[Sequence[int]] = None):
    """Lightning attention over a sequence sharded across the ranks of ``group`` (LASP-2 style).

    Args:
        q, k: ``[B, T_r, H, D]``; v: ``[B, T_r, H, E]``: this rank's contiguous shard of each of the
            B sequences (group rank order = sequence order; ``T_r >= 1`` may differ between ranks;
            B, H, D, E must agree on every rank).
        slopes: ``[H]`` decay rates (0 = no decay), the same on every rank.
        group: the sequence-parallel ``ProcessGroup`` (None = the default group, which must be
            initialized).
        scale: multiplies the output.
        initial_state: ``[B, H, D, E]`` fp32 state before the whole sequence, or None (zeros).
            Read on rank 0 only: every other rank must pass None (a tensor there raises, since it
            would be ignored). Its gradient, from every rank's loss, lands on rank 0's tensor.
        output_final_state: also return the fp32 state after the last token of the whole sequence,
            identical on every rank. Gradients reaching it on different ranks add up (as for any
            differentiable collective, the objective is the sum of the ranks' losses): put a loss
            on it on one rank only, unless that sum is what you mean.
        backend, block_size: passed to :func:`tnl_kernels.lightning_attn` for the shard.
        cu_seqlens: not supported (refused): packed documents cannot span shards.
        shard_lengths: every rank's ``T_r`` in rank order, when the caller already knows them (the model
            checks them once per forward): the metadata exchange below is then skipped, and the ranks'
            inputs (shapes, whether gradients are needed) must agree, as the caller guarantees.

    Returns:
        ``(o [B, T_r, H, E] in q.dtype, final_state [B, H, D, E] fp32 or None)``: ``o`` equals this
        shard's rows of ``lightning_attn`` run on the whole unsharded sequence.

    Communication per call: without ``shard_lengths``, one all-gather of ``P`` int64 metadata rows (shard
    lengths, shapes, flags; lets every rank raise the same error instead of hanging when any rank's input
    is bad), and one all-gather of the ``[B, H, D, E]`` fp32 states (:func:`state_gather_bytes`); the
    backward, when any rank needs gradients, one reduce-scatter of ``[P, B, H, D, E]`` fp32. Every rank
    of the group must call this (and, when training, run its backward) the same number of times
    in the same order. With a group of size 1 this is exactly :func:`tnl_kernels.lightning_attn`.
    """
    if cu_seqlens is not None:
        raise ValueError(
            "cu_seqlens (documents packed along T) is not supported by the sequence-parallel operator: a "
            "document's state cannot be reset inside another rank's shard. Pad the documents into a batch "
            "[B, T, H, D] (one sequence per row) and shard that, or run the packed batch without sequence "
            "parallelism with tnl_kernels.lightning_attn(..., cu_seqlens=...)"
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "lightning_attn_sequence_parallel needs torch.distributed to be initialized (init_process_group) "
            "or an explicit group; for a single unsharded process call tnl_kernels.lightning_attn"
        )
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the sequence-parallel group it was given")
    error = _local_error(q, k, v, slopes, initial_state, rank, backend, block_size)
    if world == 1:
        if error is not None:
            raise ValueError(error)
        return lightning_attn(q, k, v, slopes, scale=scale, initial_state=initial_state,
                              output_final_state=output_final_state, backend=backend, block_size=block_size)

    if shard_lengths is None:
        lengths, differentiable = _agree_on_inputs(q, k, v, initial_state, error, group, world, rank)
    else:
        lengths = [int(n) for n in shard_lengths]
        if error is None and (len(lengths) != world or lengths[rank] != q.shape[1]):
            error = (f"shard_lengths {lengths} do not describe this group of {world} ranks with {q.shape[1]} "
                     f"tokens on rank {rank}")
        if error is not None:
            raise ValueError(f"rank {rank} of the sequence-parallel group: {error}")
        differentiable = _needs_grad(k, v, initial_state)

    contribution = local_state_contribution(k, v, slopes, initial_state)
    if differentiable:
        if not contribution.requires_grad:
            # Another rank needs gradients through this gather: take part in its backward anyway.
            contribution = contribution.detach().requires_grad_()
        gathered = _GatherShards.apply(contribution, group, world, rank)
    else:
        gathered = _all_gather(contribution, group, world)
    out, final = shard_attention(q, k, v, slopes, gathered, lengths, rank, scale=scale, initial_state=initial_state,
                                 output_final_state=output_final_state, backend=backend, block_size=block_size)
    if differentiable and rank == 0:
        out = _JoinGather.apply(out, gathered)
    return out, final

"""Sequence parallelism inside the model (DESIGN.md 9; derivation in docs/sequence_parallel.md).

One sequence is cut into ``P`` contiguous, equal shards, one per rank of a process group; each rank
runs the model on its shard with ``sequence_parallel_group=group``. What must see across shards does:

- lightning layers: the state entering the shard from one all-gather of per-shard states
  (``tnl_kernels.lightning_attn_sequence_parallel``);
- softmax layers: keys and values of all earlier shards (an all-gather of K/V over the group; RoPE and
  the causal mask use global positions);
- the loss: labels are shifted before sharding (``shift_labels``), and the cross-entropy is this shard's
  sum over the group's token count, so the shards' losses (and gradients) add up to the unsharded ones;
- the MoE balance loss: expert fractions and mean router probabilities over the whole sequence.

Every rank's loss is its share of the unsharded loss: summed over the group it is that loss, which is
what DeepSpeed's gradient reduction does over the sequence-parallel ranks (it averages over data-parallel
ranks only). The model imports no DeepSpeed: any torch.distributed group works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tnl_kernels import gather_shards


@dataclass(frozen=True)
class SequenceShard:
    """Where this rank's tokens sit in the sequence: ``offset`` tokens of earlier shards precede them."""

    group: object
    rank: int
    world_size: int
    length: int

    @property
    def offset(self) -> int:
        return self.rank * self.length

    @property
    def lengths(self) -> list[int]:
        """Every shard's length, in rank order (all equal, checked by :func:`sequence_shard`)."""
        return [self.length] * self.world_size


def sequence_shard(group, length: int) -> SequenceShard:
    """This rank's shard of ``group``, after checking that every rank holds the same number of tokens
    (softmax layers gather equal-sized K/V blocks; one tiny all-gather, once per forward)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("sequence_parallel_group needs torch.distributed to be initialised "
                         "(e.g. by deepspeed.init_distributed); leave it None for a single-process forward")
    world = dist.get_world_size(group)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(lengths, torch.tensor([length], dtype=torch.int64), group=group)
    lengths = [int(n) for n in lengths]
    if len(set(lengths)) != 1:
        raise ValueError(f"sequence-parallel shards must have equal lengths, got {lengths} over the group's ranks: "
                         "cut each sequence into equal contiguous pieces (pad the sequence to a multiple of the "
                         "group size)")
    return SequenceShard(group=group, rank=dist.get_rank(group), world_size=world, length=length)


def gather_earlier_shards(x: torch.Tensor, dim: int, shard: SequenceShard) -> torch.Tensor:
    """``x`` of every shard up to and including this one, concatenated along ``dim`` (differentiable: the
    backward hands each rank the gradients of its piece from every rank, ``tnl_kernels.gather_shards``)."""
    pieces = gather_shards(x, shard.group)[: shard.rank + 1]
    return torch.cat(pieces.unbind(0), dim=dim)


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward is the same all-reduce: each rank uses the sum in its own loss,
    so the gradient of the sum of all ranks' losses with respect to one rank's input is the sum of
    every rank's gradient of the result. (torch.distributed.nn's all_reduce does this too, but is
    deprecated with no differentiable replacement.)"""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return _SumOverGroup.apply(grad, ctx.group), None


def group_sum(x: torch.Tensor, group, differentiable: bool = False) -> torch.Tensor:
    """Sum of ``x`` over the ranks of ``group`` (``x`` itself when ``group`` is None); ``differentiable`` lets
    the gradient of every rank's loss reach every rank's ``x`` (see :class:`_SumOverGroup`)."""
    if group is None:
        return x
    if differentiable:
        return _SumOverGroup.apply(x, group)
    x = x.detach().clone()
    dist.all_reduce(x, group=group)
    return x

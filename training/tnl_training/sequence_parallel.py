"""Sequence parallelism in training: DeepSpeed's groups, the sharded batch, and what it costs.

``sequence_parallel_size = P`` splits the world into ``world / P`` data-parallel replicas of ``P``
consecutive ranks each (DeepSpeed's ``parallel_state_sp``: ranks ``[0, P)`` hold one sequence group,
``[P, 2P)`` the next, ...). Every rank of a sequence group reads the same rows and keeps its contiguous
``seq_len / P`` slice of them; the model does the rest (``tnl_model.sequence_parallel``). DeepSpeed gets
the groups as its ``mpu``: ZeRO then partitions and reduces over all ``world`` ranks and averages
gradients over the data-parallel replicas only, summing the sequence shards' contributions, which is
what makes a sharded step equal the unsharded one (each shard's loss is its share of the whole).

DeepSpeed's ``UlyssesSPDataLoaderAdapter`` is not used: it fetches one sample per rank and
broadcasts the shards around the group, where here every rank reads its slice of the same rows from
the memory-mapped shards directly (no communication, and the data order of a data-parallel run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tnl_training.config import ConfigError


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's place in the data x sequence grid."""

    size: int  #: ranks per sequence (1: plain data parallelism)
    rank: int  #: position of this rank's shard in the sequence
    group: object  #: the torch.distributed group of one sequence's ranks (None when size is 1)
    data_rank: int  #: which replica (rows of the global batch) this rank works on
    data_world: int  #: number of replicas
    mpu: object  #: what deepspeed.initialize takes as ``mpu`` (None when size is 1)


def check_settings(size: int, world: int, seq_len: int, document_masking: bool, compile_model: bool) -> None:
    """Refuse a sequence-parallel setting that cannot run, before any work (:class:`ConfigError`)."""
    if size < 1:
        raise ConfigError(f"sequence_parallel_size must be >= 1, got {size}")
    if size == 1:
        return
    if world % size:
        raise ConfigError(f"sequence_parallel_size={size} does not divide the {world} processes: launch a multiple of "
                          f"{size} processes (world = data parallel x sequence parallel)")
    if seq_len % size:
        raise ConfigError(f"seq_len={seq_len} is not divisible by sequence_parallel_size={size}: every rank takes an "
                          f"equal contiguous slice; use a seq_len that is a multiple of {size}")
    if document_masking:
        raise ConfigError("document_masking cannot be combined with sequence_parallel_size > 1 (a document's "
                          "boundaries would have to cross shards): set document_masking=false")
    if compile_model:
        raise ConfigError("compile=true is not supported with sequence_parallel_size > 1 yet (the collectives inside "
                          "the layers break the graph): set compile=false")


def setup(size: int, rank: int, world: int) -> SequenceParallel:
    """The groups for ``size`` ranks per sequence, made by DeepSpeed's sequence-parallel state."""
    if size == 1:
        return SequenceParallel(size=1, rank=0, group=None, data_rank=rank, data_world=world, mpu=None)
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    parallel_state_sp.initialize_sequence_parallel(size)
    return SequenceParallel(size=size, rank=parallel_state_sp.get_sequence_parallel_rank(),
                            group=parallel_state_sp.get_sequence_parallel_group(), data_rank=rank // size,
                            data_world=world // size, mpu=parallel_state_sp)


def teardown() -> None:
    """Forget the groups (a second run in the same process, as tests do, makes new ones)."""
    try:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp
    except ImportError:
        return
    parallel_state_sp._release_sequence_parallel_groups()


def model_inputs(rows: torch.Tensor, sp: SequenceParallel) -> dict:
    """Model inputs for rows ``[B, seq_len + 1]``: the first ``seq_len`` tokens and, shifted before sharding,
    the token each one predicts; with sequence parallelism this rank's slice of both, the group, and the
    token count of the whole rows (so the loss is normalised without a collective)."""
    inputs, targets = rows[:, :-1], rows[:, 1:]
    if sp.size == 1:
        return {"input_ids": inputs, "shift_labels": targets}
    piece = inputs.shape[1] // sp.size
    mine = slice(sp.rank * piece, (sp.rank + 1) * piece)
    return {"input_ids": inputs[:, mine], "shift_labels": targets[:, mine], "sequence_parallel_group": sp.group,
            "num_items_in_batch": torch.tensor(targets.numel(), device=rows.device)}


# ------------------------------------------------------------------------ communication, from the formulas
def bytes_per_layer(kind: str, *, batch: int, seq_len: int, size: int, heads: int, kv_heads: int, head_dim: int,
                    dtype_bytes: int = 2) -> float:
    """Bytes one rank sends in one layer's forward, for ``size`` ranks per sequence of ``seq_len`` tokens.

    ``"lasp2_state"``: the all-gather of one fp32 ``[H, D, D]`` state per sequence (lightning layers);
    ``"kv_allgather"``: the all-gather of this shard's keys and values (softmax layers, this package);
    ``"ulysses"``: DeepSpeed-Ulysses' four all-to-alls (q, k, v in, output back) over heads.
    A ring all-gather sends ``size - 1`` times the local piece; an all-to-all sends ``(size-1)/size`` of it.
    """
    if size == 1:
        return 0.0
    shard = seq_len // size
    if kind == "lasp2_state":
        return (size - 1) * batch * heads * head_dim * head_dim * 4
    if kind == "kv_allgather":
        return (size - 1) * 2 * batch * shard * kv_heads * head_dim * dtype_bytes
    if kind == "ulysses":
        local = batch * shard * (2 * heads + 2 * kv_heads) * head_dim * dtype_bytes
        return (size - 1) / size * local
    raise ValueError(f"unknown scheme {kind!r}: 'lasp2_state', 'kv_allgather' or 'ulysses'")

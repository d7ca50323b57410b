"""The whole model under sequence parallelism (tnl_model.sequence_parallel) equals the unsharded model.

Real gloo process groups of P = 2 and 3 ranks on the hybrid MoE tiny config (layer 0 linear, a softmax
layer with GQA and partial RoPE, routed MoE layers with a shared expert and a dense layer). Each rank
holds one contiguous shard of the same rows, with labels shifted before sharding; checked against an
unsharded forward/backward of the same rows in the same process (fp32):

- each rank's logits equal the unsharded logits of its positions;
- the shares of loss, lm_loss, aux_loss and z_loss add up over the group to the unsharded values;
- the gradients of every parameter, summed over the group (what DeepSpeed's reduction does over the
  sequence-parallel ranks), equal the unsharded gradients.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tnl_model.testing import build_model, random_ids, tiny_config

ROWS, LENGTH = 2, 36  # 36 predicted tokens: shards of 18 (P=2) and 12 (P=3)
TOL = dict(rtol=1e-5, atol=1e-6)


def _config():
    return tiny_config(shared_intermediate_size=16, router_z_loss_coef=1e-3, router_aux_loss_coef=0.01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_shard_equals_whole(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build_model(_config(), seed=3).train()
        rows = random_ids(ROWS, LENGTH + 1, seed=5)
        inputs, targets = rows[:, :-1], rows[:, 1:]

        whole = model(input_ids=inputs, shift_labels=targets, use_cache=False)
        whole.loss.backward()
        whole_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)

        piece = LENGTH // world
        mine = slice(rank * piece, (rank + 1) * piece)
        shard = model(input_ids=inputs[:, mine], shift_labels=targets[:, mine], use_cache=False,
                      sequence_parallel_group=dist.group.WORLD)
        shard.loss.backward()

        torch.testing.assert_close(shard.logits, whole.logits[:, mine], **TOL)
        for name in ("loss", "lm_loss", "aux_loss", "z_loss"):
            total = getattr(shard, name).detach().clone()
            dist.all_reduce(total)
            torch.testing.assert_close(total, getattr(whole, name).detach(), **TOL, msg=f"{name} over the group")
        assert whole.aux_loss > 0 and whole.z_loss > 0
        for name, param in model.named_parameters():
            if name not in whole_grads:
                continue
            grad = param.grad.clone()
            dist.all_reduce(grad)
            # relative to the gradient's own norm: some (softmax q/k at initialisation) are ~1e-6 per element,
            # where an absolute tolerance would accept any value
            error = float((grad - whole_grads[name]).norm() / whole_grads[name].norm().clamp(min=1e-30))
            assert error < 1e-5, f"gradient of {name}: relative error {error:.2e}"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_model_equals_unsharded(world):
    mp.spawn(_check_shard_equals_whole, args=(world, _free_port()), nprocs=world, join=True)


def _check_bad_input(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build_model(_config(), seed=3)
        ids = random_ids(1, 8 + rank, seed=5)  # unequal shards
        with pytest.raises(ValueError, match="equal lengths"):
            model(input_ids=ids, use_cache=False, sequence_parallel_group=dist.group.WORLD)
        ids = random_ids(1, 8, seed=5)
        with pytest.raises(ValueError, match="shift labels before sharding"):
            model(input_ids=ids, labels=ids, use_cache=False, sequence_parallel_group=dist.group.WORLD)
        with pytest.raises(ValueError, match="use_cache=False"):
            model(input_ids=ids, use_cache=True, sequence_parallel_group=dist.group.WORLD)
        with pytest.raises(ValueError, match="packed documents"):
            model(input_ids=ids, use_cache=False, cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32),
                  sequence_parallel_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_bad_sequence_parallel_input_is_refused():
    mp.spawn(_check_bad_input, args=(2, _free_port()), nprocs=2, join=True)

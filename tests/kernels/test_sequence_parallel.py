"""Sequence-parallel lightning attention (tnl_kernels.sequence_parallel) equals the unsharded operator.

Oracle: ``lightning_attn(backend="torch")`` on the whole sequence, fp32. A sharded run must give
each shard's rows of its output, its final state, and the gradients of
``Σ_ranks (o_r · g_r + final · f_r)`` with respect to q, k, v and the initial state, to 1e-5 of
each tensor's largest magnitude.

- Real multi-process runs: three worker processes (this file run as a script) with the gloo
  backend, one spawn for every case: P = 3 over the default group, P = 2 over the subgroup of
  global ranks [1, 2] and P = 1 over [2] (group ranks differ from global ranks). Workers write
  their shard's results to files; the tests here compare. Bad inputs on one rank must make every
  rank raise (no hang), and the group must stay usable afterwards (the error cases run first).
- A single-process simulation of P = 4 composing the pure functions in one autograd graph.
- Input validation.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from datetime import timedelta
from typing import NamedTuple, Optional

import pytest
import torch

from tnl_kernels import build_slopes, lightning_attn, lightning_attn_sequence_parallel, state_gather_bytes
from tnl_kernels.sequence_parallel import (
    final_state_from_contributions,
    incoming_state,
    local_state_contribution,
    metadata_gather_bytes,
    shard_attention,
)

TOL = 1e-5
WORKERS = 3


class Case(NamedTuple):
    name: str
    world: int
    lengths: tuple  # shard lengths in rank order
    shape: tuple  # (B, H, D, E)
    with_state: bool
    grads: str  # "all": q, k, v (and S0) need grad; "state": only S0; "none": under no_grad
    final: bool  # output_final_state (and a loss on it on every rank)
    block_size: Optional[int]
    scale: float = 1.0
    seed: int = 0


DIST_CASES = [
    Case("p3_even_state", 3, (13, 12, 12), (2, 3, 16, 24), True, "all", True, 8, seed=1),
    Case("p3_even_no_state", 3, (13, 12, 12), (2, 3, 16, 24), False, "all", True, None, seed=2),
    Case("p3_uneven_state", 3, (5, 20, 12), (2, 3, 16, 24), True, "all", True, 8, scale=0.8, seed=3),
    # rank 0's outputs do not read the gathered states: its backward must still join the all-reduce
    Case("p3_uneven_no_final", 3, (5, 20, 12), (2, 3, 16, 24), True, "all", False, 4, seed=4),
    Case("p3_dk_ne_dv_len1", 3, (7, 1, 9), (1, 2, 24, 8), True, "all", True, 4, seed=5),
    # only the (learnable) initial state needs a gradient: ranks 1, 2 hold nothing that needs one
    Case("p3_state_grad_only", 3, (13, 12, 12), (2, 3, 16, 24), True, "state", True, 8, seed=6),
    Case("p3_no_grad", 3, (5, 20, 12), (2, 3, 16, 24), True, "none", True, 8, seed=7),
    Case("p2_t2_state", 2, (1, 1), (2, 3, 16, 24), True, "all", True, None, seed=8),
    Case("p2_uneven_no_final", 2, (20, 17), (2, 3, 16, 24), False, "all", False, 8, seed=9),
    Case("p2_dk_ne_dv", 2, (9, 14), (2, 2, 8, 32), True, "all", True, 4, seed=10),
]
PLAIN_CASE = Case("p1_plain", 1, (37,), (2, 3, 16, 24), True, "all", True, 8, scale=0.8, seed=11)

# name -> (patterns expected per group rank); run on the default group of 3 before the real cases
ERROR_CASES = {
    "state_on_rank1": ("ValueError: rank.*rejected their inputs",
                       "ValueError: .*initial_state .* read on rank 0 only; pass initial_state=None on rank 1",
                       "ValueError: rank.*rejected their inputs"),
    "heads_mismatch": ("ValueError: B, H, D, E must be the same on every rank",) * 3,
    "empty_shard": ("ValueError: rank.*rejected their inputs", "ValueError: .*at least one token",
                    "ValueError: rank.*rejected their inputs"),
    "grad_disabled_on_rank0": (r"RuntimeError: rank\(s\) \[0\] run with gradients disabled while others need",) * 3,
}


def make_inputs(case: Case):
    """The whole sequence's inputs (deterministic on CPU: workers and the parent draw the same)."""
    batch, heads, dim_k, dim_v = case.shape
    length, world = sum(case.lengths), case.world
    g = torch.Generator().manual_seed(case.seed)
    q = torch.randn(batch, length, heads, dim_k, generator=g) * 0.5 + 0.2
    k = torch.randn(batch, length, heads, dim_k, generator=g) * 0.5 + 0.2
    v = torch.randn(batch, length, heads, dim_v, generator=g)
    state = torch.randn(batch, heads, dim_k, dim_v, generator=g)
    grad_out = torch.randn(batch, length, heads, dim_v, generator=g)
    grad_final = torch.randn(world, batch, heads, dim_k, dim_v, generator=g)  # one per rank
    slopes = build_slopes(heads, 0, 4)
    slopes[1] = 0.0  # a head without decay among decaying ones
    return dict(q=q, k=k, v=v, state=state if case.with_state else None, grad_out=grad_out,
                grad_final=grad_final, slopes=slopes)


def shard_slice(lengths, rank):
    start = sum(lengths[:rank])
    return slice(start, start + lengths[rank])


def reference(case: Case):
    """Unsharded outputs, final state and gradients of the summed loss."""
    x = make_inputs(case)
    leaves = {n: x[n].clone().requires_grad_() for n in ("q", "k", "v")}
    if case.with_state:
        leaves["state"] = x["state"].clone().requires_grad_()
    out, final = lightning_attn(leaves["q"], leaves["k"], leaves["v"], x["slopes"], scale=case.scale,
                                initial_state=leaves.get("state"), output_final_state=True, backend="torch")
    loss = (out * x["grad_out"]).sum()
    if case.final:
        loss = loss + (final * x["grad_final"].sum(0)).sum()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    return out.detach(), final.detach(), grads


def err(got, want) -> float:
    """Largest absolute error relative to the largest magnitude of the expected tensor."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


# --------------------------------------------------------------------------------------------
# Worker side (this file run as a script)
# --------------------------------------------------------------------------------------------


def _run_case(case: Case, group, rank: int):
    """This rank's part of ``case``: returns its outputs and gradients."""
    x = make_inputs(case)
    mine = shard_slice(case.lengths, rank)
    wants_qkv = case.grads == "all"
    q, k, v = (x[n][:, mine].clone().requires_grad_(wants_qkv) for n in ("q", "k", "v"))
    state = x["state"].clone().requires_grad_(case.grads != "none") if case.with_state and rank == 0 else None
    with torch.no_grad() if case.grads == "none" else contextlib.nullcontext():
        out, final = lightning_attn_sequence_parallel(q, k, v, x["slopes"], group=group, scale=case.scale,
                                                      initial_state=state, output_final_state=case.final,
                                                      backend="torch", block_size=case.block_size)
    result = {"out": out.detach(), "final": None if final is None else final.detach()}
    if case.grads != "none":
        loss = (out * x["grad_out"][:, mine]).sum()
        if case.final:
            loss = loss + (final * x["grad_final"][rank]).sum()
        loss.backward()
        result.update(q=q.grad, k=k.grad, v=v.grad, state=None if state is None else state.grad)
    return result


def _run_error_case(name: str, rank: int):
    x = make_inputs(DIST_CASES[0])
    mine = shard_slice(DIST_CASES[0].lengths, rank)
    q, k, v = (x[n][:, mine].clone().requires_grad_() for n in ("q", "k", "v"))
    slopes, state = x["slopes"], None
    grad = contextlib.nullcontext()
    if name == "state_on_rank1":
        state = x["state"] if rank in (0, 1) else None
    elif name == "heads_mismatch" and rank == 2:
        q, k, v, slopes = q[:, :, :2], k[:, :, :2], v[:, :, :2], slopes[:2]
    elif name == "empty_shard" and rank == 1:
        q, k, v = q[:, :0], k[:, :0], v[:, :0]
    elif name == "grad_disabled_on_rank0" and rank == 0:
        grad = torch.no_grad()
    try:
        with grad:
            lightning_attn_sequence_parallel(q, k, v, slopes, initial_state=state, backend="torch")
    except Exception as error:  # noqa: BLE001 - the test checks type and message
        return f"{type(error).__name__}: {error}"
    return "no error"


def _plain_exact(got):
    """World size 1 is exactly the plain operator: same values and gradients, bit for bit."""
    x = make_inputs(PLAIN_CASE)
    leaves = [x[n].clone().requires_grad_() for n in ("q", "k", "v", "state")]
    out, final = lightning_attn(*leaves[:3], x["slopes"], scale=PLAIN_CASE.scale, initial_state=leaves[3],
                                output_final_state=True, backend="torch", block_size=PLAIN_CASE.block_size)
    ((out * x["grad_out"]).sum() + (final * x["grad_final"][0]).sum()).backward()
    wants = dict(zip(("out", "final", "q", "k", "v", "state"), (out, final, *(t.grad for t in leaves))))
    return {name: got.get(name) is not None and torch.equal(got[name], want) for name, want in wants.items()}


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    """Run every case this rank takes part in. A failing case is recorded (its traceback) and ends
    the run on this rank: the group may be out of step after it, so later cases are not attempted
    (the other ranks then fail by the group's timeout) and the results so far are still saved."""
    import traceback

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    results = {"errors": {}}
    try:
        groups = {3: None, 2: dist.new_group([1, 2]), 1: dist.new_group([2])}
        members = {3: [0, 1, 2], 2: [1, 2], 1: [2]}
        for name, patterns in ERROR_CASES.items():
            results["errors"][name] = message = _run_error_case(name, rank)
            if not re.search(patterns[rank], message):
                return
        for case in DIST_CASES + [PLAIN_CASE]:
            if rank not in members[case.world]:
                continue
            try:
                results[case.name] = _run_case(case, groups[case.world], dist.get_rank(groups[case.world]))
            except Exception:  # noqa: BLE001 - reported by the test of this case
                results[case.name] = {"error": traceback.format_exc()}
                return
        if rank in members[1]:
            results["plain_exact"] = _plain_exact(results[PLAIN_CASE.name])
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Test side
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    """Run every distributed case in one spawn of three gloo workers; per-rank results by name."""
    out_dir = tmp_path_factory.mktemp("sequence_parallel")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(rank), str(WORKERS), str(out_dir / "store"),
                               str(out_dir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(WORKERS)]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            logs.append(proc.communicate()[0])
    results = []
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        path = out_dir / f"rank{rank}.pt"
        assert path.exists(), f"worker {rank} exited {proc.returncode} without results:\n{log[-3000:]}"
        results.append(torch.load(path, weights_only=False))
    return results


def _group_results(dist_results, case: Case):
    members = {3: [0, 1, 2], 2: [1, 2], 1: [2]}[case.world]
    per_rank = [dist_results[global_rank].get(case.name) for global_rank in members]  # in group-rank order
    problems = [f"rank {r}: " + ("not run (an earlier case failed)" if res is None else res["error"])
                for r, res in enumerate(per_rank) if res is None or "error" in res]
    assert not problems, "\n".join(problems)
    return per_rank


def _check_against_reference(case: Case, per_rank: list):
    """Shard outputs/gradients concatenated along T (and the final state on every rank) vs the oracle."""
    out, final, grads = reference(case)
    errors = {"out": err(torch.cat([r["out"] for r in per_rank], dim=1), out)}
    if case.final:
        for rank, r in enumerate(per_rank):
            errors[f"final@{rank}"] = err(r["final"], final)
    else:
        assert all(r["final"] is None for r in per_rank)
    if case.grads == "all":
        for name in ("q", "k", "v"):
            errors[f"d{name}"] = err(torch.cat([r[name] for r in per_rank], dim=1), grads[name])
    if case.grads in ("all", "state") and case.with_state:
        errors["dstate"] = err(per_rank[0]["state"], grads["state"])
    if case.grads == "state":
        assert all(r[n] is None for r in per_rank for n in ("q", "k", "v"))
    assert all(e < TOL for e in errors.values()), f"{case.name}: errors {errors}"
    return errors


@pytest.mark.parametrize("case", DIST_CASES, ids=lambda c: c.name)
def test_multiprocess_gloo_matches_unsharded(dist_results, case):
    per_rank = _group_results(dist_results, case)
    errors = _check_against_reference(case, per_rank)
    print(f"{case.name}: max errors {max(errors.values()):.2e}")
    if case.final:  # the same final state on every rank, bit for bit
        assert all(torch.equal(r["final"], per_rank[0]["final"]) for r in per_rank)


def test_world_size_one_is_exactly_the_plain_operator(dist_results):
    _group_results(dist_results, PLAIN_CASE)
    exact = dist_results[2]["plain_exact"]
    assert all(exact.values()), exact


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_bad_input_on_one_rank_raises_on_every_rank(dist_results, name):
    for rank, pattern in enumerate(ERROR_CASES[name]):
        message = dist_results[rank]["errors"].get(name, "not run (an earlier case failed)")
        assert re.search(pattern, message), f"rank {rank}: {message!r} does not match {pattern!r}"


# --- single-process simulation -----------------------------------------------------------


def simulate(case: Case):
    """P shards composed from the pure functions in one autograd graph (what the P ranks compute,
    with the all-gather replaced by a stack)."""
    x = make_inputs(case)
    leaves = {n: x[n].clone().requires_grad_() for n in ("q", "k", "v")}
    if case.with_state:
        leaves["state"] = x["state"].clone().requires_grad_()
    shards = [shard_slice(case.lengths, r) for r in range(case.world)]
    contributions = torch.stack([
        local_state_contribution(leaves["k"][:, s], leaves["v"][:, s], x["slopes"],
                                 leaves.get("state") if r == 0 else None) for r, s in enumerate(shards)])
    per_rank, loss = [], 0
    for r, s in enumerate(shards):
        state = leaves.get("state") if r == 0 else None
        out, final = shard_attention(leaves["q"][:, s], leaves["k"][:, s], leaves["v"][:, s], x["slopes"], contributions,
                                     case.lengths, r, scale=case.scale, initial_state=state,
                                     output_final_state=case.final, backend="torch", block_size=case.block_size)
        loss = loss + (out * x["grad_out"][:, s]).sum() + ((final * x["grad_final"][r]).sum() if case.final else 0)
        per_rank.append({"out": out.detach(), "final": None if final is None else final.detach()})
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    for r, s in enumerate(shards):
        per_rank[r].update({n: grads[n][:, s] for n in ("q", "k", "v")})
    per_rank[0]["state"] = grads.get("state")
    return per_rank


SIM_CASES = [
    Case("p4_state", 4, (10, 9, 9, 9), (2, 3, 16, 24), True, "all", True, 4, seed=20),
    Case("p4_no_state_no_final", 4, (10, 9, 9, 9), (2, 3, 16, 24), False, "all", False, None, scale=0.8, seed=21),
    Case("p4_len1_shard", 4, (9, 1, 14, 13), (2, 3, 16, 24), True, "all", True, 4, seed=22),
    Case("p4_len1_first_and_last", 4, (1, 12, 23, 1), (1, 2, 24, 8), True, "all", True, 8, seed=23),
]


@pytest.mark.parametrize("case", SIM_CASES, ids=lambda c: c.name)
def test_simulated_shards_match_unsharded(case):
    errors = _check_against_reference(case, simulate(case))
    print(f"{case.name}: max errors {max(errors.values()):.2e}")


@pytest.mark.parametrize("with_state", [False, True])
def test_local_contribution_is_the_shards_final_state(with_state):
    x = make_inputs(Case("c", 1, (29,), (2, 3, 16, 24), with_state, "all", True, None, seed=30))
    _, final = lightning_attn(x["q"], x["k"], x["v"], x["slopes"], initial_state=x["state"], output_final_state=True,
                              backend="torch", block_size=8)
    contribution = local_state_contribution(x["k"], x["v"], x["slopes"], x["state"])
    assert contribution.dtype == torch.float32
    assert err(contribution, final) < TOL
    # bf16 inputs: the contribution is still accumulated in fp32
    half = local_state_contribution(x["k"].bfloat16(), x["v"].bfloat16(), x["slopes"])
    assert half.dtype == torch.float32


def test_incoming_and_final_state_combination():
    g = torch.Generator().manual_seed(40)
    contributions = torch.randn(3, 1, 2, 4, 5, generator=g)
    slopes = torch.tensor([0.0, 0.3])
    lengths = [4, 7, 2]
    assert torch.equal(incoming_state(contributions, lengths, slopes, 0), torch.zeros(1, 2, 4, 5))
    assert torch.allclose(incoming_state(contributions, lengths, slopes, 1), contributions[0])
    decay = torch.exp(-slopes).view(1, 2, 1, 1)
    want2 = decay**7 * contributions[0] + contributions[1]
    assert torch.allclose(incoming_state(list(contributions), lengths, slopes, 2), want2, rtol=1e-6, atol=1e-6)
    want3 = decay**2 * want2 + contributions[2]
    assert torch.allclose(final_state_from_contributions(contributions, lengths, slopes), want3, rtol=1e-6, atol=1e-6)
    # long spans underflow to zero instead of overflowing
    far = incoming_state(contributions, [1, 10**6, 1], slopes, 2)
    assert torch.isfinite(far).all() and torch.equal(far[:, 1], contributions[1][:, 1])


def test_gather_bytes_formula():
    assert state_gather_bytes(2, 3, 16, 24, 3) == 3 * 2 * 3 * 16 * 24 * 4
    assert metadata_gather_bytes(4) == 4 * 8 * 8


def test_bad_input_is_refused_with_clear_errors():
    x = make_inputs(Case("e", 2, (5, 5), (1, 2, 8, 8), True, "all", True, None))
    q, k, v, slopes = x["q"], x["k"], x["v"], x["slopes"]
    with pytest.raises(ValueError, match="cu_seqlens .* not supported .* Pad the documents into a batch"):
        lightning_attn_sequence_parallel(q, k, v, slopes, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))
    import torch.distributed as dist

    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed to be initialized"):
            lightning_attn_sequence_parallel(q, k, v, slopes)
    contributions = torch.zeros(2, 1, 2, 8, 8)
    with pytest.raises(ValueError, match="2 shard lengths for 3 contributions"):
        incoming_state(torch.zeros(3, 1, 2, 8, 8), [5, 5], slopes, 1)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\]"):
        incoming_state(contributions, [5, 5], slopes, 3)
    with pytest.raises(ValueError, match="only rank 0 takes it"):
        shard_attention(q, k, v, slopes, contributions, [5, 5], 1, initial_state=x["state"])


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])

"""Sequence parallelism (LASP-2 style, DESIGN.md 9): per-rank memory, speed and bytes moved.

A hybrid MoE model (``tiny_config`` scaled up: 4 layers, layer 0 lightning, layer 1 softmax with
GQA and partial RoPE, MoE layers with top-2 of 4 experts and one dense FFN) trains one sequence
of ``T`` tokens (batch 1) on P = 1 and P = 2 ranks: real gloo process groups on 127.0.0.1, one
process per rank, each rank holding one contiguous ``T / P`` shard (labels shifted before
sharding, ``tnl_training.sequence_parallel.model_inputs``). P = 1 is the plain unsharded model.
The machine's threads are split evenly between the ranks (``--threads // P`` torch threads each).

1. Per length: per-rank peak memory of one forward+backward (``bench_common.peak_memory`` under the
   strict allocator, after a warm-up step so that parameter gradients exist and only activations
   and transients count) and tokens/s (median of timed steps under the "retain" allocator), for the
   group (whole-sequence tokens) and per rank.
2. The longest trainable length under ``--cap-mb`` per rank (doubling, then bisection to
   ``--granularity`` tokens; lengths divisible by P), for P = 1 and P = 2.
3. Bytes moved per layer: the formulas of ``tnl_training.sequence_parallel.bytes_per_layer``
   (LASP-2 state all-gather, softmax K/V all-gather, Ulysses all-to-all) and what the run handed to
   ``torch.distributed``, counted by shims around its collectives in the worker processes.
4. On paper (``--on-paper``, also in the JSON of a run): MiniMax-Text-01 at a 1M-token sequence on
   8 and 64 GPUs: activation memory, ZeRO-3 model/optimizer state and communication per GPU.

    python benchmarks/bench_sequence_parallel.py              # CPU, ~10 minutes on 2 cores
    python benchmarks/bench_sequence_parallel.py --quick      # smoke run, < 1 minute
    python benchmarks/bench_sequence_parallel.py --on-paper   # MiniMax-Text-01 table only, no runs

Targets (issue #18): per-rank peak memory at P = 2 <= 0.6 x P = 1 at the longest common length;
longest trainable length on 2 ranks >= 1.8 x one rank's under the same cap.

Byte convention (the one of ``bytes_per_layer``): what one rank *sends* for a collective run as a
ring: an all-gather sends (P-1) x the local piece, an all-reduce 2(P-1)/P x the buffer, a
reduce-scatter or all-to-all (P-1)/P x the input. The shims count the tensors handed to
torch.distributed under this convention, not gloo's actual wire traffic.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import RESULTS, fast_cpu_allocator, peak_memory, print_table, save_results  # noqa: E402

import tnl_model.softmax_attention as softmax_attention  # noqa: E402
from tnl_model import TNLConfig, TNLForCausalLM  # noqa: E402
from tnl_model.parameters import parameter_breakdown  # noqa: E402
from tnl_model.testing import random_ids, tiny_config  # noqa: E402
from tnl_training.sequence_parallel import SequenceParallel, bytes_per_layer, model_inputs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MINIMAX_CONFIG = REPO / "configs" / "model" / "minimax-text-01.json"
GiB, MiB = 2**30, 2**20
H200_GB = 141  # GB (1e9) of HBM on one H200, for the on-paper "does it fit" line
WORKING_SET = "ZeRO-3 working set: one MoE layer's bf16 params + grads, gathered"
LINEAR, FULL = "linear_attention", "full_attention"


# --------------------------------------------------------------------------------------- the model
def bench_config(max_length: int = 1 << 18) -> TNLConfig:
    """``tnl_model.testing.tiny_config`` scaled up: hidden 256, 4 heads of 64 (2 KV heads), rotary 32,
    vocab 2048, 4 experts top-2 of width 256. Layers: lightning, softmax, lightning, lightning;
    MLPs: MoE, MoE, dense, MoE."""
    return tiny_config(vocab_size=2048, hidden_size=256, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64, rotary_dim=32, max_position_embeddings=max_length)


def config_summary(config: TNLConfig) -> dict:
    keys = ("vocab_size", "hidden_size", "intermediate_size", "dense_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rotary_dim", "num_local_experts",
            "num_experts_per_tok", "shared_intermediate_size", "layer_types", "mlp_layer_types")
    return {k: getattr(config, k) for k in keys}


# ------------------------------------------------------------------------- bytes moved, from formulas
def layer_bytes(kind: str, config: TNLConfig, *, seq_len: int, size: int, dtype_bytes: int, batch: int = 1):
    """``bytes_per_layer`` for ``config``; Ulysses needs the query heads divisible by P (None when not)
    and, with fewer KV heads than ranks, every rank one KV head: the KV heads are replicated up to P
    (counted as ``kv_heads = P``)."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if kind == "ulysses":
        if heads % size:
            return None
        if kv_heads < size:
            kv_heads = size
    return bytes_per_layer(kind, batch=batch, seq_len=seq_len, size=size, heads=heads, kv_heads=kv_heads,
                           head_dim=config.head_dim, dtype_bytes=dtype_bytes)


def formula_table(config: TNLConfig, lengths, sizes, dtype_bytes: int) -> list[dict]:
    """Per layer and per forward (x layers of that kind) for each length and P."""
    n_linear, n_softmax = config.layer_types.count(LINEAR), config.layer_types.count(FULL)
    rows = []
    for length in lengths:
        for size in sizes:
            row = {"seq_len": length, "P": size}
            for kind in ("lasp2_state", "kv_allgather", "ulysses"):
                row[kind] = layer_bytes(kind, config, seq_len=length, size=size, dtype_bytes=dtype_bytes)
            row["forward_lasp2_all_lightning"] = row["lasp2_state"] * n_linear
            row["forward_kv_allgather_all_softmax"] = row["kv_allgather"] * n_softmax
            row["forward_ulysses_all_softmax"] = None if row["ulysses"] is None else row["ulysses"] * n_softmax
            rows.append(row)
    return rows


def expected_run_bytes(config: TNLConfig, *, seq_len: int, size: int, dtype_bytes: int, batch: int = 1) -> dict:
    """What this implementation should hand to torch.distributed per layer, in the ring convention.

    Forward: the formulas (lightning: one fp32 [B, H, D, D] state all-gathered; the model hands the
    operator its shard lengths, so the operator's 8-int64 metadata all-gather does not run; softmax: K
    and V all-gathered). Backward: the gathers' gradients are reduce-scattered, (P-1)/P x P x piece in
    the ring convention: what the forward all-gather sent. (gloo emulates the reduce-scatter with an
    all-reduce, twice that on its wire; the shims count what is handed to torch.distributed.)"""
    lasp2 = layer_bytes("lasp2_state", config, seq_len=seq_len, size=size, dtype_bytes=dtype_bytes, batch=batch)
    kv = layer_bytes("kv_allgather", config, seq_len=seq_len, size=size, dtype_bytes=dtype_bytes, batch=batch)
    return {"forward": {"lightning state": lasp2, "lightning metadata": 0, "softmax K/V": kv},
            "backward": {"lightning state": lasp2, "lightning metadata": 0, "softmax K/V": kv}}


# ------------------------------------------------------------------- activation memory, from a model
def saved_bytes_per_token(config: TNLConfig, act_bytes: int, world: int = 1, rank: int | None = None) -> dict:
    """Bytes the forward saves for the backward per token of a rank's shard, by component, as this
    implementation does (checked against saved-tensor hooks by the benchmark and its test).

    ``act_bytes``: activation dtype (4 fp32, 2 bf16); ``world``: P; ``rank``: which shard (default the
    last, which holds the most). Per layer, per token (h hidden, H heads of d, Hkv KV heads, I expert
    width, k experts per token, E experts, V vocab):

    - RMSNorm (two per layer, one final): its input + fp32 rstd: ``h·a + 4``;
    - lightning mixer: input, qkv pre-activation (3Hd), q, k, v after SiLU (3Hd), operator output, its
      norm, the sigmoid gate and the gated product (4Hd): ``(h + 10·H·d)·a + 4``. Sharded (P > 1), the
      shard's state contribution (``local_state_contribution``) also keeps the decay-weighted keys in fp32
      (``4·H·d``), an fp32 copy of v when activations are not fp32 (``4·H·d``) and the decays (``4·H``);
      and per layer (not per token) rank r keeps the r gathered states before its own: ``r·(H·d·d + H)·4``
      (key ``"lightning states per layer"``);
    - softmax mixer, local: input, q (Hd), attention output and o_proj input (2Hd), fp32 log-sum-exp per
      head: ``(h + 3·H·d)·a + 4·H``, on a rank r > 0 too: on the CPU its queries attend to the earlier
      shards' keys and their own through ``tnl_model.continuation_attention`` (no ``[T_r, (r+1)·T_r]`` mask,
      linear memory), on the GPU through flash-attn. Rank r keeps the keys and values of shards 0..r
      (``gather_earlier_shards`` gathers all P, keeps a copy of the first r + 1): ``2·Hkv·d·a·(r + 1)`` per
      local token, ``P`` times that on the last rank;
    - MoE (top-k, no shared expert): the input as the fp32 router multiplies it (``4h``, whatever the
      activation dtype), per assignment the sorted input (h), gate/up (2I), SiLU(gate) (I), the product
      (I), the expert output and its weighted copy (2h): ``k·(3h + 4I)·a``, fp32 router logits and routing
      tensors (``4E + 4 + 28k + k·a``); the aux/z losses keep ``8E + 4`` more (and the router keeps
      an fp32 copy of its weight when it is not fp32: per layer, not per token);
    - dense FFN: ``(h + 4·I_dense)·a``; rotary cos/sin (once): ``2·r·a``;
    - LM head + loss: lm_head input ``h·a``, token ids (8) and the fp32 log-softmax ``4·V`` that
      cross-entropy saves (the returned logits, ``V·a``, are alive too, not saved).
    """
    h, heads, kv_heads, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    a, top_k, experts, inter = act_bytes, config.num_experts_per_tok, config.num_local_experts, config.intermediate_size
    rank = world - 1 if rank is None else rank
    sharded = world > 1
    has_softmax = FULL in config.layer_types
    return {
        "norm": h * a + 4,
        "lightning": (h + 10 * heads * d) * a + 4
                     + ((4 * heads * d + (4 * heads * d if a != 4 else 0) + 4 * heads) if sharded else 0),
        "lightning states per layer": rank * (heads * d * d + heads) * 4,
        "softmax local": (h + 3 * heads * d) * a + 4 * heads,
        "softmax K/V": 2 * kv_heads * d * a * (rank + 1),
        "moe": 4 * h + top_k * (3 * h + 4 * inter) * a + 4 * experts + 4 + 28 * top_k + top_k * a,
        "router stats": 8 * experts + 4,
        "dense": (h + 4 * config.dense_intermediate_size) * a,
        "rotary": 2 * config.rotary_dim * a if has_softmax else 0,
        "head": h * a + 8 + 4 * config.vocab_size,
    }


def saved_bytes_model(config: TNLConfig, act_bytes: int, world: int = 1, rank: int = 0, local_tokens: int = 1) -> dict:
    """``saved_bytes_per_token`` summed over the model's layers, per category of the hook measurement,
    per token of ``local_tokens`` (per-layer constants spread over them)."""
    per = saved_bytes_per_token(config, act_bytes, world, rank)
    n_linear, n_softmax = config.layer_types.count(LINEAR), config.layer_types.count(FULL)
    n_moe = config.mlp_layer_types.count("sparse")
    n_dense = config.num_hidden_layers - n_moe
    return {
        "norms": (2 * config.num_hidden_layers + 1) * per["norm"],
        "lightning mixers": n_linear * (per["lightning"] + per["lightning states per layer"] / local_tokens),
        "softmax mixers (local)": n_softmax * per["softmax local"] + per["rotary"],
        "softmax K/V (whole sequence)": n_softmax * per["softmax K/V"],
        "MoE": n_moe * per["moe"],
        "dense FFN": n_dense * per["dense"],
        "head, loss, router stats": per["head"] + n_moe * per["router stats"],
    }


class ModuleContext:
    """Which part of the model is running (forward hooks on the mixers, FFNs, norms and head)."""

    def __init__(self, model):
        self.stack = ["head, loss, router stats"]
        for name, module in model.named_modules():
            label = None
            parts = name.split(".")
            if len(parts) == 4 and parts[:2] == ["model", "layers"]:
                layer = model.model.layers[int(parts[2])]
                if parts[3] == "self_attn":
                    label = "lightning mixers" if layer.layer_type == LINEAR else "softmax mixers (local)"
                elif parts[3] == "mlp":
                    label = "MoE" if model.config.mlp_layer_types[int(parts[2])] == "sparse" else "dense FFN"
                elif parts[3].endswith("layernorm"):
                    label = "norms"
            elif name == "model.norm":
                label = "norms"
            if label is not None:
                module.register_forward_pre_hook(functools.partial(self._enter, label))
                module.register_forward_hook(self._leave)

    def _enter(self, label, module, args):
        self.stack.append(label)

    def _leave(self, module, args, output):
        self.stack.pop()

    @property
    def current(self) -> str:
        return self.stack[-1]


class _Saved:
    """What the pack hook hands autograd: alive exactly as long as the graph node that saved it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def measure_saved_bytes(model, context: ModuleContext, inputs: dict, total_length: int) -> dict:
    """Bytes of the tensors the forward saves for the backward, by model part (one forward, no backward).

    Counted once the forward is done, over the saved tensors whose graph nodes are still alive (a node
    whose output nothing uses is freed during the forward, with what it saved), each storage once,
    parameters left out. A softmax layer's keys and values for the whole sequence (the gathered ones under
    sequence parallelism, found by wrapping ``gather_earlier_shards`` in this process; unsharded, the saved
    ``[B, Hkv, T, d]`` tensors) are counted apart."""
    config = model.config
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kv_shape = (inputs["input_ids"].shape[0], config.num_key_value_heads, total_length, config.head_dim)
    sharded = inputs.get("sequence_parallel_group") is not None
    records, gathered = [], []
    original = softmax_attention.gather_earlier_shards

    def recording_gather(x, dim, shard):
        out = original(x, dim, shard)
        gathered.append(out)  # kept alive until counted, so its address stays its own
        return out

    def pack(tensor):
        label = context.current
        if label == "softmax mixers (local)":
            ptr = tensor.untyped_storage().data_ptr()
            whole = (any(g.untyped_storage().data_ptr() == ptr for g in gathered) if sharded
                     else tuple(tensor.shape) == kv_shape)
            if whole:
                label = "softmax K/V (whole sequence)"
        saved = _Saved(tensor)
        records.append((weakref.ref(saved), label))
        return saved

    softmax_attention.gather_earlier_shards = recording_gather
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
            out = model(**inputs, use_cache=False)
        totals, seen = {}, set()
        for ref, label in records:
            saved = ref()
            if saved is None:
                continue
            storage = saved.tensor.untyped_storage()
            key = storage.data_ptr()
            if key in seen or key in params or storage.nbytes() == 0:
                continue
            seen.add(key)
            totals[label] = totals.get(label, 0) + storage.nbytes()
        del out
    finally:
        softmax_attention.gather_earlier_shards = original
    return totals


# ------------------------------------------------------------------- counting shims for collectives
class CommCounter:
    """Wraps torch.distributed's collectives (in this process only) and records, while ``phase`` is set,
    the bytes each one is handed and what a ring algorithm makes this rank send (see the module doc)."""

    # name -> (index of the tensor whose size counts, index of the group argument)
    OPS = {"all_gather": (1, 2), "all_gather_into_tensor": (1, 2), "all_reduce": (0, 2),
           "reduce_scatter_tensor": (1, 3), "all_to_all_single": (1, 4), "broadcast": (0, 2)}
    TENSOR_KW = {"all_gather": "tensor", "all_gather_into_tensor": "input_tensor", "all_reduce": "tensor",
                 "reduce_scatter_tensor": "input", "all_to_all_single": "input", "broadcast": "tensor"}

    def __init__(self, context: ModuleContext | None = None, classify=None):
        self.records, self.phase, self.context, self.classify = [], None, context, classify
        self._originals = {}

    def install(self):
        for name in self.OPS:
            original = getattr(dist, name)
            self._originals[name] = original
            setattr(dist, name, self._shim(name, original))
        return self

    def uninstall(self):
        for name, original in self._originals.items():
            setattr(dist, name, original)
        self._originals = {}

    def _shim(self, name, original):
        @functools.wraps(original)
        def shim(*args, **kwargs):
            if self.phase is not None:
                self._record(name, args, kwargs)
            return original(*args, **kwargs)

        return shim

    def _record(self, name, args, kwargs):
        tensor_at, group_at = self.OPS[name]
        tensor = args[tensor_at] if len(args) > tensor_at else kwargs[self.TENSOR_KW[name]]
        group = args[group_at] if len(args) > group_at else kwargs.get("group")
        world = dist.get_world_size(group)
        nbytes = tensor.numel() * tensor.element_size()
        if name in ("all_gather", "all_gather_into_tensor"):
            sent = (world - 1) * nbytes
        elif name == "all_reduce":
            sent = 2 * (world - 1) * nbytes / world
        elif name in ("reduce_scatter_tensor", "all_to_all_single"):
            sent = (world - 1) * nbytes / world
        else:
            sent = 0.0  # broadcast: not used by the model
        if self.phase == "forward" and self.context is not None:
            part = self.context.current
        else:
            part = self.classify(tensor) if self.classify else "unattributed"
        if part == "lightning mixers":
            part = "lightning metadata" if tensor.dtype == torch.int64 else "lightning state"
        elif part == "softmax mixers (local)":
            part = "softmax K/V"
        self.records.append({"phase": self.phase, "part": part, "op": name, "shape": list(tensor.shape),
                             "dtype": str(tensor.dtype).replace("torch.", ""), "bytes": nbytes, "sent": sent,
                             "world": world})

    def summary(self) -> dict:
        """Per phase, per part: calls, bytes handed over, bytes sent (ring convention)."""
        out = {}
        for r in self.records:
            empty = {"calls": 0, "bytes": 0, "sent": 0.0, "ops": {}}
            entry = out.setdefault(r["phase"], {}).setdefault(r["part"], empty)
            entry["calls"] += 1
            entry["bytes"] += r["bytes"]
            entry["sent"] += r["sent"]
            key = f"{r['op']} {r['dtype']}{r['shape']}"
            entry["ops"][key] = entry["ops"].get(key, 0) + 1
        return out


def backward_classifier(config: TNLConfig, world: int, batch: int, length: int):
    """Backward collectives run in autograd, outside module hooks: tell them apart by shape."""
    lightning = (world, batch, config.num_attention_heads, config.head_dim, config.head_dim)
    softmax = (world, batch, config.num_key_value_heads, length // world, config.head_dim)

    def classify(tensor):
        if tuple(tensor.shape) == lightning:
            return "lightning state"
        if tuple(tensor.shape) == softmax:
            return "softmax K/V"
        return "head, loss, router stats"

    return classify


# ---------------------------------------------------------------------------------- the workers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(length: int, world: int, rank: int, group, vocab: int) -> dict:
    rows = random_ids(1, length + 1, seed=length, vocab=vocab)  # the same rows on every rank
    return model_inputs(rows, SequenceParallel(size=world, rank=rank, group=group, data_rank=0, data_world=1, mpu=None))


def _step(model, inputs, counter: CommCounter | None = None) -> None:
    model.zero_grad(set_to_none=False)  # in place: gradients keep their memory, no new allocation
    if counter is not None:
        counter.phase = "forward"
    out = model(**inputs, use_cache=False)
    if counter is not None:
        counter.phase = "backward"
    out.loss.backward()
    if counter is not None:
        counter.phase = None


def _gather_floats(values, world):
    if world == 1:
        return [list(values)]
    local = torch.tensor(values, dtype=torch.float64)
    pieces = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(pieces, local)
    return [p.tolist() for p in pieces]


def _worker(rank: int, world: int, port: int, spec: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)
    torch.set_num_threads(spec["threads"])
    fast_cpu_allocator()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _run_rank(rank, world, spec)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _run_rank(rank: int, world: int, spec: dict) -> dict:
    config = TNLConfig.from_dict(spec["config"])
    torch.manual_seed(0)
    model = TNLForCausalLM(config).train()
    group = dist.group.WORLD if world > 1 else None
    context = ModuleContext(model)
    counter = CommCounter(context).install()
    result = {"rank": rank, "threads": torch.get_num_threads(), "sweep": [], "probes": [],
              "loadavg_start": os.getloadavg()}

    def barrier():
        if world > 1:
            dist.barrier()

    def memory(length):
        inputs = _inputs(length, world, rank, group, config.vocab_size)
        barrier()
        with peak_memory() as mem:
            _step(model, inputs)
        peaks = [p[0] for p in _gather_floats([mem["peak_mb"]], world)]
        return peaks

    for length in spec["lengths"]:
        inputs = _inputs(length, world, rank, group, config.vocab_size)
        counter.records = []
        counter.classify = backward_classifier(config, world, 1, length)
        _step(model, inputs, counter)  # warm-up, and the step whose collectives are counted
        comm = counter.summary()
        times, cpu = [], []
        for _ in range(spec["repeats"]):
            barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            _step(model, inputs)
            cpu.append(time.process_time() - cpu_start)
            barrier()  # the group's step ends when its slowest rank's does
            times.append(time.perf_counter() - start)
        del inputs
        peaks = memory(length)
        step_s = statistics.median(times)
        result["sweep"].append({"length": length, "peak_mb_per_rank": peaks, "peak_mb": max(peaks), "step_s": step_s,
                                "step_times_s": times, "cpu_s": statistics.median(cpu), "tokens_per_s": length / step_s,
                                "tokens_per_s_per_rank": length / world / step_s, "comm": comm,
                                "loadavg": os.getloadavg()})
        if rank == 0:
            print(f"  P={world} T={length:>6d}: step {step_s:.2f}s, {length / step_s:,.0f} tok/s, "
                  f"peak per rank {', '.join(f'{p:.0f}' for p in peaks)} MiB", flush=True)

    # Saved-tensor breakdown (what dominates memory) at one length.
    length = spec["breakdown_length"]
    result["saved_bytes"] = {"length": length, "by_part": measure_saved_bytes(
        model, context, _inputs(length, world, rank, group, config.vocab_size), length)}

    # Longest length under the cap: grow by doubling, then bisect. Every rank takes the same decisions
    # from the group's largest per-rank peak.
    cap, step = spec["cap_mb"], spec["granularity"]
    measured = {row["length"]: row["peak_mb"] for row in result["sweep"]}

    def probe(length):
        peaks = memory(length)
        measured[length] = max(peaks)
        result["probes"].append({"length": length, "peak_mb_per_rank": peaks, "peak_mb": max(peaks),
                                 "fits": max(peaks) <= cap})
        if rank == 0:
            print(f"  P={world} probe T={length:>6d}: peak per rank {', '.join(f'{p:.0f}' for p in peaks)} MiB "
                  f"({'fits' if max(peaks) <= cap else 'over'} {cap} MiB)", flush=True)

    fitting = [n for n, p in measured.items() if p <= cap]
    ok = max(fitting) if fitting else 0
    limit_hit = False
    while not any(n > ok and p > cap for n, p in measured.items()):
        nxt = max(2 * ok, step)
        if nxt > spec["max_length"]:
            limit_hit = True
            break
        probe(nxt)
        ok = max(n for n, p in measured.items() if p <= cap) if any(p <= cap for p in measured.values()) else 0
    if not limit_hit:
        bad = min(n for n, p in measured.items() if n > ok and p > cap)
        while bad - ok > step:
            mid = (ok + bad) // 2 // step * step
            if mid <= ok:
                mid = ok + step
            probe(mid)
            if measured[mid] <= cap:
                ok = mid
            else:
                bad = mid
    result["longest"] = ok
    result["longest_limited_by_max_length"] = limit_hit
    result["loadavg_end"] = os.getloadavg()
    counter.uninstall()
    return result


def make_spec(config: TNLConfig, *, threads: int, lengths, repeats: int, cap_mb: float, granularity: int,
              max_length: int, breakdown_length: int | None = None) -> dict:
    """What every rank of a run gets: the model config, its threads, the sweep and the cap search."""
    config_dict = config.to_dict()
    config_dict.pop("transformers_version", None)
    return {"config": config_dict, "threads": threads, "lengths": list(lengths), "repeats": repeats, "cap_mb": cap_mb,
            "granularity": granularity, "max_length": max_length,
            "breakdown_length": breakdown_length or lengths[min(1, len(lengths) - 1)]}


def run_group(world: int, spec: dict) -> dict:
    """Spawn ``world`` ranks and return every rank's result."""
    with tempfile.TemporaryDirectory(prefix="bench_sp_") as out_dir:
        mp.spawn(_worker, args=(world, _free_port(), spec, out_dir), nprocs=world, join=True)
        return {r: json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)}


# --------------------------------------------------------------------------------------- on paper
def on_paper(config_path: Path = MINIMAX_CONFIG, seq_len: int = 1 << 20, sizes=(8, 64), act_bytes: int = 2) -> dict:
    """MiniMax-Text-01 (or any config) trained on one ``seq_len``-token sequence per step, sharded over
    ``P`` GPUs that are also the whole ZeRO-3 world (data parallel 1). Bytes per GPU."""
    config = TNLConfig.from_json_file(str(config_path))
    h, heads, kv_heads, d = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    n_linear, n_softmax = config.layer_types.count(LINEAR), config.layer_types.count(FULL)
    n_layers, n_moe = config.num_hidden_layers, config.mlp_layer_types.count("sparse")
    n_dense = n_layers - n_moe
    breakdown = parameter_breakdown(config)
    params = breakdown.total
    head_unfused_live = config.vocab_size * act_bytes  # the logits the forward returns (alive, not saved)
    experts_layer = config.num_local_experts * 3 * config.intermediate_size * h  # largest layer's parameters
    kv_whole = 2 * seq_len * kv_heads * d * act_bytes  # one softmax layer's gathered K/V, whatever P
    cases = {}
    for size in sizes:
        tokens, world = seq_len // size, size
        # the last rank (it keeps the most gathered states); GPU attention path (flash-attn), so no CPU
        # continuation extras
        per = saved_bytes_per_token(config, act_bytes, world=size)

        def ffn(i):
            return per["moe"] + per["router stats"] if config.mlp_layer_types[i] == "sparse" else per["dense"]

        lightning_layers = [per["lightning"] + 2 * per["norm"] + ffn(i)
                            for i, kind in enumerate(config.layer_types) if kind == LINEAR]
        softmax_layers = [per["softmax local"] + 2 * per["norm"] + ffn(i)
                          for i, kind in enumerate(config.layer_types) if kind == FULL]
        states = per["lightning states per layer"]
        head_chunked = h * act_bytes + per["norm"] + 8  # final norm, lm_head input, ids: no [T, V] tensor kept
        head_unfused = per["head"] + per["norm"] + head_unfused_live
        no_ckpt = {
            "lightning layers (mixer + MoE + norms)": tokens * sum(lightning_layers),
            "LASP-2 gathered states kept (last rank)": n_linear * states,
            "softmax layers, local (mixer + MoE + norms)": tokens * (sum(softmax_layers) + per["rotary"]),
            "softmax gathered K/V (whole sequence)": n_softmax * kv_whole,
        }
        no_ckpt["total, chunked cross-entropy"] = sum(no_ckpt.values()) + tokens * head_chunked
        no_ckpt["LM head + loss, unfused cross-entropy (extra, either way)"] = tokens * (head_unfused - head_chunked)
        largest_layer = max([tokens * x + states for x in lightning_layers]
                            + [tokens * (x + per["rotary"]) + kv_whole for x in softmax_layers])
        ckpt = {
            "layer inputs kept (h per layer per token)": tokens * n_layers * h * act_bytes,
            "one layer recomputed in the backward (largest)": largest_layer,
            "total, chunked cross-entropy": tokens * (n_layers * h * act_bytes + head_chunked) + largest_layer,
        }
        per_token = {
            "lightning layer (mixer + MoE + 2 norms)": lightning_layers[0] if lightning_layers else 0,
            "softmax layer, local (mixer + MoE + 2 norms)": softmax_layers[0] if softmax_layers else 0,
            "softmax layer gathered K/V, per token of the whole sequence": 2 * kv_heads * d * act_bytes,
            "LASP-2 gathered states per lightning layer (last rank, per layer)": states,
            "checkpointed layer (its input only)": h * act_bytes,
        }
        zero = {
            "parameters": params,
            "model + optimizer states (16 B/param / world)": 16 * params / world,
            "optimizer offloaded to CPU: bf16 params + grads (4 B/param / world)": 4 * params / world,
            WORKING_SET: 2 * 2 * experts_layer,
        }
        working = zero[WORKING_SET]
        model_states = zero["model + optimizer states (16 B/param / world)"]
        total_gpu = ckpt["total, chunked cross-entropy"] + model_states + working
        total_offload = ckpt["total, chunked cross-entropy"] + 4 * params / world + working
        lasp2 = layer_bytes("lasp2_state", config, seq_len=seq_len, size=size, dtype_bytes=act_bytes)
        kv = layer_bytes("kv_allgather", config, seq_len=seq_len, size=size, dtype_bytes=act_bytes)
        ulysses = layer_bytes("ulysses", config, seq_len=seq_len, size=size, dtype_bytes=act_bytes)
        zero_pass = (world - 1) / world * 2 * params  # one all-gather (or reduce-scatter) of all bf16 parameters
        comm = {
            "LASP-2 state all-gather, forward": n_linear * lasp2,
            "LASP-2, backward as reduce-scatter": n_linear * lasp2,
            "softmax K/V all-gather, forward": n_softmax * kv,
            "K/V, backward as reduce-scatter": n_softmax * kv,
            "Ulysses all-to-all, forward": None if ulysses is None else n_softmax * ulysses,
            "Ulysses, backward": None if ulysses is None else n_softmax * ulysses,
            "ZeRO-3 parameter all-gather, forward": zero_pass,
            "ZeRO-3 parameter all-gather, backward": zero_pass,
            "ZeRO-3 gradient reduce-scatter (bf16)": zero_pass,
        }
        sp_step = 2 * n_linear * lasp2 + 2 * n_softmax * kv  # as implemented: forward + reduce-scatter backward
        sp_step_ckpt = sp_step + n_linear * lasp2 + n_softmax * kv  # + the gathers again in the recompute
        comm["sequence parallel per step, as implemented"] = sp_step
        comm["sequence parallel per step, with checkpointing recompute"] = sp_step_ckpt
        comm["ZeRO-3 per step"] = 3 * zero_pass
        comm["sequence parallel / ZeRO-3 (ratio, with recompute)"] = sp_step_ckpt / (3 * zero_pass)
        cases[str(size)] = {
            "P": size, "world": world, "nodes": max(1, size // 8), "tokens_per_gpu": tokens,
            "saved_bytes_per_token": per, "bytes_per_token_per_layer": per_token,
            "activations_no_checkpointing": no_ckpt, "activations_full_checkpointing": ckpt, "zero3": zero,
            "total_per_gpu_checkpointing_chunked_ce": total_gpu, "fits_h200": total_gpu <= H200_GB * 1e9,
            "total_per_gpu_optimizer_offloaded": total_offload, "fits_h200_offloaded": total_offload <= H200_GB * 1e9,
            "communication_per_step": comm,
            "ulysses_note": ("query heads not divisible by P: Ulysses cannot split them" if ulysses is None else
                             f"{kv_heads} KV heads < P = {size}: KV heads replicated to {size} (counted)"
                             if kv_heads < size else "heads divisible by P"),
        }
    return {
        "config": str(config_path.relative_to(REPO)) if config_path.is_relative_to(REPO) else str(config_path),
        "seq_len": seq_len, "batch": 1, "activation_bytes": act_bytes, "lightning_state": "fp32",
        "layers": {"lightning": n_linear, "softmax": n_softmax, "moe": n_moe, "dense": n_dense},
        "parameters_total": params, "parameters_active": breakdown.active(),
        "assumptions": [
            "one sequence of seq_len tokens per step, batch 1; P GPUs = the whole world (data parallel 1); ZeRO-3 "
            "partitions parameters, gradients and optimizer states over all of them",
            "no expert parallelism, no tensor parallelism: every GPU runs all 32 experts of every MoE layer on its "
            "own tokens, with parameters gathered by ZeRO-3",
            "bf16 activations, parameters and gradients; fp32 master weights + Adam moments (16 B/param in all); "
            "fp32 lightning states (communication)",
            "activations: the tensors this implementation saves for the backward (saved_bytes_per_token, checked "
            "against saved-tensor hooks on the CPU path, fp32 and bf16, P = 1 and 2), on the last rank (it keeps the "
            "most gathered LASP-2 states), with flash-attn for the softmax layers on the GPU (no mask; on the CPU "
            "tnl_model.continuation_attention, no mask either); the backward's transient gradients come on top "
            "(about one layer's activations); no allocator fragmentation",
            "full checkpointing: every decoder layer keeps its input (h per token) and is recomputed in the "
            "backward, one at a time; a softmax layer's recompute gathers K/V again",
            "'chunked cross-entropy': the loss computed in pieces without a [T, V] logits tensor (not what the "
            "model does today: transformers' loss upcasts the whole logits and saves the fp32 log-softmax)",
            "communication: bytes one GPU sends, ring convention (all-gather (P-1) x local piece, all-reduce "
            "2(P-1)/P x buffer, reduce-scatter / all-to-all (P-1)/P x input); ZeRO-3: forward and backward "
            "all-gathers of bf16 parameters and one bf16 gradient reduce-scatter per step (3 x 2 B/param x "
            "(W-1)/W), prefetching and re-gathers for the recompute not counted",
            "Ulysses: four all-to-alls per softmax layer each way (q, k, v in, output back); query heads must be "
            "divisible by P, and with fewer KV heads than ranks the KV heads are replicated up to P",
        ],
        "cases": cases,
    }


def _gb(n):
    return "-" if n is None else f"{n / GiB:,.2f}"


def print_on_paper(paper: dict) -> None:
    cases = list(paper["cases"].values())
    head = [""] + [f"P={c['P']} ({c['nodes']} node{'s' if c['nodes'] > 1 else ''}, {c['tokens_per_gpu']:,} tok/GPU)"
                   for c in cases]
    print(f"\nOn paper: {paper['config']}, one {paper['seq_len']:,}-token sequence, batch 1, bf16 activations, "
          f"fp32 lightning state; {paper['layers']['lightning']} lightning + {paper['layers']['softmax']} softmax "
          f"layers, {paper['parameters_total'] / 1e9:.1f}B parameters ({paper['parameters_active'] / 1e9:.1f}B "
          "active); ZeRO-3 over world = P; no expert parallelism. GiB per GPU.")
    for case in cases:
        print(f"Saved for the backward at P={case['P']}: "
              + "; ".join(f"{k}: {v / 1024:,.1f} KiB" for k, v in case["bytes_per_token_per_layer"].items()))
    rows = []
    for section, key in (("(a) activations, no checkpointing", "activations_no_checkpointing"),
                         ("(a) activations, full activation checkpointing", "activations_full_checkpointing")):
        rows.append([section] + [""] * len(cases))
        for item in cases[0][key]:
            rows.append(["  " + item] + [_gb(c[key][item]) for c in cases])
    rows.append(["(b) ZeRO-3 over the world"] + [""] * len(cases))
    for item in list(cases[0]["zero3"])[1:]:
        rows.append(["  " + item] + [_gb(c["zero3"][item]) for c in cases])
    rows.append(["total per GPU (checkpointing, chunked CE, ZeRO-3, largest layer)"]
                + [f"{_gb(c['total_per_gpu_checkpointing_chunked_ce'])} ({'fits' if c['fits_h200'] else 'exceeds'} "
                   f"{H200_GB} GB H200)" for c in cases])
    rows.append(["  the same, optimizer offloaded to CPU"]
                + [f"{_gb(c['total_per_gpu_optimizer_offloaded'])} ({'fits' if c['fits_h200_offloaded'] else 'exceeds'}"
                   f" {H200_GB} GB H200)" for c in cases])
    rows.append(["(c) communication per step per GPU, sent"] + [""] * len(cases))
    for item in cases[0]["communication_per_step"]:
        if item.endswith("(ratio, with recompute)"):
            rows.append(["  " + item] + [f"{c['communication_per_step'][item]:.3f}" for c in cases])
        else:
            rows.append(["  " + item] + [_gb(c["communication_per_step"][item]) for c in cases])
    rows.append(["  Ulysses"] + [c["ulysses_note"] for c in cases])
    print(f"\nMiniMax-Text-01 at {paper['seq_len']:,} tokens, per GPU (GiB unless marked)\n")
    for i, row in enumerate([head] + rows):
        cells = [str(c) for c in row]
        if cells[0] and not cells[0].startswith("  ") and i > 0:
            cells[0] = f"**{cells[0]}**"
        print("| " + " | ".join(c.strip() for c in cells) + " |")
        if i == 0:
            print("|" + "---|" * len(row))
    print("Assumptions:")
    for line in paper["assumptions"]:
        print(f"  - {line}")


# ------------------------------------------------------------------------------------ reporting
def print_formula_table(rows: list[dict], config: TNLConfig, dtype_bytes: int) -> None:
    print_table(f"Bytes one rank sends per layer, forward (bytes_per_layer; benchmark config, {dtype_bytes}-byte "
                f"activations; Ulysses with KV heads replicated up to P, '-' when heads % P != 0)",
                ["seq_len", "P", "lasp2_state KiB", "kv_allgather KiB", "ulysses KiB", "kv/lasp2",
                 f"fwd: {config.layer_types.count(LINEAR)} lightning KiB",
                 f"fwd: {config.layer_types.count(FULL)} softmax (K/V) KiB"],
                [[r["seq_len"], r["P"], r["lasp2_state"] / 1024, r["kv_allgather"] / 1024,
                  "-" if r["ulysses"] is None else r["ulysses"] / 1024, r["kv_allgather"] / r["lasp2_state"],
                  r["forward_lasp2_all_lightning"] / 1024, r["forward_kv_allgather_all_softmax"] / 1024] for r in rows])


def bytes_check(config: TNLConfig, run: dict, dtype_bytes: int) -> list[dict]:
    """Measured (rank 0, one step per sweep length) vs expected, per layer."""
    n_linear = config.layer_types.count(LINEAR)
    n_parts = {"lightning state": n_linear, "lightning metadata": n_linear,
               "softmax K/V": config.layer_types.count(FULL)}
    rows = []
    world = len(run)
    for row in run[0]["sweep"]:
        expected = expected_run_bytes(config, seq_len=row["length"], size=world, dtype_bytes=dtype_bytes)
        for phase in ("forward", "backward"):
            for part, layers in n_parts.items():
                measured = row["comm"].get(phase, {}).get(part, {"sent": 0.0, "calls": 0})
                per_layer = measured["sent"] / layers
                want = expected[phase][part]
                rows.append({"length": row["length"], "phase": phase, "part": part, "calls": measured["calls"],
                             "measured_per_layer": per_layer, "expected_per_layer": want,
                             "match": abs(per_layer - want) <= 1e-6 * max(1.0, want)})
            other = row["comm"].get(phase, {}).get("head, loss, router stats", {"sent": 0.0, "calls": 0})
            rows.append({"length": row["length"], "phase": phase, "part": "outside layers (shard check, router stats)",
                         "calls": other["calls"], "measured_per_layer": other["sent"], "expected_per_layer": None,
                         "match": None})
    return rows


def saved_comparison(config: TNLConfig, length: int, world: int, act_bytes: int = 4) -> list[dict]:
    """Saved-for-backward MiB by part at ``length`` tokens: unsharded vs the last of ``world`` ranks (the
    activation model, which the run checks against saved-tensor hooks): what shards and what does not."""
    local = length // world
    one = saved_bytes_model(config, act_bytes, 1, 0, length)
    sharded = saved_bytes_model(config, act_bytes, world, world - 1, local)
    rows = [{"part": part, "p1_mib": one[part] * length / MiB, "sharded_mib": sharded[part] * local / MiB}
            for part in one]
    rows.append({"part": "total", "p1_mib": sum(r["p1_mib"] for r in rows),
                 "sharded_mib": sum(r["sharded_mib"] for r in rows)})
    return rows


def source_state() -> dict:
    """The commit and the uncommitted changes the run measured (the checkout is shared and changes)."""
    import hashlib
    import subprocess

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    paths = ["tnl_model", "kernels/tnl_kernels", "training/tnl_training"]
    diff = git("diff", "HEAD", "--", *paths)
    return {"head": git("rev-parse", "HEAD").strip(),
            "modified_or_untracked": [line[3:] for line in git("status", "--short", "--", *paths).splitlines()],
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()}


def plot(payload, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    cap = payload["cap_mb"]
    for world, run in payload["runs"].items():
        sweep = run["sweep"]
        lengths = [r["length"] for r in sweep]
        line, = axes[0].plot(lengths, [r["peak_mb"] for r in sweep], marker="o", label=f"P={world} (max over ranks)")
        probes = run["probes"]
        if probes:
            axes[0].scatter([p["length"] for p in probes], [p["peak_mb"] for p in probes], marker="x",
                            color=line.get_color(), label=f"P={world} cap search")
        axes[0].axvline(run["longest"], color=line.get_color(), linestyle=":",
                        label=f"P={world} longest under cap: {run['longest']:,}")
        axes[1].plot(lengths, [r["tokens_per_s"] for r in sweep], marker="o", color=line.get_color(),
                     label=f"P={world} group")
        if int(world) > 1:
            axes[1].plot(lengths, [r["tokens_per_s_per_rank"] for r in sweep], marker="o", linestyle="--",
                         color=line.get_color(), label=f"P={world} per rank")
    axes[0].axhline(cap, color="gray", linestyle="--", label=f"cap {cap} MiB")
    axes[0].set_title("peak memory per rank, fwd+bwd (MiB)")
    loads = [payload["loadavg_start"][0], payload["loadavg_end"][0]]
    loads += [r["loadavg"][0] for run in payload["runs"].values() for r in run["sweep"]]
    axes[1].set_title(f"tokens/s (whole sequence), {payload['threads_total']} threads in all\n"
                      f"(shared machine: 1-min load average {min(loads):.1f}-{max(loads):.1f})", fontsize=10)
    formulas = payload["bytes_formulas_p2_curve"]
    xs = [r["seq_len"] for r in formulas]
    axes[2].plot(xs, [r["lasp2_state"] for r in formulas], marker="o", label="LASP-2 state (lightning layer)")
    axes[2].plot(xs, [r["kv_allgather"] for r in formulas], marker="o", label="K/V all-gather (softmax layer)")
    axes[2].plot(xs, [r["ulysses"] for r in formulas], marker="o", label="Ulysses all-to-all (softmax layer)")
    measured = [r for r in payload["bytes_check"]
                if r["phase"] == "forward" and r["part"] in ("lightning state", "softmax K/V")]
    axes[2].scatter([r["length"] for r in measured], [r["measured_per_layer"] for r in measured], marker="x",
                    color="black", zorder=3, label="measured in the run (P=2)")
    axes[2].set_yscale("log")
    axes[2].set_title("bytes one rank sends per layer, forward, P=2")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: short lengths, small cap (< 1 minute)")
    parser.add_argument("--on-paper", action="store_true", help="print the MiniMax-Text-01 table and the formulas only")
    parser.add_argument("--cap-mb", type=float, default=None, help="per-rank peak memory cap (MiB)")
    parser.add_argument("--granularity", type=int, default=None, help="length step of the cap bisection")
    parser.add_argument("--lengths", type=str, default=None, help="comma-separated sweep lengths")
    parser.add_argument("--max-length", type=int, default=1 << 17, help="longest length the cap search tries")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per length (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all, split evenly over the ranks")
    parser.add_argument("--sizes", type=str, default="1,2", help="group sizes P to run")
    parser.add_argument("--paper-seq-len", type=int, default=1 << 20)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    config = bench_config()
    dtype_bytes = 4  # the CPU runs are fp32
    formulas = formula_table(config, [4096, 32768, 262144, 1 << 20], [2, 4, 8], dtype_bytes)
    paper = on_paper(seq_len=args.paper_seq_len)
    if args.on_paper:
        print_formula_table(formulas, config, dtype_bytes)
        print_on_paper(paper)
        return None

    lengths = ([int(n) for n in args.lengths.split(",")] if args.lengths
               else [256, 512] if args.quick else [1024, 2048, 4096, 8192])
    cap = args.cap_mb or (52.0 if args.quick else 1536.0)
    granularity = args.granularity or (64 if args.quick else 512)
    sizes = [int(p) for p in args.sizes.split(",")]
    for p in sizes:
        if granularity % p or any(n % p for n in lengths):
            parser.error(f"lengths and --granularity must be divisible by P={p}")
    started = time.perf_counter()
    payload = {
        "device": "cpu", "dtype": "float32", "model": "tnl_model.testing.tiny_config scaled up (bench_config)",
        "config": config_summary(config), "batch": 1, "lengths": lengths, "cap_mb": cap, "granularity": granularity,
        "max_search_length": args.max_length, "repeats": args.repeats, "threads_total": args.threads,
        "threads_per_rank": {str(p): max(1, args.threads // p) for p in sizes},
        "threads_note": f"{args.threads} torch threads in all: each of the P ranks gets {args.threads} // P",
        "process_groups": "torch.multiprocessing.spawn, gloo on 127.0.0.1; P=1 runs the unsharded model "
                          "(no group) in one spawned process",
        "cpu_allocator": "timings: retain, memory: strict (tnl_model.cpu_allocator); one warm-up step before any "
                         "measurement (repeated measurements at one length agree to 0.01 MiB, so the cap-search "
                         "probes take none of their own)",
        "byte_convention": "bytes one rank sends, ring algorithm: all-gather (P-1) x local piece, all-reduce "
                           "2(P-1)/P x buffer, reduce-scatter (P-1)/P x input; counted from the tensors handed to torch.distributed (shims in the "
                           "worker processes), not gloo's wire traffic",
        "loadavg_start": os.getloadavg(), "source": source_state(), "runs": {},
    }
    for world in sizes:
        spec = make_spec(config, threads=max(1, args.threads // world), lengths=lengths, repeats=args.repeats,
                         cap_mb=cap, granularity=granularity, max_length=args.max_length)
        print(f"P={world}: {spec['threads']} thread(s) per rank", flush=True)
        ranks = run_group(world, spec)
        run = {"sweep": [], "probes": ranks[0]["probes"], "longest": ranks[0]["longest"],
               "longest_limited_by_max_length": ranks[0]["longest_limited_by_max_length"],
               "saved_bytes_per_rank": {str(r): ranks[r]["saved_bytes"] for r in ranks},
               "loadavg": [ranks[0]["loadavg_start"], ranks[0]["loadavg_end"]]}
        for i, row in enumerate(ranks[0]["sweep"]):
            step_s = max(ranks[r]["sweep"][i]["step_s"] for r in ranks)
            cpu_s = sum(ranks[r]["sweep"][i]["cpu_s"] for r in ranks)
            run["sweep"].append({"length": row["length"], "peak_mb": row["peak_mb"],
                                 "peak_mb_per_rank": row["peak_mb_per_rank"], "step_s": step_s,
                                 "cpu_s_all_ranks": cpu_s, "tokens_per_cpu_s": row["length"] / cpu_s,
                                 "tokens_per_s": row["length"] / step_s,
                                 "tokens_per_s_per_rank": row["length"] / world / step_s,
                                 "comm_rank0": row["comm"], "loadavg": row["loadavg"]})
        payload["runs"][str(world)] = run
        payload[f"_ranks_{world}"] = ranks  # for bytes_check; removed below

    # ---- bytes: formulas and the run
    payload["bytes_formulas"] = formulas
    curve_lengths = sorted(set(lengths) | {r["seq_len"] for r in formulas})
    payload["bytes_formulas_p2_curve"] = formula_table(config, curve_lengths, [2], dtype_bytes)
    payload["bytes_check"] = []
    for world in sizes:
        if world > 1:
            for r in bytes_check(config, payload[f"_ranks_{world}"], dtype_bytes):
                payload["bytes_check"].append({"P": world, **r})
    for world in sizes:
        payload.pop(f"_ranks_{world}")

    # ---- activation model vs saved-tensor hooks (P=1, rank 0)
    checks = {}
    for world in sizes:
        for rank, saved in payload["runs"][str(world)]["saved_bytes_per_rank"].items():
            local = saved["length"] // world
            model_bytes = saved_bytes_model(config, dtype_bytes, world, int(rank), local)
            checks[f"P={world} rank {rank}"] = {
                part: {"measured_per_token": saved["by_part"].get(part, 0) / local,
                       "model_per_token": model_bytes[part]}
                for part in model_bytes}
    payload["activation_model_check"] = checks

    # ---- targets
    common = [n for n in lengths if all(any(r["length"] == n for r in payload["runs"][str(p)]["sweep"]) for p in sizes)]
    targets = {}
    if 1 in sizes and 2 in sizes and common:
        longest_common = max(common)
        p1 = next(r for r in payload["runs"]["1"]["sweep"] if r["length"] == longest_common)
        p2 = next(r for r in payload["runs"]["2"]["sweep"] if r["length"] == longest_common)
        mem_ratio = p2["peak_mb"] / p1["peak_mb"]
        l1, l2 = payload["runs"]["1"]["longest"], payload["runs"]["2"]["longest"]
        len_ratio = l2 / l1 if l1 else float("inf")
        targets = {
            "memory": {"length": longest_common, "peak_mb_p1": p1["peak_mb"], "peak_mb_p2_max_rank": p2["peak_mb"],
                       "peak_mb_p2_per_rank": p2["peak_mb_per_rank"], "ratio": mem_ratio, "target": 0.6,
                       "pass": mem_ratio <= 0.6},
            "longest": {"cap_mb": cap, "longest_p1": l1, "longest_p2": l2, "ratio": len_ratio, "target": 1.8,
                        "pass": len_ratio >= 1.8,
                        "lower_bound": payload["runs"]["2"]["longest_limited_by_max_length"]},
            "bytes_match_formulas": all(r["match"] for r in payload["bytes_check"] if r["match"] is not None),
        }
        targets["memory"]["saved_by_part_model"] = saved_comparison(config, longest_common, 2)
        targets["longest"]["saved_by_part_model_at_p2_longest"] = saved_comparison(config, l2, 2) if l2 else []
    payload["targets"] = targets
    payload["on_paper"] = paper
    payload["loadavg_end"] = os.getloadavg()
    payload["wall_s"] = time.perf_counter() - started

    # ---- tables
    for world in sizes:
        run = payload["runs"][str(world)]
        print_table(f"P={world} ({payload['threads_per_rank'][str(world)]} thread(s) per rank), batch 1, fwd+bwd",
                    ["length", "peak MiB/rank (max)", "per rank", "step s", "tok/s group", "tok/s per rank",
                     "CPU s (all ranks)", "tok per CPU s", "load avg 1 min"],
                    [[r["length"], r["peak_mb"], "/".join(f"{p:.0f}" for p in r["peak_mb_per_rank"]), r["step_s"],
                      round(r["tokens_per_s"]), round(r["tokens_per_s_per_rank"]), r["cpu_s_all_ranks"],
                      round(r["tokens_per_cpu_s"]), r["loadavg"][0]] for r in run["sweep"]])
    print_table(f"Longest trainable length under {cap:.0f} MiB per rank (bisection to {granularity} tokens)",
                ["P", "longest", "probes (length: peak MiB)"],
                [[p, payload["runs"][str(p)]["longest"], ", ".join(f"{q['length']}: {q['peak_mb']:.0f}"
                                                                    for q in payload["runs"][str(p)]["probes"])]
                 for p in sizes])
    print_formula_table(formulas, config, dtype_bytes)
    if payload["bytes_check"]:
        print_table("Bytes sent per layer in the run (rank 0, one step) vs expected (forward: the formula; backward: "
                    "reduce-scatter of the gathered gradient = forward)",
                    ["P", "length", "phase", "part", "calls", "measured B", "expected B", "match"],
                    [[r["P"], r["length"], r["phase"], r["part"], r["calls"], round(r["measured_per_layer"]),
                      "-" if r["expected_per_layer"] is None else round(r["expected_per_layer"]),
                      "-" if r["match"] is None else ("yes" if r["match"] else "NO")] for r in payload["bytes_check"]])
    rows = []
    for name, parts in checks.items():
        for part, v in parts.items():
            if v["measured_per_token"] or v["model_per_token"]:
                rows.append([name, part, round(v["measured_per_token"]), round(v["model_per_token"])])
    print_table("Saved for the backward, bytes per local token (saved-tensor hooks vs saved_bytes_per_token)",
                ["run", "part", "measured", "model"], rows)
    print_on_paper(paper)
    if targets:
        m, lo = targets["memory"], targets["longest"]
        for rows, length in ((m["saved_by_part_model"], m["length"]),
                             (lo["saved_by_part_model_at_p2_longest"], lo["longest_p2"])):
            if rows:
                print_table(f"What shards: saved for the backward at {length:,} tokens, MiB (activation model, checked "
                            "above against hooks): unsharded vs the last of P=2 ranks",
                            ["part", "P=1", "P=2 last rank", "ratio"],
                            [[r["part"], r["p1_mib"], r["sharded_mib"],
                              r["sharded_mib"] / r["p1_mib"] if r["p1_mib"] else "-"] for r in rows])
        print(f"\n[{'PASS' if m['pass'] else 'MISS'}] per-rank peak at P=2 / P=1 at {m['length']} tokens: "
              f"{m['peak_mb_p2_max_rank']:.0f} / {m['peak_mb_p1']:.0f} MiB = {m['ratio']:.3f} (target <= 0.6)")
        print(f"[{'PASS' if lo['pass'] else 'MISS'}] longest length under {cap:.0f} MiB: P=2 {lo['longest_p2']:,} / "
              f"P=1 {lo['longest_p1']:,} = {lo['ratio']:.2f}x (target >= 1.8)"
              f"{' (P=2: lower bound, search limit hit)' if lo['lower_bound'] else ''}")
        print(f"[{'PASS' if targets['bytes_match_formulas'] else 'MISS'}] bytes handed to torch.distributed match the "
              f"formulas (per layer, forward and backward)")
        for rows, length in ((m["saved_by_part_model"], m["length"]),
                             (lo["saved_by_part_model_at_p2_longest"], lo["longest_p2"])):
            excess = sorted(((r["sharded_mib"] - r["p1_mib"] / 2, r["part"]) for r in rows if r["part"] != "total"),
                            reverse=True)
            floor = 0.01 * rows[-1]["p1_mib"] / 2
            print(f"  at {length:,} tokens the last P=2 rank saves beyond half of P=1: "
                  + (", ".join(f"{part} {mib:+.1f} MiB" for mib, part in excess if mib >= floor)
                     or "nothing above 1% of that half"))
    print(f"load average: start {payload['loadavg_start']}, end {payload['loadavg_end']}; "
          f"wall {payload['wall_s']:.0f}s")
    tag = f"cpu_float32{'_quick' if args.quick else ''}"
    save_results(f"bench_sequence_parallel_{tag}", payload, args.out, plot)
    return payload


if __name__ == "__main__":
    main()

"""DeepSpeed ZeRO pretraining of a TNL model (DESIGN.md section 2).

Launch (one machine, N processes; on a CPU-only machine the processes use gloo)::

    deepspeed --num_gpus N --module tnl_training.pretrain --config configs/train/demo-cpu.yaml [key=value ...]
    deepspeed --hostfile hosts --module tnl_training.pretrain --config configs/train/zero3-multinode.yaml
    python -m tnl_training.pretrain --config configs/train/demo-cpu.yaml max_steps=50      # one process

Overrides use the run config's field names (``max_steps=N zero_stage=S output_dir=DIR
model_config=PATH seed=N optimizer.lr=1e-3``); ``--resume [TAG]`` continues from the latest
(or the given) checkpoint in ``output_dir/checkpoints``; by default (``resume=auto``) a run
directory that holds checkpoints is continued. A checkpoint saved on another world size is
converted to DeepSpeed's universal format and loaded from there.

This module is the entry point (:func:`main`, :func:`train`) and the set-up pieces of a run (DeepSpeed
config, model, learning-rate schedule, resume checks, evaluation, export helpers); the run itself, from
distributed set-up to the summary, is :class:`tnl_training.trainer.Trainer`.

The run directory ends with ``metrics.jsonl``, ``loss_curve.png``, ``checkpoints/`` and the
exported Hugging Face model in ``model/`` (config.json, model.safetensors, tokenizer files).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from tnl_model.cpu_allocator import configure_from_env
from tnl_training.checkpointing import CheckpointLoadError, CheckpointSaveError
from tnl_training.config import ConfigError, RunConfig, load_config
from tnl_training.data import TokenRows
from tnl_training.documents import pack_documents, unpack_rows
from tnl_training.nonfinite import NonFiniteLossError
from tnl_training import sequence_parallel
from tnl_training.prepare import PreflightError, Prepared
from tnl_training.runlock import RunLockError, acquire_run_lock
from tnl_training.safe_load import UnsafeCheckpointError
from tnl_training.sequence_parallel import SequenceParallel

_RUN_LOCK = None  # rank 0's lock on output_dir (tnl_training.runlock)

#: keys of the DeepSpeed JSON that come from the run config and must not be set there
INJECTED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler", "sequence_parallel_size")
INJECTED_ZERO_KEYS = ("stage", "offload_optimizer", "offload_param")


# ------------------------------------------------------------------------------ set-up
def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="tnl_training.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="run config YAML (configs/train/*.yaml)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="resume from the latest checkpoint (or the given tag / checkpoint directory)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of run config fields")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"resume={args.resume}")
    return args, overrides


def _is_cuda() -> bool:
    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Initialise torch.distributed through DeepSpeed (nccl on GPUs, gloo on CPU)."""
    if not _is_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # plain `python -m tnl_training.pretrain`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    backend = "nccl" if _is_cuda() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(minutes=int(os.environ.get("TNL_DIST_TIMEOUT_MIN", "30"))))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if _is_cuda():
        torch.cuda.set_device(local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")) or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    return deepspeed


def build_deepspeed_config(cfg: RunConfig, engine_json: str | os.PathLike, world_size: int) -> dict:
    """The engine JSON plus everything that comes from the run config (batch sizes, ZeRO stage, precision,
    clipping, offload). The JSON may not set those itself, so the two can never disagree."""
    with open(engine_json, encoding="utf-8") as f:
        ds = json.load(f)
    clash = [k for k in INJECTED_KEYS if k in ds]
    zero = ds.setdefault("zero_optimization", {})
    clash += [f"zero_optimization.{k}" for k in INJECTED_ZERO_KEYS if k in zero]
    if clash:
        raise ConfigError(f"{engine_json} sets {', '.join(clash)}; these come from the run config "
                          "(micro_batch_size, gradient_accumulation_steps, grad_clip, bf16, zero_stage, cpu_offload, "
                          "sequence_parallel_size, "
                          "optimizer.*) -- remove them from the DeepSpeed JSON")
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    if cfg.sequence_parallel_size > 1:
        # read by DeepSpeedConfig wherever it is parsed without the mpu (transformers' ZeRO-3 model
        # construction): its batch arithmetic then counts data-parallel replicas, not processes
        ds["sequence_parallel_size"] = cfg.sequence_parallel_size
        if cfg.zero_stage == 3:
            # ZeRO-3's reduce-scatter averages gradients over every rank, sequence shards included
            # (DeepSpeed 0.19: reduce_scatter_coalesced divides by the whole group), where each shard's
            # gradient is a share to be summed; its all-reduce path divides by the data-parallel
            # replicas only, as ZeRO-1/2 do. So the shards' gradients add up, and the step equals the
            # unsharded one (tests/training/test_sequence_parallel_training.py). This overrides the
            # engine JSON's reduce_scatter for this case only (ZeRO-1/2 keep it: they scale correctly).
            zero["reduce_scatter"] = False
    ds["train_batch_size"] = cfg.world_batch(world_size)
    ds["gradient_clipping"] = cfg.grad_clip
    ds["bf16"] = {"enabled": bool(cfg.bf16), "check_grad_overflow": True}
    zero["stage"] = cfg.zero_stage
    if cfg.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": _is_cuda()}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": _is_cuda()}
        opt = cfg.optimizer
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": opt.lr, "betas": [opt.beta1, opt.beta2],
                                                       "eps": opt.eps, "weight_decay": opt.weight_decay}}
    ds.setdefault("steps_per_print", 1 << 30)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def build_lr_scheduler(cfg: RunConfig, optimizer, total_steps: int):
    """The run's learning-rate schedule: one of transformers' ``LambdaLR`` schedules, stepped once per
    optimizer step. Warmup rises linearly from 0 (cosine, constant) or from ``min_lr_ratio`` (WSD) to the
    peak; see :class:`tnl_training.config.OptimizerConfig`."""
    import transformers

    opt = cfg.optimizer
    if opt.schedule == "cosine":
        return transformers.get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=opt.warmup_steps, num_training_steps=total_steps, min_lr_rate=opt.min_lr_ratio)
    if opt.schedule == "wsd":
        # warmup, flat, then a linear decay over the last decay_fraction of the steps (the flat part is what is left)
        decay_steps = max(1, round(opt.decay_fraction * total_steps))
        return transformers.get_wsd_schedule(
            optimizer, num_warmup_steps=opt.warmup_steps, num_decay_steps=decay_steps, num_training_steps=total_steps,
            warmup_type="linear", decay_type="linear", min_lr_ratio=opt.min_lr_ratio)
    if opt.schedule == "constant":
        return transformers.get_constant_schedule_with_warmup(optimizer, num_warmup_steps=opt.warmup_steps)
    raise ConfigError(f"optimizer.schedule must be 'cosine', 'wsd' or 'constant', got {opt.schedule!r}")


def lr_lambda(cfg: RunConfig, total_steps: int):
    """Multiplier of the peak lr after ``step`` completed optimizer steps: the very function
    :func:`build_lr_scheduler` gives the engine's scheduler (built here on a throwaway optimizer)."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return build_lr_scheduler(cfg, probe, total_steps).lr_lambdas[0]


def param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "norm" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_model_config(cfg: RunConfig, prepared: Prepared):
    from tnl_model import TNLConfig

    model_cfg = TNLConfig.from_json_file(str(prepared.model_config_path))
    if cfg.router_aux_loss_coef is not None:
        model_cfg.router_aux_loss_coef = cfg.router_aux_loss_coef
    if cfg.router_z_loss_coef is not None:
        model_cfg.router_z_loss_coef = cfg.router_z_loss_coef
    model_cfg.use_cache = False
    return model_cfg


def build_model(cfg: RunConfig, model_cfg, ds_config: dict):
    """The model, every parameter initialised by ``_init_weights``.

    ZeRO-3 with ``zero3_init``: transformers' ZeRO-3 path (``HfDeepSpeedConfig`` alive while
    ``from_config`` runs) partitions each parameter as it is created and then runs
    ``_init_weights`` on gathered parameters (rank 0 initialises, the result is scattered),
    so no rank holds the whole model and nothing is left uninitialised. Otherwise the whole
    model is built on every rank from the same seed and rank 0's weights are broadcast.
    """
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    if cfg.zero_stage == 3 and cfg.zero3_init:
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        keep_alive = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must live while the model is built
        try:
            model = AutoModelForCausalLM.from_config(model_cfg)
        finally:
            del keep_alive
            unset_hf_deepspeed_config()  # later from_pretrained calls (export check) must not partition
    else:
        model = AutoModelForCausalLM.from_config(model_cfg)
        if dist.is_initialized() and dist.get_world_size() > 1:
            with torch.no_grad():
                for tensor in list(model.parameters()) + list(model.buffers()):
                    dist.broadcast(tensor.data, src=0)
    if cfg.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


# ------------------------------------------------------------------------------ training pieces
class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signum = None
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signum = signum

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def expert_counts(router_logits, top_k: int, num_experts: int) -> torch.Tensor:
    """[n_moe_layers, E] number of token-slots routed to each expert in this forward."""
    rows = []
    for logits in router_logits or ():
        if logits is None:
            continue
        idx = torch.topk(logits.detach().float(), top_k, dim=-1).indices.reshape(-1)
        rows.append(torch.bincount(idx, minlength=num_experts).double())
    return torch.stack(rows) if rows else torch.zeros(0, num_experts, dtype=torch.float64)


@torch.no_grad()
def evaluate(engine, val_rows: TokenRows | None, cfg: RunConfig, rank: int, world: int, device,
             bos_token_id: int | None = None, sp: SequenceParallel | None = None) -> float | None:
    """Mean validation cross-entropy over the first ``eval_batches * micro * replicas`` rows (all of them
    when fewer). Every rank runs the same number of forwards (ZeRO-3 gathers need all ranks).
    With ``bos_token_id`` each batch is packed by document, as training sees it; with sequence
    parallelism (``sp``) each rank scores its slice of its replica's rows."""
    import torch.distributed as dist
    import torch.nn.functional as F

    if val_rows is None:
        return None
    sp = sp or sequence_parallel.setup(1, rank, world)
    replica, replicas = sp.data_rank, sp.data_world
    micro = cfg.micro_batch_size
    n = min(val_rows.num_rows, cfg.eval_batches * micro * replicas)
    per_rank = math.ceil(n / replicas)
    batches = math.ceil(per_rank / micro)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = engine.module.training
    engine.eval()
    for b in range(batches):
        ids, valid = [], []
        for j in range(micro):
            i = (b * micro + j) * replicas + replica
            ids.append(val_rows.row(i if i < n else 0))
            valid.append(1.0 if i < n else 0.0)
        x = torch.from_numpy(np.stack(ids)).to(device)
        if bos_token_id is None:
            inputs = sequence_parallel.model_inputs(x, sp)
            targets = inputs.pop("shift_labels")
            inputs.pop("num_items_in_batch", None)
            logits = engine(**inputs, output_router_logits=False, use_cache=False).logits
        else:
            packed = pack_documents(x, bos_token_id)
            logits = unpack_rows(engine(input_ids=packed["input_ids"], cu_seqlens=packed["cu_seqlens"],
                                        output_router_logits=False, use_cache=False).logits, x.shape[0])[:, :-1]
            targets = x[:, 1:]
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        # this slice's share of each row's mean loss; the slices of a row add up to it over the group
        row_share = ce.view(x.shape[0], -1).sum(dim=1).double() / cfg.seq_len
        w = torch.tensor(valid, dtype=torch.float64, device=device)
        total[0] += (row_share * w).sum()
        total[1] += w.sum() if sp.rank == 0 else 0.0  # each row counted once
    dist.all_reduce(total)
    if was_training:
        engine.train()
    return float(total[0] / total[1])


#: run settings that fix the data order (TokenRows: windows of seq_len + 1 tokens, permuted by seed)
DATA_ORDER_SETTINGS = ("seed", "seq_len")
#: recorded in run_state.json and compared on resume (besides DATA_ORDER_SETTINGS and the batch):
#: field -> (what a change breaks, how to fix it)
RESUME_GUARDS = {
    "tokenizer_fingerprint": ("the tokenizer files differ from the ones the checkpoint was trained with, so token ids "
                              "would change meaning", "resume with the original tokenizer"),
    "data_fingerprint": ("the prepared shards (their index.json checksums) differ from the checkpoint's, so the data "
                         "cursor would point into other text", "resume with the original data and shard settings"),
    "model_config_hash": ("the model config differs from the one the checkpoint's weights belong to",
                          "resume with the original model_config"),
    "zero_stage": ("DeepSpeed's optimizer state is laid out per ZeRO stage", None),
    "bf16": ("the checkpoint's optimizer state was kept for the other precision", None),
}


def _sha256_json(value) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer_dir: Path) -> str:
    """sha256 over the names and bytes of the files in the tokenizer directory."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in Path(tokenizer_dir).iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def resume_guards(cfg: RunConfig, prepared: Prepared) -> dict:
    """The values of RESUME_GUARDS for this run (recorded in every checkpoint's run_state.json)."""
    return {"tokenizer_fingerprint": tokenizer_fingerprint(prepared.tokenizer_dir),
            "data_fingerprint": _sha256_json(prepared.index.get("splits")),
            "model_config_hash": _sha256_json(prepared.model_config),
            "zero_stage": cfg.zero_stage, "bf16": bool(cfg.bf16)}


def _resume_refused(what: str, checkpoint: Path, why: str, fix: str) -> ConfigError:
    return ConfigError(f"{what} of checkpoint {checkpoint}: {why}. To continue, {fix}; or start a new run "
                       "(resume=none or another output_dir)")


def check_resume_settings(cfg: RunConfig, run_state: dict, checkpoint: Path, guards: dict | None = None,
                          world_size: int | None = None, log=lambda m: None) -> None:
    """Refuse to resume with settings that change the data stream or the model: the data order
    (the data cursor would point into a different sequence of rows, repeating text already trained on
    and skipping other text), the tokenizer, the shards, the model config, the ZeRO stage, the
    precision and the global batch. A checkpoint that lacks a field (an older version) is not
    checked on it. A new world size is DeepSpeed's universal checkpoint's job and is not refused."""
    for name in DATA_ORDER_SETTINGS:
        old, new = run_state.get(name), getattr(cfg, name)
        if old is not None and old != new:
            raise ConfigError(f"{name}={new} differs from {name}={old} of checkpoint {checkpoint}: resuming would "
                              f"change the data order (text already trained on would be repeated, other text "
                              f"skipped). Resume with {name}={old}, or start a new run (resume=none or another "
                              f"output_dir)")
    for name, new in (guards or {}).items():
        old = run_state.get(name)
        if old is None or old == new:
            continue
        why, fix = RESUME_GUARDS[name]
        shown = (lambda v: json.dumps(v)) if name in ("zero_stage", "bf16") else (lambda v: str(v)[:16])
        if name in ("zero_stage", "bf16"):
            fix = f"resume with {name}={shown(old)}"
        raise _resume_refused(f"{name}={shown(new)} differs from {name}={shown(old)}", checkpoint, why, fix)
    old_micro, old_accum = run_state.get("micro_batch_size"), run_state.get("gradient_accumulation_steps")
    old_world, old_global = run_state.get("world_size"), run_state.get("global_batch")
    if world_size is not None and old_world not in (None, world_size) and run_state.get("zero_stage") == 0:
        raise _resume_refused(
            f"world size {world_size} differs from {old_world}", checkpoint,
            "a ZeRO-0 checkpoint has no partitioned optimizer state (*_optim_states.pt), which DeepSpeed's universal "
            "conversion needs to change the world size", f"resume on {old_world} processes")
    if world_size is None or old_world != world_size or old_global is None:
        return  # another world size: loaded from a universal checkpoint, and logged there
    new_global = cfg.world_batch(world_size)
    if new_global != old_global:
        was = (f" (micro_batch_size {old_micro} x gradient_accumulation_steps {old_accum} x world {old_world})"
               if old_micro is not None else "")
        raise _resume_refused(
            f"the global batch {new_global} (micro_batch_size {cfg.micro_batch_size} x gradient_accumulation_steps "
            f"{cfg.gradient_accumulation_steps} x {cfg.data_parallel_size(world_size)} data-parallel replicas) differs "
            f"from {old_global}{was}", checkpoint,
            f"the learning-rate schedule, the step count and the data cursor are in steps of {old_global} rows",
            f"keep micro_batch_size x gradient_accumulation_steps = "
            f"{old_global // cfg.data_parallel_size(world_size)}")
    if old_micro is not None and (old_micro, old_accum) != (cfg.micro_batch_size, cfg.gradient_accumulation_steps):
        log(f"resuming with micro_batch_size {cfg.micro_batch_size} x gradient_accumulation_steps "
            f"{cfg.gradient_accumulation_steps} (checkpoint: {old_micro} x {old_accum}); the global batch is still "
            f"{new_global} rows")


def finished_run(cfg: RunConfig, run_state: dict, checkpoint: Path, output_dir: Path, world: int, log) -> dict | None:
    """The summary of a run directory that is already complete (its checkpoint is at the last step and
    its export, when configured, exists), after saying so; None when there is training or exporting left.
    Nothing is rewritten: raising max_steps (or max_tokens) continues the run."""
    total = cfg.total_steps(world)
    if int(run_state["step"]) < total or (cfg.export and not (output_dir / "model" / "config.json").is_file()):
        return None
    try:
        summary = json.loads((output_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {"step": int(run_state["step"]), "tokens": int(run_state["tokens"])}
    log(f"{output_dir} is a complete run: checkpoint {checkpoint.name} is at step {run_state['step']} of {total}. "
        "Nothing to do; raise max_steps (or max_tokens) to train further, or use another output_dir for a new run")
    return {**summary, "complete": True}


# ------------------------------------------------------------------------------ the run
def lock_output_dir(cfg: RunConfig, is_main: bool, log) -> None:
    """One run per output directory: rank 0 takes the lock (kept for the run's life, released by
    :func:`main`) and every rank learns whether it got it, so all of them stop together if not."""
    import torch.distributed as dist

    global _RUN_LOCK
    lock_error = None
    if is_main:
        try:
            _RUN_LOCK = acquire_run_lock(cfg.output_dir, log)
        except (RunLockError, OSError) as e:
            lock_error = e if isinstance(e, RunLockError) else RunLockError(f"cannot lock {cfg.output_dir}: {e}")
    locked = torch.tensor([0 if lock_error is None else 1])
    dist.all_reduce(locked)
    if lock_error is not None:
        raise lock_error
    if int(locked):
        raise RunLockError(f"{cfg.output_dir} is in use by another run (see the first process's error)")


def train(cfg: RunConfig, config_file=None) -> dict:
    """Run (or continue) the configured pretraining; returns a summary dict (rank 0's view)."""
    from tnl_training.trainer import Trainer  # imported here: the trainer is built from this module's pieces

    trainer = Trainer(cfg, config_file)
    complete = trainer.build()
    if complete is not None:
        return complete
    trainer.fit()
    return trainer.finish()


def release_deepspeed_shm() -> None:
    """Remove this rank's shared-memory allreduce buffer, which DeepSpeed's CPU communication op creates
    in /dev/shm (66 MB a rank) and never unlinks: without this, every CPU run leaks it into RAM-backed
    tmpfs until the machine runs out of memory. The name is DeepSpeed's own (``shm.cpp``)."""
    rank, addr, port = os.environ.get("RANK"), os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if rank is None or addr is None or port is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")


def export_hints(export_dir: Path) -> str:
    """The commands that take the exported model elsewhere, or why a format cannot hold it."""
    from tnl_model import TNLConfig
    from tnl_model.gguf_export import llama_cpp_problems
    from tnl_model.minimax_format import config_to_minimax

    config = TNLConfig.from_pretrained(str(export_dir))
    lines = [f"run it: tnl generate {export_dir} --prompt \"...\""]
    try:
        config_to_minimax(config)
        lines.append(f"MiniMax format (transformers' MiniMaxForCausalLM): tnl convert to-minimax {export_dir} "
                     f"{export_dir}-minimax")
    except ValueError as err:
        lines.append(f"MiniMax format: not available ({err})")
    problems = llama_cpp_problems(config)
    lines.append(f"llama.cpp (GGUF): tnl convert to-gguf {export_dir} {export_dir}.gguf --outtype f16" if not problems
                 else "llama.cpp (GGUF): not available (" + "; ".join(problems) + ")")
    return "\n".join(lines)


def export_logits_diff(export_dir: Path, input_ids: torch.Tensor, engine_logits: torch.Tensor) -> float:
    import tnl_model  # noqa: F401 - registers the Auto classes
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float()
    return float((logits - engine_logits).abs().max())


def sample_text(export_dir: Path, prompt: str, max_new_tokens: int, seed: int) -> str:
    import tnl_model  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(export_dir))
    model = AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32).eval()
    torch.manual_seed(seed)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, top_k=40, temperature=0.8,
                             pad_token_id=tok.pad_token_id)
    return tok.decode(out[0], skip_special_tokens=True)


def main(argv=None) -> None:
    args, overrides = parse_args(argv)
    configure_from_env()  # CPU tensors reuse freed memory (no page faults per step); TNL_CPU_ALLOCATOR=off
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    try:
        summary = train(cfg, args.config)
    except (PreflightError, ConfigError, CheckpointLoadError, UnsafeCheckpointError, RunLockError) as err:
        raise SystemExit(f"error: {err}") from None
    except (CheckpointSaveError, NonFiniteLossError) as err:
        # the run cannot go on; the message says what is still safe on disk. A rank that failed
        # inside DeepSpeed's save may have left the others in a collective, so do not tear down
        # the process group: exit, and the launcher stops the other ranks.
        print(f"\nerror: {err}", file=sys.stderr, flush=True)
        exit_after_distributed_run(1)
        raise SystemExit(1) from None
    finally:
        if _RUN_LOCK is not None:
            _RUN_LOCK.release()
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        sequence_parallel.teardown()
        release_deepspeed_shm()
    if summary.get("interrupted"):
        sys.exit(0)


def exit_after_distributed_run(code: int = 0) -> None:
    """End a multi-process run without interpreter teardown.

    Everything is written and closed by now (checkpoints, export, metrics). On CPU, a
    native thread of the collective backends occasionally aborts the process during
    teardown ("terminate called without an active exception"), turning a finished
    run into a failed exit code for the launcher; skipping teardown avoids that.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main()
    exit_after_distributed_run()

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
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from tnl_model.cpu_allocator import configure_from_env
from tnl_training.checkpointing import (CHECKPOINTS, CheckpointLoadError, CheckpointSaveError,
                                        convert_to_universal, find_resume, read_run_state, remove_partial_saves,
                                        resume_rng_state, save_checkpoint)
from tnl_training.config import ConfigError, RunConfig, load_config
from tnl_training.data import TokenRows
from tnl_training.documents import pack_documents, unpack_rows
from tnl_training.nonfinite import NonFiniteGuard, NonFiniteLossError
from tnl_training.metrics import MetricsWriter, flops_per_token, peak_flops, plot_loss_curve
from tnl_training.prepare import PreflightError, Prepared, preflight
from tnl_training.runlock import RunLockError, acquire_run_lock
from tnl_training.safe_load import UnsafeCheckpointError, weights_only_loading

_RUN_LOCK = None  # rank 0's lock on output_dir (tnl_training.runlock)

#: keys of the DeepSpeed JSON that come from the run config and must not be set there
INJECTED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler")
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
                          "optimizer.*) -- remove them from the DeepSpeed JSON")
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
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


def lr_lambda(cfg: RunConfig, total_steps: int):
    """Multiplier of the peak lr after ``step`` completed optimizer steps."""
    opt = cfg.optimizer
    warmup, floor = opt.warmup_steps, opt.min_lr_ratio

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if opt.schedule == "constant":
            return 1.0
        if opt.schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_steps = max(1, round(opt.decay_fraction * total_steps))  # WSD
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * min(1.0, (step - decay_start) / decay_steps)

    return fn


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
             bos_token_id: int | None = None) -> float | None:
    """Mean validation cross-entropy over the first ``eval_batches * micro * world`` rows (all of them
    when fewer). Every rank runs the same number of forwards (ZeRO-3 gathers need all ranks).
    With ``bos_token_id`` each batch is packed by document, as training sees it."""
    import torch.distributed as dist
    import torch.nn.functional as F

    if val_rows is None:
        return None
    micro = cfg.micro_batch_size
    n = min(val_rows.num_rows, cfg.eval_batches * micro * world)
    per_rank = math.ceil(n / world)
    batches = math.ceil(per_rank / micro)
    total = torch.zeros(2, dtype=torch.float64, device=device)
    was_training = engine.module.training
    engine.eval()
    for b in range(batches):
        ids, weights = [], []
        for j in range(micro):
            i = (b * micro + j) * world + rank
            ids.append(val_rows.row(i if i < n else 0))
            weights.append(1.0 if i < n else 0.0)
        x = torch.from_numpy(np.stack(ids)).to(device)
        if bos_token_id is None:
            logits = engine(input_ids=x, output_router_logits=False, use_cache=False).logits
        else:
            packed = pack_documents(x, bos_token_id)
            logits = unpack_rows(engine(input_ids=packed["input_ids"], cu_seqlens=packed["cu_seqlens"],
                                        output_router_logits=False, use_cache=False).logits, x.shape[0])
        logits = logits[:, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="none")
        row_loss = ce.view(x.shape[0], -1).mean(dim=1).double()
        w = torch.tensor(weights, dtype=torch.float64, device=device)
        total[0] += (row_loss * w).sum()
        total[1] += w.sum()
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
    if world_size is None or old_world != world_size or old_global is None:
        return  # another world size: loaded from a universal checkpoint, and logged there
    new_global = cfg.world_batch(world_size)
    if new_global != old_global:
        was = (f" (micro_batch_size {old_micro} x gradient_accumulation_steps {old_accum} x world {old_world})"
               if old_micro is not None else "")
        raise _resume_refused(
            f"the global batch {new_global} (micro_batch_size {cfg.micro_batch_size} x gradient_accumulation_steps "
            f"{cfg.gradient_accumulation_steps} x world {world_size}) differs from {old_global}{was}", checkpoint,
            f"the learning-rate schedule, the step count and the data cursor are in steps of {old_global} rows",
            f"keep micro_batch_size x gradient_accumulation_steps = {old_global // max(1, world_size)}")
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


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _fmt_load(load: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in load)


# ------------------------------------------------------------------------------ main loop
def train(cfg: RunConfig, config_file=None) -> dict:
    """Run (or continue) the configured pretraining; returns a summary dict (rank 0's view)."""
    deepspeed = init_distributed()
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0

    def log(msg):
        if is_main:
            try:
                from tqdm import tqdm

                tqdm.write(str(msg), file=sys.stdout)
            except Exception:  # noqa: BLE001
                print(msg, flush=True)
            sys.stdout.flush()

    # One run per output directory: rank 0 holds the lock for the run's life (released in main).
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

    # Everything that can fail on bad input is checked here, before the model exists. The first
    # process of each machine prepares (download / tokenizer / shards); the others then verify.
    local_first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    prepared, err = None, None
    for turn in (0, 1):
        if (turn == 0) == local_first:
            try:
                prepared = preflight(cfg, config_file, log=log if is_main else (lambda m: None))
            except (PreflightError, ConfigError) as e:
                err = e
        failed = torch.tensor([0 if err is None else 1])
        dist.all_reduce(failed)
        if err is not None:
            raise err
        if int(failed):
            raise PreflightError("another process failed its pre-flight checks (see its error above)")

    output_dir = Path(cfg.output_dir)
    ckpt_dir = output_dir / CHECKPOINTS
    # rank 0 picks the checkpoint and verifies its files against the manifest (once, not per process)
    choice, choice_error = [None], None
    if is_main:
        try:
            found = find_resume(cfg.resume, ckpt_dir, log)
            choice = [None if found is None else str(found)]
        except (CheckpointLoadError, PreflightError) as e:
            choice_error, choice = e, ["\0failed"]
    dist.broadcast_object_list(choice, src=0)
    if choice_error is not None:
        raise choice_error
    if choice[0] == "\0failed":
        raise CheckpointLoadError("the first process could not choose a checkpoint to resume from (see its error)")
    resume_from = None if choice[0] is None else Path(choice[0])
    guards = resume_guards(cfg, prepared)
    resume_state = read_run_state(resume_from) if resume_from else None
    if resume_state is not None:
        check_resume_settings(cfg, resume_state, resume_from, guards, world, log)
        done = finished_run(cfg, resume_state, resume_from, output_dir, world, log)
        if done is not None:
            dist.barrier()
            return done
    rng_dir = resume_from  # the random states stay in the original tag directory
    universal = bool(resume_state and resume_state["world_size"] != world)
    if universal and is_main:
        resume_from = convert_to_universal(resume_from, log)
    dist.barrier()
    if universal:
        resume_from = resume_from.parent / f"{resume_from.name}_universal" if not resume_from.name.endswith(
            "_universal") else resume_from

    ds_config = build_deepspeed_config(cfg, prepared.deepspeed_config_path, world)
    if universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    model_cfg = load_model_config(cfg, prepared)
    total_steps = cfg.total_steps(world)
    device = torch.device("cuda", torch.cuda.current_device()) if _is_cuda() else torch.device("cpu")

    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_saves(ckpt_dir)  # left by a run killed while saving
        (output_dir / "run_config.yaml").write_text(_yaml_dump(cfg.to_dict()))
        (output_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=1))
        model_cfg.to_json_file(str(ckpt_dir / "model_config.json"))
        (ckpt_dir / "tokenizer_path.txt").write_text(str(prepared.tokenizer_dir.resolve()) + "\n")
    dist.barrier()

    model = build_model(cfg, model_cfg, ds_config)
    fpt = flops_per_token(model, cfg.seq_len + 1)
    n_params = sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in model.parameters())
    groups = param_groups(model, cfg.optimizer.weight_decay)
    opt = cfg.optimizer
    optimizer = None
    if not cfg.cpu_offload:
        optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                                      weight_decay=opt.weight_decay, foreach=True)
    schedule = lr_lambda(cfg, total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, model_parameters=groups if cfg.cpu_offload else None,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, schedule), config=ds_config,
        dist_init_required=False)
    if cfg.compile:
        engine.compile(backend=cfg.compile_backend)
        log(f"model compiled with torch.compile (backend {cfg.compile_backend}); the first steps include compilation")

    step, cursor, tokens, skipped_before = 0, 0, 0, 0
    if resume_from is not None:
        load_dir, tag = str(resume_from.parent), resume_from.name
        with weights_only_loading():  # DeepSpeed's checkpoint engine unpickles: no code from the files may run
            path, client = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"could not load checkpoint {resume_from}")
        state = (client or {}).get("tnl") or resume_state
        step, cursor, tokens = int(state["step"]), int(state["cursor"]), int(state["tokens"])
        skipped_before = int(state.get("skipped_steps", 0))
        log(f"resumed from {resume_from} at step {step} (data cursor {cursor:,} rows, {tokens:,} tokens)"
            + (f"; world size {resume_state['world_size']} -> {world} via universal checkpoint" if universal else ""))

    train_rows = TokenRows(prepared.train_shards, cfg.seq_len, cfg.seed, shuffle=True, name="train")
    val_rows = None
    if prepared.val_shards and sum(s.num_tokens for s in prepared.val_shards) > cfg.seq_len + 1:
        val_rows = TokenRows(prepared.val_shards, cfg.seq_len, cfg.seed, shuffle=False, name="validation")
    metrics = MetricsWriter(output_dir / "metrics.jsonl",
                            output_dir / "tensorboard" if cfg.tensorboard else None) if is_main else None
    peak = peak_flops(cfg.peak_tflops)
    # Documents are stored as BOS ... EOS: with document masking every BOS starts a segment.
    bos_token_id = int(prepared.index["bos_token_id"]) if cfg.document_masking else None
    top_k, n_exp = model_cfg.num_experts_per_tok, model_cfg.num_local_experts
    n_moe = sum(t == "sparse" for t in model_cfg.mlp_layer_types)
    global_batch = cfg.world_batch(world)
    tokens_per_step = global_batch * cfg.seq_len
    log(f"model {n_params / 1e6:.2f}M parameters ({fpt / 6e6:.2f}M active-equivalent per token); world {world} x "
        f"micro {cfg.micro_batch_size} x accum {cfg.gradient_accumulation_steps} = {global_batch} rows of "
        f"{cfg.seq_len + 1} tokens per step; ZeRO-{cfg.zero_stage}; {total_steps} steps; "
        + ("attention within documents; " if cfg.document_masking else "")
        + f"train {train_rows.num_tokens:,} tokens"
        + (f", validation {val_rows.num_tokens:,} tokens" if val_rows else ", no validation split"))

    if resume_from is not None:
        # last before the loop: building and loading above drew from the generators
        resume_rng_state(rng_dir, resume_state, rank, same_world=not universal, log=log)
    stop = StopSignal()
    bar = None
    if is_main:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True,
                   mininterval=1.0, file=sys.stderr)
    window = {"t": time.time(), "tokens": 0, "counts": torch.zeros(n_moe, n_exp, dtype=torch.float64)}
    guard = NonFiniteGuard(cfg.max_consecutive_nonfinite, cfg.zero_stage, rank, skipped_total=skipped_before)
    last_val = None
    interrupted = False
    summary = {}
    accum = cfg.gradient_accumulation_steps

    def state_dict():
        return {"step": step, "cursor": cursor, "tokens": tokens, "world_size": world,
                "global_batch": global_batch, "seed": cfg.seed, "seq_len": cfg.seq_len,
                "micro_batch_size": cfg.micro_batch_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                "skipped_steps": guard.skipped_total, **guards}

    try:
        while step < total_steps:
            lr = float(engine.get_lr()[0])  # the rate this step applies (the scheduler moves on inside it)
            sums = torch.zeros(4, dtype=torch.float64)
            for m in range(accum):
                x = torch.from_numpy(train_rows.batch(cursor, m, rank, world, cfg.micro_batch_size)).to(device)
                batch = pack_documents(x, bos_token_id) if cfg.document_masking else {"input_ids": x, "labels": x}
                out = engine(**batch, output_router_logits=True, use_cache=False)  # no KV-cache copies
                loss = guard.checked_loss(out.loss, step + 1)
                engine.backward(loss)
                if m == accum - 1:
                    poisoned = guard.agree_before_step(engine)
                engine.step()
                parts = [loss, out.lm_loss, out.aux_loss, out.z_loss]
                sums += torch.tensor([0.0 if p is None else float(p.detach()) for p in parts], dtype=torch.float64)
                counts = expert_counts(out.router_logits, top_k, n_exp)
                if counts.shape == window["counts"].shape:
                    window["counts"] += counts
            step += 1
            guard.after_step(engine, poisoned, step)
            cursor += global_batch
            tokens += tokens_per_step
            window["tokens"] += tokens_per_step
            # one small all-reduce per step: mean losses over ranks, and the stop flag
            flag = 1.0 if stop.signum is not None else 0.0
            packed = torch.cat([sums / accum, torch.tensor([flag], dtype=torch.float64)])
            dist.all_reduce(packed)
            loss, lm, aux, z = (packed[:4] / world).tolist()
            stop_now = packed[4].item() > 0
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            # a skipped step's losses are written as null (JSON has no NaN)
            record = {"type": "train", "step": step, "loss": _finite_or_none(loss), "lm_loss": _finite_or_none(lm),
                      "aux_loss": _finite_or_none(aux), "z_loss": _finite_or_none(z),
                      "grad_norm": _finite_or_none(grad_norm), "lr": lr, "tokens": tokens, "nonfinite": poisoned,
                      "skipped_steps": guard.skipped_total}
            if step % cfg.log_interval == 0 or step == total_steps:
                dist.all_reduce(window["counts"])
                elapsed = max(1e-9, time.time() - window["t"])
                tok_s = window["tokens"] * (cfg.seq_len + 1) / cfg.seq_len / elapsed
                mfu = (tok_s * fpt / (world * peak)) if peak else None
                c = window["counts"]
                load = (c.max(dim=1).values / c.mean(dim=1).clamp(min=1e-9)).tolist() if c.numel() else []
                record.update(tokens_per_s=tok_s, mfu=mfu, expert_load_max_over_mean=load)
                log(f"step {step}/{total_steps} | loss {loss:.4f} (lm {lm:.4f} aux {aux:.4f} z {z:.4f}) | "
                    f"grad {grad_norm:.3f} | lr {lr:.2e} | {tok_s:,.0f} tok/s | MFU "
                    f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | expert load max/mean [{_fmt_load(load)}] | "
                    f"skipped {guard.skipped_total}")
                window = {"t": time.time(), "tokens": 0, "counts": torch.zeros_like(window["counts"])}
            if metrics:
                metrics.write(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{lm:.3f}", refresh=False)
            if poisoned:
                log(f"step {step}: loss is not finite ({loss}); step skipped (parameters unchanged), "
                    f"{guard.consecutive} in a row, {guard.skipped_total} in all")
            if guard.should_stop:
                saved = save_checkpoint(engine, ckpt_dir, state_dict(), cfg.keep_checkpoints, rank, log)
                raise NonFiniteLossError(guard.stop_message(step, saved))
            if step % cfg.eval_interval == 0 or step == total_steps:
                last_val = evaluate(engine, val_rows, cfg, rank, world, device, bos_token_id)
                if last_val is not None:
                    ppl = math.exp(min(last_val, 50))
                    log(f"step {step}: validation loss {last_val:.4f}, perplexity {ppl:.2f}")
                    if metrics:
                        metrics.write({"type": "eval", "step": step, "val_loss": last_val, "val_ppl": ppl})
                window["t"] = time.time()  # do not charge evaluation to throughput
            if stop_now or step % cfg.checkpoint_interval == 0 or step == total_steps:
                save_checkpoint(engine, ckpt_dir, state_dict(), cfg.keep_checkpoints, rank, log)
                window["t"] = time.time()
            if stop_now:
                interrupted = True
                why = signal.Signals(stop.signum).name if stop.signum else "a stop signal on another process"
                log(f"{why}: checkpoint saved at step {step}; continue with --resume")
                break
    finally:
        stop.restore()
        if bar is not None:
            bar.close()

    if last_val is None and not interrupted and step >= total_steps and val_rows is not None:
        # resumed at the last step (an export still to do): no step ran, so evaluate here
        last_val = evaluate(engine, val_rows, cfg, rank, world, device, bos_token_id)
    summary.update(step=step, tokens=tokens, val_loss=last_val,
                   val_ppl=None if last_val is None else math.exp(min(last_val, 50)), interrupted=interrupted)
    if not interrupted and step >= total_steps and cfg.export:
        export_dir = output_dir / "model"
        # the export is checked against the engine on two held-out rows (every rank runs the forward: ZeRO-3)
        rows = val_rows if val_rows is not None else train_rows
        check_batch = torch.from_numpy(np.stack([rows.row(i) for i in range(2)]))[:, :64].to(device)
        with torch.no_grad():
            engine.eval()
            engine_logits = engine(input_ids=check_batch, output_router_logits=False).logits.float().cpu()
        if is_main:
            from tnl_training.export import export_checkpoint

            export_checkpoint(ckpt_dir, export_dir, tag=f"step{step}", tokenizer_dir=prepared.tokenizer_dir, log=log)
            summary["export_dir"] = str(export_dir)
            diff = export_logits_diff(export_dir, check_batch.cpu(), engine_logits)
            summary["export_max_abs_logit_diff"] = diff
            log(f"export check: AutoModelForCausalLM logits vs the engine's, max |diff| = {diff:.2e}"
                + (" (engine in bf16, export in fp32)" if cfg.bf16 else ""))
            metrics.write({"type": "export", "step": step, "dir": str(export_dir), "max_abs_logit_diff": diff})
            if cfg.sample_prompt:
                summary["sample"] = sample_text(export_dir, cfg.sample_prompt, cfg.sample_tokens, cfg.seed)
                log(f"sample continuation:\n{summary['sample']}")
            log(export_hints(export_dir))
        dist.barrier()
    if is_main:
        png = plot_loss_curve(output_dir / "metrics.jsonl", output_dir / "loss_curve.png",
                              title=f"{Path(cfg.model_config).stem}, ZeRO-{cfg.zero_stage}, {world} processes")
        if png:
            log(f"loss curve: {png}")
        if summary.get("val_ppl") is not None:
            log(f"final validation perplexity {summary['val_ppl']:.2f} (loss {summary['val_loss']:.4f})")
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        metrics.close()
    dist.barrier()
    return summary


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


def _yaml_dump(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


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

"""The pretraining run of :func:`tnl_training.pretrain.train`, in the order it happens.

:class:`Trainer` holds the run's state as attributes, so each stage is one method that reads them::

    trainer = Trainer(cfg, config_file)
    trainer.build()        # distributed set-up, run lock, preflight, resume choice, engine, data, metrics
    trainer.fit()          # train_step -> log -> evaluate -> checkpoint -> stop signal, until the last step
    trainer.finish()       # final evaluation, export and its check, sample, loss curve, summary.json

A step is :meth:`Trainer.train_step` (gradient-accumulation micro-steps over :meth:`Trainer.next_batch`,
the non-finite guard, one all-reduce) and returns a :class:`StepStats`. The model inputs of a micro-batch
come from :meth:`Trainer.next_batch` alone, so that a change of what a rank feeds the model (packing,
sequence sharding) is made in one place. The set-up pieces (DeepSpeed config, model, schedule, resume
checks, evaluation, export helpers) live in :mod:`tnl_training.pretrain`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from tnl_training import pretrain, sequence_parallel
from tnl_training.checkpointing import (CHECKPOINTS, CheckpointLoadError, convert_to_universal, find_resume,
                                        read_run_state, remove_partial_saves, resume_rng_state, save_checkpoint)
from tnl_training.config import ConfigError, RunConfig
from tnl_training.data import TokenRows
from tnl_training.documents import pack_documents
from tnl_training.metrics import MetricsWriter, flops_per_token, peak_flops, plot_loss_curve
from tnl_training.nonfinite import NonFiniteGuard, NonFiniteLossError
from tnl_training.prepare import PreflightError, preflight
from tnl_training.safe_load import weights_only_loading


@dataclass
class StepStats:
    """One optimizer step as every rank agrees on it (losses are means over micro-batches and ranks)."""

    step: int  # the step just completed (1-based)
    loss: float
    lm_loss: float
    aux_loss: float
    z_loss: float
    grad_norm: float  # nan when DeepSpeed has none (a skipped step)
    lr: float  # the rate this step applied
    nonfinite: bool  # the loss was NaN/inf on some rank: the step was skipped, parameters unchanged
    stop_requested: bool  # some rank got SIGTERM/SIGINT
    expert_counts: torch.Tensor  # [n_moe_layers, E] token-slots routed on this rank in this step


class ThroughputWindow:
    """Tokens and expert routing since the last log line, and when that window opened."""

    def __init__(self, n_moe_layers: int, num_experts: int):
        self.counts = torch.zeros(n_moe_layers, num_experts, dtype=torch.float64)
        self.reset()

    def reset(self) -> None:
        self.started = time.time()
        self.tokens = 0
        self.counts.zero_()

    def restart_clock(self) -> None:
        """Evaluation and checkpoint saves are not charged to throughput."""
        self.started = time.time()


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN


def _fmt_load(load: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in load)


class Trainer:
    """One pretraining run (or its continuation) of a :class:`RunConfig`."""

    def __init__(self, cfg: RunConfig, config_file=None):
        self.cfg = cfg
        self.config_file = config_file
        self.output_dir = Path(cfg.output_dir)
        self.ckpt_dir = self.output_dir / CHECKPOINTS
        # progress, all in run_state.json of every checkpoint
        self.step = self.cursor = self.tokens = 0
        self.last_val: float | None = None
        self.interrupted = False
        self.stop: pretrain.StopSignal | None = None
        self.is_main = False

    # -------------------------------------------------------------------------- set-up
    def log(self, msg) -> None:
        """Rank 0 prints (above the progress bar); the other ranks stay quiet."""
        if not self.is_main:
            return
        try:
            from tqdm import tqdm

            tqdm.write(str(msg), file=sys.stdout)
        except Exception:  # noqa: BLE001
            print(msg, flush=True)
        sys.stdout.flush()

    def build(self) -> dict | None:
        """Everything before the first step. Returns the summary of a run that is already complete (then
        there is nothing to train, and nothing else is built), else None."""
        self.deepspeed = pretrain.init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        # the data x sequence grid, through DeepSpeed's groups (every rank takes part in making them)
        self.sp = sequence_parallel.setup(self.cfg.sequence_parallel_size, self.rank, self.world)
        pretrain.lock_output_dir(self.cfg, self.is_main, self.log)
        self.prepared = self._preflight_all_ranks()
        self.guards = pretrain.resume_guards(self.cfg, self.prepared)
        complete = self._choose_resume()
        if complete is not None:
            return complete
        self.total_steps = self.cfg.total_steps(self.world)
        self.device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                       else torch.device("cpu"))
        self.ds_config = pretrain.build_deepspeed_config(self.cfg, self.prepared.deepspeed_config_path, self.world)
        if self.universal:
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        self.model_cfg = pretrain.load_model_config(self.cfg, self.prepared)
        self._write_run_dir()
        self._build_engine()
        skipped_before = self._load_checkpoint() if self.resume_from is not None else 0
        self.guard = NonFiniteGuard(self.cfg.max_consecutive_nonfinite, self.cfg.zero_stage, self.rank,
                                    skipped_total=skipped_before)
        self._open_data()
        if self.resume_from is not None:
            # last before the loop: building and loading above drew from the generators
            resume_rng_state(self.rng_dir, self.resume_state, self.rank, same_world=not self.universal, log=self.log)
        return None

    def _preflight_all_ranks(self):
        """Everything that can fail on bad input is checked here, before the model exists. The first
        process of each machine prepares (download / tokenizer / shards); the others then verify."""
        local_first = int(os.environ.get("LOCAL_RANK", "0")) == 0
        prepared, err = None, None
        for turn in (0, 1):
            if (turn == 0) == local_first:
                try:
                    prepared = preflight(self.cfg, self.config_file, log=self.log)
                except (PreflightError, ConfigError) as e:
                    err = e
            failed = torch.tensor([0 if err is None else 1])
            dist.all_reduce(failed)
            if err is not None:
                raise err
            if int(failed):
                raise PreflightError("another process failed its pre-flight checks (see its error above)")
        return prepared

    def _choose_resume(self) -> dict | None:
        """Sets ``resume_from`` (None: a new run), ``resume_state``, ``rng_dir`` and ``universal``; returns
        the summary of an already complete run."""
        # rank 0 picks the checkpoint and verifies its files against the manifest (once, not per process)
        choice, choice_error = [None], None
        if self.is_main:
            try:
                found = find_resume(self.cfg.resume, self.ckpt_dir, self.log)
                choice = [None if found is None else str(found)]
            except (CheckpointLoadError, PreflightError) as e:
                choice_error, choice = e, ["\0failed"]
        dist.broadcast_object_list(choice, src=0)
        if choice_error is not None:
            raise choice_error
        if choice[0] == "\0failed":
            raise CheckpointLoadError("the first process could not choose a checkpoint to resume from (see its error)")
        resume_from = None if choice[0] is None else Path(choice[0])
        self.resume_state = read_run_state(resume_from) if resume_from else None
        if self.resume_state is not None:
            pretrain.check_resume_settings(self.cfg, self.resume_state, resume_from, self.guards, self.world, self.log)
            complete = pretrain.finished_run(self.cfg, self.resume_state, resume_from, self.output_dir, self.world,
                                             self.log)
            if complete is not None:
                dist.barrier()
                return complete
        self.rng_dir = resume_from  # the random states stay in the original tag directory
        # a checkpoint of another world size is loaded from DeepSpeed's universal format
        self.universal = bool(self.resume_state and self.resume_state["world_size"] != self.world)
        if self.universal and self.is_main:
            resume_from = convert_to_universal(resume_from, self.log)
        dist.barrier()
        if self.universal and not resume_from.name.endswith("_universal"):  # where rank 0 converted it to
            resume_from = resume_from.parent / f"{resume_from.name}_universal"
        self.resume_from = resume_from
        return None

    def _write_run_dir(self) -> None:
        """The run's settings next to its checkpoints (rank 0), before any rank builds the model."""
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_saves(self.ckpt_dir)  # left by a run killed while saving
            (self.output_dir / "run_config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            (self.output_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=1))
            self.model_cfg.to_json_file(str(self.ckpt_dir / "model_config.json"))
            (self.ckpt_dir / "tokenizer_path.txt").write_text(str(self.prepared.tokenizer_dir.resolve()) + "\n")
        dist.barrier()

    def _build_engine(self) -> None:
        cfg, opt = self.cfg, self.cfg.optimizer
        model = pretrain.build_model(cfg, self.model_cfg, self.ds_config)
        self.flops_per_token = flops_per_token(model, cfg.seq_len + 1)
        self.n_params = sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in model.parameters())
        groups = pretrain.param_groups(model, opt.weight_decay)
        optimizer = None  # with cpu_offload DeepSpeed builds its own (CPU) AdamW from the JSON
        if not cfg.cpu_offload:
            optimizer = torch.optim.AdamW(groups, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps,
                                          weight_decay=opt.weight_decay, foreach=True)
        total_steps = self.total_steps
        self.engine, _, _, self.scheduler = self.deepspeed.initialize(
            model=model, optimizer=optimizer, model_parameters=groups if cfg.cpu_offload else None,
            lr_scheduler=lambda o: pretrain.build_lr_scheduler(cfg, o, total_steps), config=self.ds_config,
            dist_init_required=False, mpu=self.sp.mpu)
        if cfg.compile:
            self.engine.compile(backend=cfg.compile_backend)
            self.log(f"model compiled with torch.compile (backend {cfg.compile_backend}); the first steps include "
                     "compilation")

    def _load_checkpoint(self) -> int:
        """Loads ``resume_from`` into the engine and the progress counters; returns the skipped-step count."""
        load_dir, tag = str(self.resume_from.parent), self.resume_from.name
        with weights_only_loading():  # DeepSpeed's checkpoint engine unpickles: no code from the files may run
            path, client = self.engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"could not load checkpoint {self.resume_from}")
        state = (client or {}).get("tnl") or self.resume_state
        self.step, self.cursor, self.tokens = int(state["step"]), int(state["cursor"]), int(state["tokens"])
        self.log(f"resumed from {self.resume_from} at step {self.step} (data cursor {self.cursor:,} rows, "
                 f"{self.tokens:,} tokens)" + (f"; world size {self.resume_state['world_size']} -> {self.world} via "
                                               "universal checkpoint" if self.universal else ""))
        return int(state.get("skipped_steps", 0))

    def _open_data(self) -> None:
        """Token rows, the metrics file, and the per-step constants the loop logs with."""
        cfg, prepared = self.cfg, self.prepared
        self.train_rows = TokenRows(prepared.train_shards, cfg.seq_len, cfg.seed, shuffle=True, name="train")
        self.val_rows = None
        if prepared.val_shards and sum(s.num_tokens for s in prepared.val_shards) > cfg.seq_len + 1:
            self.val_rows = TokenRows(prepared.val_shards, cfg.seq_len, cfg.seed, shuffle=False, name="validation")
        self.metrics = None  # rank 0 writes the metrics
        if self.is_main:
            self.metrics = MetricsWriter(self.output_dir / "metrics.jsonl",
                                         self.output_dir / "tensorboard" if cfg.tensorboard else None)
        self.peak_flops = peak_flops(cfg.peak_tflops)
        # Documents are stored as BOS ... EOS: with document masking every BOS starts a segment.
        self.bos_token_id = int(prepared.index["bos_token_id"]) if cfg.document_masking else None
        self.top_k, self.num_experts = self.model_cfg.num_experts_per_tok, self.model_cfg.num_local_experts
        self.n_moe_layers = sum(t == "sparse" for t in self.model_cfg.mlp_layer_types)
        self.global_batch = cfg.world_batch(self.world)
        self.tokens_per_step = self.global_batch * cfg.seq_len
        self.log(f"model {self.n_params / 1e6:.2f}M parameters ({self.flops_per_token / 6e6:.2f}M active-equivalent "
                 f"per token); {self.sp.data_world} replicas"
                 + (f" x {self.sp.size} sequence shards of {cfg.seq_len // self.sp.size} tokens" if self.sp.size > 1 else "")
                 + f" x micro {cfg.micro_batch_size} x accum "
                 f"{cfg.gradient_accumulation_steps} = {self.global_batch} rows of {cfg.seq_len + 1} tokens per step; "
                 f"ZeRO-{cfg.zero_stage}; {self.total_steps} steps; "
                 + ("attention within documents; " if cfg.document_masking else "")
                 + f"train {self.train_rows.num_tokens:,} tokens"
                 + (f", validation {self.val_rows.num_tokens:,} tokens" if self.val_rows else ", no validation split"))

    # -------------------------------------------------------------------------- one step
    def next_batch(self, micro_index: int) -> dict:
        """The model inputs of this rank's ``micro_index``-th micro-batch of the current step: its replica's
        rows (every rank of a sequence-parallel group reads the same ones), labels shifted before any
        sharding, and with sequence parallelism this rank's slice of them."""
        cfg, sp = self.cfg, self.sp
        rows = self.train_rows.batch(self.cursor, micro_index, sp.data_rank, sp.data_world, cfg.micro_batch_size)
        x = torch.from_numpy(rows).to(self.device)
        if cfg.document_masking:
            return pack_documents(x, self.bos_token_id)
        return sequence_parallel.model_inputs(x, sp)

    def train_step(self) -> StepStats:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches, then the progress
        counters move on. Every rank calls it; it ends in the step's one small all-reduce."""
        engine, guard, accum = self.engine, self.guard, self.cfg.gradient_accumulation_steps
        lr = float(engine.get_lr()[0])  # the rate this step applies (the scheduler moves on inside it)
        sums = torch.zeros(4, dtype=torch.float64)
        counts = torch.zeros(self.n_moe_layers, self.num_experts, dtype=torch.float64)
        for m in range(accum):
            out = engine(**self.next_batch(m), output_router_logits=True, use_cache=False)  # no KV-cache copies
            loss = guard.checked_loss(out.loss, self.step + 1)
            engine.backward(loss)
            if m == accum - 1:
                poisoned = guard.agree_before_step(engine)
            engine.step()  # DeepSpeed applies the optimizer at the accumulation boundary only
            parts = [loss, out.lm_loss, out.aux_loss, out.z_loss]
            sums += torch.tensor([0.0 if p is None else float(p.detach()) for p in parts], dtype=torch.float64)
            routed = pretrain.expert_counts(out.router_logits, self.top_k, self.num_experts)
            if routed.shape == counts.shape:
                counts += routed
        self.step += 1
        guard.after_step(engine, poisoned, self.step)
        self.cursor += self.global_batch
        self.tokens += self.tokens_per_step
        # one small all-reduce per step: mean losses over ranks, and the stop flag
        flag = 1.0 if self.stop is not None and self.stop.signum is not None else 0.0
        packed = torch.cat([sums / accum, torch.tensor([flag], dtype=torch.float64)])
        dist.all_reduce(packed)
        # each rank's losses are its share of its sequence's: add up the shards, average the replicas
        loss, lm, aux, z = (packed[:4] / self.sp.data_world).tolist()
        grad_norm = engine.get_global_grad_norm()
        return StepStats(step=self.step, loss=loss, lm_loss=lm, aux_loss=aux, z_loss=z,
                         grad_norm=float(grad_norm) if grad_norm is not None else float("nan"), lr=lr,
                         nonfinite=poisoned, stop_requested=packed[4].item() > 0, expert_counts=counts)

    # -------------------------------------------------------------------------- the loop
    def fit(self) -> None:
        """Steps until the last one, a stop signal, or too many non-finite losses in a row
        (:class:`NonFiniteLossError`, after saving the last good parameters)."""
        cfg = self.cfg
        self.stop = pretrain.StopSignal()
        bar = self._progress_bar()
        window = ThroughputWindow(self.n_moe_layers, self.num_experts)
        try:
            while self.step < self.total_steps:
                stats = self.train_step()
                window.tokens += self.tokens_per_step
                window.counts += stats.expert_counts
                self._record(stats, window)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats.lm_loss:.3f}", refresh=False)
                if stats.nonfinite:
                    self.log(f"step {self.step}: loss is not finite ({stats.loss}); step skipped (parameters "
                             f"unchanged), {self.guard.consecutive} in a row, {self.guard.skipped_total} in all")
                if self.guard.should_stop:
                    saved = self.save_checkpoint()
                    raise NonFiniteLossError(self.guard.stop_message(self.step, saved))
                if self._due(cfg.eval_interval):
                    self.run_evaluation()
                    window.restart_clock()
                if stats.stop_requested or self._due(cfg.checkpoint_interval):
                    self.save_checkpoint()
                    window.restart_clock()
                if stats.stop_requested:
                    self.interrupted = True
                    why = (signal.Signals(self.stop.signum).name if self.stop.signum
                           else "a stop signal on another process")
                    self.log(f"{why}: checkpoint saved at step {self.step}; continue with --resume")
                    break
        finally:
            self.stop.restore()
            if bar is not None:
                bar.close()

    def _due(self, interval: int) -> bool:
        return self.step % interval == 0 or self.step == self.total_steps

    def _progress_bar(self):
        if not self.is_main:
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="pretrain", unit="step", dynamic_ncols=True,
                    mininterval=1.0, file=sys.stderr)

    def _record(self, stats: StepStats, window: ThroughputWindow) -> None:
        """The step's metrics line; every ``log_interval`` steps also throughput, MFU and expert load (the
        expert counts are all-reduced then, on every rank) and a log line."""
        cfg = self.cfg
        record = {"type": "train", "step": stats.step, "loss": _finite_or_none(stats.loss),
                  "lm_loss": _finite_or_none(stats.lm_loss), "aux_loss": _finite_or_none(stats.aux_loss),
                  "z_loss": _finite_or_none(stats.z_loss), "grad_norm": _finite_or_none(stats.grad_norm),
                  "lr": stats.lr, "tokens": self.tokens, "nonfinite": stats.nonfinite,
                  "skipped_steps": self.guard.skipped_total}
        if self._due(cfg.log_interval):
            dist.all_reduce(window.counts)
            elapsed = max(1e-9, time.time() - window.started)
            tok_s = window.tokens * (cfg.seq_len + 1) / cfg.seq_len / elapsed
            mfu = (tok_s * self.flops_per_token / (self.world * self.peak_flops)) if self.peak_flops else None
            c = window.counts
            load = (c.max(dim=1).values / c.mean(dim=1).clamp(min=1e-9)).tolist() if c.numel() else []
            record.update(tokens_per_s=tok_s, mfu=mfu, expert_load_max_over_mean=load)
            self.log(f"step {stats.step}/{self.total_steps} | loss {stats.loss:.4f} (lm {stats.lm_loss:.4f} aux "
                     f"{stats.aux_loss:.4f} z {stats.z_loss:.4f}) | grad {stats.grad_norm:.3f} | lr {stats.lr:.2e} | "
                     f"{tok_s:,.0f} tok/s | MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | expert load "
                     f"max/mean [{_fmt_load(load)}] | skipped {self.guard.skipped_total}")
            window.reset()
        if self.metrics:
            self.metrics.write(record)

    def state_dict(self) -> dict:
        """The run state saved with every checkpoint (run_state.json) and checked on resume."""
        cfg = self.cfg
        return {"step": self.step, "cursor": self.cursor, "tokens": self.tokens, "world_size": self.world,
                "sequence_parallel_size": self.sp.size,
                "global_batch": self.global_batch, "seed": cfg.seed, "seq_len": cfg.seq_len,
                "micro_batch_size": cfg.micro_batch_size,
                "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
                "skipped_steps": self.guard.skipped_total, **self.guards}

    def save_checkpoint(self) -> Path:
        return save_checkpoint(self.engine, self.ckpt_dir, self.state_dict(), self.cfg.keep_checkpoints, self.rank,
                               self.log)

    def evaluate(self) -> float | None:
        """Mean validation loss (None without a validation split); every rank must call it."""
        return pretrain.evaluate(self.engine, self.val_rows, self.cfg, self.rank, self.world, self.device,
                                 self.bos_token_id, sp=self.sp)

    def run_evaluation(self) -> None:
        self.last_val = self.evaluate()
        if self.last_val is not None:
            ppl = math.exp(min(self.last_val, 50))
            self.log(f"step {self.step}: validation loss {self.last_val:.4f}, perplexity {ppl:.2f}")
            if self.metrics:
                self.metrics.write({"type": "eval", "step": self.step, "val_loss": self.last_val, "val_ppl": ppl})

    # -------------------------------------------------------------------------- the end
    def finish(self) -> dict:
        """Final evaluation, export (with its check and a sample), loss curve and summary.json; returns the
        summary (rank 0's view)."""
        complete = not self.interrupted and self.step >= self.total_steps
        if self.last_val is None and complete and self.val_rows is not None:
            # resumed at the last step (an export still to do): no step ran, so evaluate here
            self.last_val = self.evaluate()
        summary = {"step": self.step, "tokens": self.tokens, "val_loss": self.last_val,
                   "val_ppl": None if self.last_val is None else math.exp(min(self.last_val, 50)),
                   "interrupted": self.interrupted}
        if complete and self.cfg.export:
            summary.update(self._export())
            dist.barrier()
        if self.is_main:
            png = plot_loss_curve(self.output_dir / "metrics.jsonl", self.output_dir / "loss_curve.png",
                                  title=f"{Path(self.cfg.model_config).stem}, ZeRO-{self.cfg.zero_stage}, "
                                        f"{self.world} processes")
            if png:
                self.log(f"loss curve: {png}")
            if summary.get("val_ppl") is not None:
                self.log(f"final validation perplexity {summary['val_ppl']:.2f} (loss {summary['val_loss']:.4f})")
            (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
            self.metrics.close()
        dist.barrier()
        return summary

    def _export(self) -> dict:
        """The Hugging Face model dir (rank 0) and its check against the engine; the summary fields it adds."""
        export_dir = self.output_dir / "model"
        # the export is checked against the engine on two held-out rows (every rank runs the forward: ZeRO-3)
        rows = self.val_rows if self.val_rows is not None else self.train_rows
        check_batch = torch.from_numpy(np.stack([rows.row(i) for i in range(2)]))[:, :64].to(self.device)
        with torch.no_grad():
            self.engine.eval()
            engine_logits = self.engine(input_ids=check_batch, output_router_logits=False).logits.float().cpu()
        if not self.is_main:
            return {}
        from tnl_training.export import export_checkpoint

        cfg, added = self.cfg, {}
        export_checkpoint(self.ckpt_dir, export_dir, tag=f"step{self.step}", tokenizer_dir=self.prepared.tokenizer_dir,
                          log=self.log)
        added["export_dir"] = str(export_dir)
        diff = pretrain.export_logits_diff(export_dir, check_batch.cpu(), engine_logits)
        added["export_max_abs_logit_diff"] = diff
        self.log(f"export check: AutoModelForCausalLM logits vs the engine's, max |diff| = {diff:.2e}"
                 + (" (engine in bf16, export in fp32)" if cfg.bf16 else ""))
        self.metrics.write({"type": "export", "step": self.step, "dir": str(export_dir), "max_abs_logit_diff": diff})
        if cfg.sample_prompt:
            added["sample"] = pretrain.sample_text(export_dir, cfg.sample_prompt, cfg.sample_tokens, cfg.seed)
            self.log(f"sample continuation:\n{added['sample']}")
        self.log(pretrain.export_hints(export_dir))
        return added

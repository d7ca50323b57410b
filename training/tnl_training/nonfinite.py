"""Non-finite losses: the step is skipped (no parameter or optimizer-state change) and counted;
after ``max_consecutive_nonfinite`` of them in a row the run saves a checkpoint and stops.

How a step is skipped without stepping outside DeepSpeed's bookkeeping: every micro-batch still
runs its backward (all ranks must take part in the gradient reduction), but a non-finite loss is
turned into NaN before it, so every gradient is NaN. The ZeRO optimizers (stages 1-3) check the
reduced gradients and skip the whole step on every rank when they are not finite; with ZeRO
stage 0 the optimizer is the plain torch one, and a one-shot pre-hook on it drops the gradients
just before it steps (after DeepSpeed's gradient clipping, which needs them). The ranks agree on
"this step is poisoned" through one all-reduce, and after the step
:meth:`NonFiniteGuard.after_step` checks that the step really was not applied.

The learning-rate schedule follows the run's step counter on every stage: DeepSpeed does not
step the scheduler on a step it skipped, so :meth:`NonFiniteGuard.after_step` does.
"""

from __future__ import annotations

import os
import warnings

import torch

#: fault injection for tests: comma-separated optimizer steps (1-based) whose loss rank 0 makes NaN
INJECT_ENV = "TNL_INJECT_NONFINITE_LOSS_AT"


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; a checkpoint was saved before raising."""


def injected_steps() -> frozenset[int]:
    raw = os.environ.get(INJECT_ENV, "").strip()
    return frozenset(int(s) for s in raw.split(",") if s.strip()) if raw else frozenset()


class NonFiniteGuard:
    def __init__(self, max_consecutive: int, zero_stage: int, rank: int, skipped_total: int = 0):
        self.max_consecutive = max_consecutive
        self.zero_stage = zero_stage
        self.rank = rank
        self.skipped_total = skipped_total  # carried over a resume through the run state
        self.consecutive = 0
        self.first_bad_step = None
        self._inject = injected_steps() if rank == 0 else frozenset()
        self._local_bad = 0
        self._drop = None  # the pending gradient drop of a poisoned step (plain torch optimizer)

    def checked_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The loss to backpropagate (and log) for one micro-batch of optimizer step ``step`` (1-based)."""
        if step in self._inject:
            loss = loss * float("nan")
        if bool(torch.isfinite(loss.detach()).all()):
            return loss
        self._local_bad += 1
        # inf * nan is nan too: with a NaN upstream gradient every parameter gradient is NaN,
        # which is what makes DeepSpeed's overflow check skip the step
        return loss * float("nan")

    def agree_before_step(self, engine) -> bool:
        """Call after the last micro-batch's backward, before its ``engine.step()``: True when
        any rank saw a non-finite loss in this step (the step will be skipped)."""
        import torch.distributed as dist

        flag = torch.tensor([float(self._local_bad)])
        dist.all_reduce(flag)
        self._local_bad = 0
        poisoned = float(flag) > 0
        self._drop = None
        if poisoned and not _skips_nonfinite_steps(engine.optimizer):
            self._drop = _drop_gradients_at_next_step(engine.optimizer)
        return poisoned

    def after_step(self, engine, poisoned: bool, step: int) -> None:
        """Count the step and keep the lr schedule on the run's step; raise when a poisoned step was
        applied anyway (never silently)."""
        if not engine.was_step_applied():
            _step_scheduler(engine)  # DeepSpeed skipped the step, and with it the schedule
        if not poisoned:
            self.consecutive = 0
            self.first_bad_step = None
            return
        dropped = self._drop["done"] if self._drop is not None else not engine.was_step_applied()
        if not dropped:
            raise RuntimeError(
                f"step {step}: the loss was not finite but DeepSpeed applied the optimizer step; the parameters "
                "can no longer be trusted. Resume from the last checkpoint.")
        self.skipped_total += 1
        self.consecutive += 1
        if self.first_bad_step is None:
            self.first_bad_step = step

    @property
    def should_stop(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def stop_message(self, step: int, checkpoint) -> str:
        return (f"the loss was NaN/inf for {self.consecutive} steps in a row (steps {self.first_bad_step}-{step}; "
                f"max_consecutive_nonfinite={self.max_consecutive}); every one of them was skipped, so the "
                f"parameters are those of step {self.first_bad_step - 1}, saved as {checkpoint}. Lower "
                f"optimizer.lr, raise optimizer.warmup_steps or check the data around these steps, then continue "
                f"with --resume (the skipped batches are not repeated).")


def _skips_nonfinite_steps(optimizer) -> bool:
    """DeepSpeed's ZeRO / bf16 / fp16 optimizer wrappers check the gradients and skip a non-finite
    step themselves (reporting it through ``overflow``); a plain torch optimizer (ZeRO-0, fp32) does not."""
    return hasattr(optimizer, "overflow")


def _drop_gradients_at_next_step(optimizer) -> dict:
    """Make the optimizer's next ``step()`` a no-op by dropping every gradient right before it:
    torch optimizers leave parameters without a gradient untouched (no moment, step-count or
    weight-decay update). Dropping them earlier would break DeepSpeed's gradient clipping, which
    runs between the backward and the optimizer step and needs at least one gradient."""
    state = {"done": False}

    def drop(opt, args, kwargs):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = None
        state["done"] = True
        handle.remove()

    handle = optimizer.register_step_pre_hook(drop)
    return state


def _step_scheduler(engine) -> None:
    if engine.lr_scheduler is None:
        return
    with warnings.catch_warnings():
        # torch warns when the scheduler steps before the optimizer ever did (a skipped first step)
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        engine.lr_scheduler.step()

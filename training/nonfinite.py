"""Non-finite losses: the step is skipped (no parameter or optimizer-state change) and counted;
after ``max_consecutive_nonfinite`` of them in a row the run saves a checkpoint and stops.

How a step is skipped without stepping outside DeepSpeed's bookkeeping: every micro-batch still
runs its backward (all ranks must take part in the gradient reduction), but a non-finite loss is
turned into NaN before it, so every gradient is NaN. The ZeRO optimizers (stages 1-3) check the
reduced gradients and skip the whole step on every rank when they are not finite; with ZeRO
stage 0 the gradients are plain ``.grad`` tensors and are dropped here before the step. The
ranks agree on "this step is poisoned" through one all-reduce, and after the step
:meth:`NonFiniteGuard.after_step` checks that DeepSpeed really did not apply it.
"""

from __future__ import annotations

import os

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
        if poisoned and self.zero_stage == 0:
            for p in engine.module.parameters():
                p.grad = None  # torch optimizers leave parameters without a gradient untouched
        return poisoned

    def after_step(self, engine, poisoned: bool, step: int) -> None:
        """Count the step; raise when DeepSpeed applied a poisoned step anyway (never silently)."""
        if not poisoned:
            self.consecutive = 0
            self.first_bad_step = None
            return
        if self.zero_stage > 0 and engine.was_step_applied():
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

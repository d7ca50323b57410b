"""The training loop split into tnl_training.trainer.Trainer, and transformers' lr schedules.

1. Losses of existing runs are unchanged: two tiny CPU runs (one process; two processes with ZeRO-2 and
   document masking) are rerun with the recorded settings and must give the per-step losses, gradient
   norms, learning rates and validation losses of ``golden_losses.json``, which was recorded with the
   training loop before the split (its ``about`` says how). Their schedule has no warmup, the one part
   of the lr where the old hand-written schedule and transformers' differ.
2. The lr each step applies is transformers' schedule function (cosine, WSD, constant), warmup included.
3. The scheduler's state (a ``LambdaLR`` over a ``functools.partial``) loads under the project's
   weights-only checkpoint loading.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from tnl_training.config import load_config
from tnl_training.metrics import read_metrics
from tnl_training.pretrain import build_lr_scheduler, lr_lambda
from tnl_training.safe_load import weights_only_loading
from tnl_training.testing import REPO, run_env, run_training, write_run_config

GOLDEN = json.loads(Path(__file__).with_name("golden_losses.json").read_text())
RECORDED_KEYS = ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm", "lr")
# Same machine and torch build: the runs are bit-identical to the recording (max relative difference 0).
# Another CPU kernel set (AVX2 vs AVX512) or torch version rounds the matmul reductions differently, and
# 8 steps of training carry that along, so there the losses are compared to 1e-4. A real change of the
# step (the data cursor or the schedule's length off by one) moves some step's loss by 1e-2.
SAME_KERNELS = (torch.__version__ == GOLDEN["torch"]
                and torch.backends.cpu.get_cpu_capability() == GOLDEN["cpu_capability"])
REL = 1e-6 if SAME_KERNELS else 1e-4


def _run(spec: dict, cfg_path: Path, log: Path) -> None:
    if spec["nproc"] == 1:
        proc = subprocess.run([sys.executable, "-m", "tnl_training.pretrain", "--config", str(cfg_path)],
                              env=run_env(), cwd=str(REPO), capture_output=True, text=True, timeout=300)
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    else:
        proc = run_training(spec["nproc"], ["--config", str(cfg_path)], log=log)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GOLDEN["runs"]))
def test_losses_of_existing_runs_are_unchanged(prepared_corpus, tmp_path, name):
    golden = GOLDEN["runs"][name]
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_corpus, output_dir=str(run_dir), **golden["fields"])
    _run(golden, cfg, tmp_path / "run.log")
    last_checkpoint = run_dir / "checkpoints" / f"step{golden['fields']['max_steps']}"
    state = json.loads((last_checkpoint / "run_state.json").read_text())
    for pin in ("data_fingerprint", "model_config_hash"):
        assert state[pin] == golden[pin], (f"{pin} differs from the recording: the test corpus, tokenizer or tiny "
                                           "model changed, so golden_losses.json no longer describes this run")
    train = {str(r["step"]): r for r in read_metrics(run_dir / "metrics.jsonl", "train")}
    assert sorted(train, key=int) == sorted(golden["train"], key=int)
    for step, expected in golden["train"].items():
        for key in RECORDED_KEYS:
            assert train[step][key] == pytest.approx(expected[key], rel=REL, abs=0), f"step {step} {key}"
    val = {str(r["step"]): r["val_loss"] for r in read_metrics(run_dir / "metrics.jsonl", "eval")}
    assert val == pytest.approx(golden["val_loss"], rel=REL, abs=0)


def _transformers_lrs(schedule: str, peak: float, steps: int, warmup: int, floor: float, decay: int) -> list[float]:
    """The lr transformers' schedule gives each of ``steps`` optimizer steps, stepped as training steps it."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
    if schedule == "cosine":
        scheduler = transformers.get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=steps, min_lr_rate=floor)
    elif schedule == "wsd":
        scheduler = transformers.get_wsd_schedule(optimizer, num_warmup_steps=warmup, num_decay_steps=decay,
                                                  num_training_steps=steps, decay_type="linear", min_lr_ratio=floor)
    else:
        scheduler = transformers.get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_lr_each_step_applies_is_transformers_schedule(prepared_corpus, tmp_path, schedule):
    steps, warmup, floor, decay_fraction = 8, 3, 0.1, 0.5  # WSD: warmup 3, stable 1, decay 4 steps
    run_dir = tmp_path / "run"
    cfg_path = write_run_config(tmp_path / "run.yaml", prepared_corpus, output_dir=str(run_dir), max_steps=steps,
                                optimizer={"schedule": schedule, "warmup_steps": warmup, "min_lr_ratio": floor,
                                           "decay_fraction": decay_fraction},
                                log_interval=1, eval_interval=100, checkpoint_interval=100, export=False)
    _run({"nproc": 1}, cfg_path, tmp_path / "run.log")
    peak = load_config(cfg_path).optimizer.lr
    logged = [r["lr"] for r in read_metrics(run_dir / "metrics.jsonl", "train")]
    expected = _transformers_lrs(schedule, peak, steps, warmup, floor, round(decay_fraction * steps))
    assert logged == pytest.approx(expected, rel=1e-12, abs=0)
    # warmup starts at 0 (WSD: at min_lr_ratio) and reaches the peak after warmup_steps steps
    assert logged[0] == pytest.approx(peak * floor if schedule == "wsd" else 0.0, abs=1e-15)
    assert logged[warmup] == pytest.approx(peak)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_lr_lambda_is_the_engine_schedule(schedule):
    cfg = load_config(None, ["data.text_files=[x]", f"optimizer.schedule={schedule}", "optimizer.warmup_steps=10",
                             "max_steps=100"])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optimizer.lr)
    scheduler = build_lr_scheduler(cfg, optimizer, total_steps=100)
    fn = lr_lambda(cfg, total_steps=100)
    for step in range(100):
        assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr * fn(step)
        optimizer.step()
        scheduler.step()


def test_scheduler_state_loads_weights_only(tmp_path):
    # DeepSpeed saves the scheduler's state_dict in its checkpoint and loads it back on resume under
    # weights_only_loading: the partial that transformers' LambdaLR holds must not break that.
    cfg = load_config(None, ["data.text_files=[x]", "optimizer.schedule=wsd", "optimizer.warmup_steps=2",
                             "max_steps=10"])
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optimizer.lr)
    scheduler = build_lr_scheduler(cfg, optimizer, total_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    torch.save({"lr_scheduler": scheduler.state_dict()}, tmp_path / "state.pt")
    with weights_only_loading():
        loaded = torch.load(tmp_path / "state.pt")["lr_scheduler"]
    fresh_optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.optimizer.lr)
    resumed = build_lr_scheduler(cfg, fresh_optimizer, total_steps=10)
    resumed.load_state_dict(loaded)
    assert resumed.last_epoch == 5 and resumed.get_last_lr() == scheduler.get_last_lr()
    optimizer.step(), scheduler.step(), fresh_optimizer.step(), resumed.step()
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]

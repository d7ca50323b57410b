"""Resuming (one-process DeepSpeed runs on CPU with the tiny model plus dropout and router jitter):
the random streams continue exactly where the checkpoint left them, the logged lr is the rate each
step applied, and a resume that would change the data order or lacks a random-state file is refused
with a clear error (a checkpoint from before random states were saved resumes with a warning)."""

import json
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from tnl_training.checkpointing import (RNG_STATE_KEY, RUN_STATE, CheckpointLoadError, restore_rng_state,
                                        rng_state_bytes, rng_state_path)
from tnl_training.config import load_config
from tnl_training.metrics import read_metrics
from tnl_training.pretrain import lr_lambda
from tnl_training.testing import REPO, TINY, run_env, write_run_config

pytestmark = pytest.mark.slow
STEPS, SAVED = 8, 4


def _train(cfg_path, *overrides):
    cmd = [sys.executable, "-m", "tnl_training.pretrain", "--config", str(cfg_path), *overrides]
    return subprocess.run(cmd, env=run_env(), cwd=str(REPO), capture_output=True, text=True, timeout=300)


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl", "train")}


@pytest.fixture(scope="module")
def noisy_run(prepared_corpus, tmp_path_factory):
    """An uninterrupted run whose forward draws random numbers (dropout, router jitter)."""
    root = tmp_path_factory.mktemp("noisy")
    model = json.loads(TINY.read_text())
    model.update(router_jitter_noise=0.2, attention_dropout=0.1)
    (root / "model.json").write_text(json.dumps(model))
    cfg = write_run_config(root / "run.yaml", prepared_corpus, output_dir=str(root / "run"),
                           model_config=str(root / "model.json"), max_steps=STEPS, checkpoint_interval=SAVED,
                           log_interval=1, eval_interval=100, export=False)
    proc = _train(cfg)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root / "run", cfg


def _resume_copy(noisy_run, run_dir):
    """A run directory holding only the reference run's step-4 checkpoint (an interrupted run)."""
    source, _ = noisy_run
    tag_dir = run_dir / "checkpoints" / f"step{SAVED}"
    shutil.copytree(source / "checkpoints" / f"step{SAVED}", tag_dir)
    (run_dir / "checkpoints" / "latest").write_text(f"step{SAVED}")
    return tag_dir


def test_resume_continues_the_random_streams(noisy_run, tmp_path):
    reference = _losses(noisy_run[0])
    _resume_copy(noisy_run, tmp_path / "run")
    proc = _train(noisy_run[1], f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"at step {SAVED}" in proc.stdout and "without random states" not in proc.stdout
    resumed = _losses(tmp_path / "run")
    assert sorted(resumed) == list(range(SAVED + 1, STEPS + 1))
    assert [resumed[s] for s in sorted(resumed)] == [reference[s] for s in sorted(resumed)]  # exactly


def test_checkpoint_without_random_states_resumes_with_a_warning(noisy_run, tmp_path):
    # a checkpoint saved before random states were: it still resumes (the noise then differs)
    tag_dir = _resume_copy(noisy_run, tmp_path / "run")
    rng_state_path(tag_dir, 0).unlink()
    state = json.loads((tag_dir / RUN_STATE).read_text())
    del state[RNG_STATE_KEY]
    (tag_dir / RUN_STATE).write_text(json.dumps(state))
    proc = _train(noisy_run[1], f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"warning: checkpoint {tag_dir} was saved without random states" in proc.stdout
    resumed, reference = _losses(tmp_path / "run"), _losses(noisy_run[0])
    assert sorted(resumed) == list(range(SAVED + 1, STEPS + 1))
    assert any(resumed[s] != reference[s] for s in resumed)  # the noise is real: restoring it is what matters


def test_missing_random_state_file_is_an_error(noisy_run, tmp_path):
    tag_dir = _resume_copy(noisy_run, tmp_path / "run")
    rng_state_path(tag_dir, 0).unlink()
    proc = _train(noisy_run[1], f"output_dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert f"error: {rng_state_path(tag_dir, 0)} is missing" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_logged_lr_is_the_rate_each_step_applied(noisy_run):
    run_dir, cfg_path = noisy_run
    cfg = load_config(cfg_path)
    schedule = lr_lambda(cfg, cfg.total_steps(world_size=1))  # multiplier after `step` completed steps
    logged = {r["step"]: r["lr"] for r in read_metrics(run_dir / "metrics.jsonl", "train")}
    assert [logged[s] for s in range(1, STEPS + 1)] == pytest.approx(
        [cfg.optimizer.lr * schedule(s - 1) for s in range(1, STEPS + 1)], rel=1e-12)


@pytest.mark.parametrize("override, old", [("seed=8", "seed=7"), ("seq_len=16", "seq_len=32")])
def test_resume_with_another_data_order_is_refused(noisy_run, tmp_path, override, old):
    tag_dir = _resume_copy(noisy_run, tmp_path / "run")
    proc = _train(noisy_run[1], f"output_dir={tmp_path / 'run'}", override)
    assert proc.returncode != 0
    assert f"error: {override} differs from {old} of checkpoint {tag_dir}" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any step


@pytest.fixture
def restore_global_rng():
    saved = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    yield
    torch.set_rng_state(saved[0])
    random.setstate(saved[1])
    np.random.set_state(saved[2])


def test_random_state_file_round_trip_and_corruption(tmp_path, restore_global_rng):
    path = tmp_path / "rng_state_rank0.safetensors"
    path.write_bytes(rng_state_bytes())
    expected = (torch.rand(3), random.random(), np.random.rand())
    restore_rng_state(path)
    assert torch.equal(torch.rand(3), expected[0]) and (random.random(), np.random.rand()) == expected[1:]
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointLoadError, match=f"{path} is corrupt"):
        restore_rng_state(path)
    with pytest.raises(CheckpointLoadError, match=f"{tmp_path / 'nothing.safetensors'} is missing"):
        restore_rng_state(tmp_path / "nothing.safetensors")

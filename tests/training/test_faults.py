"""Training faults (two-process DeepSpeed runs on CPU with the tiny model): a NaN/inf loss skips
the step on every rank and is counted; too many in a row stop the run with a checkpoint of the
last good parameters; a save that fails half-way (disk full) leaves the previous checkpoint and
``latest`` untouched, names the problem, and the run continues from there with --resume."""

import errno
import hashlib
import json
import os
import resource
import subprocess
from pathlib import Path

import pytest
import torch

from tnl_training.checkpointing import CheckpointSaveError, check_free_space, checkpoint_tags, save_checkpoint
from tnl_training.config import load_config
from tnl_training.export import consolidated_state_dict
from tnl_training.metrics import read_metrics
from tnl_training.nonfinite import INJECT_ENV
from tnl_training.pretrain import lr_lambda
from tnl_training.testing import REPO, launch_cmd, run_env, write_run_config

pytestmark = pytest.mark.slow


def _train(cfg_path, env_extra=None, extra=(), preexec_fn=None, nproc=2):
    env = run_env()
    env.update(env_extra or {})
    cmd = launch_cmd(nproc, ["--config", str(cfg_path), *extra])
    return subprocess.run(cmd, env=env, cwd=str(REPO), capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec_fn)


def _weights(ckpt_dir, tag):
    return consolidated_state_dict(ckpt_dir, tag)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train_records(run_dir):
    return {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl", "train")}


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_nonfinite_loss_skips_the_step_on_every_rank(prepared_corpus, tmp_path, zero_stage):
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_corpus, output_dir=str(run_dir), zero_stage=zero_stage,
                           max_steps=10, checkpoint_interval=1, keep_checkpoints=20, export=False, log_interval=1,
                           eval_interval=100, max_consecutive_nonfinite=3)
    # rank 0 alone gets the NaN: the other rank's gradients are finite, so the skip must be collective
    proc = _train(cfg, {INJECT_ENV: "4,7,8"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    w = {s: _weights(ckpts, f"step{s}") for s in (3, 4, 5, 6, 7, 8, 9)}
    assert _same(w[3], w[4]), "a skipped step changed the parameters"
    assert _same(w[6], w[7]) and _same(w[6], w[8])
    assert not _same(w[4], w[5]) and not _same(w[8], w[9]), "training did not go on after a skipped step"
    records = _train_records(run_dir)
    assert [s for s, r in sorted(records.items()) if r["nonfinite"]] == [4, 7, 8]
    assert records[4]["loss"] is None and records[3]["loss"] is not None
    assert records[10]["skipped_steps"] == 3
    assert json.loads((ckpts / "step10" / "run_state.json").read_text())["skipped_steps"] == 3
    assert "step 8: loss is not finite" in proc.stdout and "2 in a row, 3 in all" in proc.stdout
    # the lr schedule follows the run's step on every stage: a skipped step does not hold it back
    run_cfg = load_config(cfg)
    schedule = lr_lambda(run_cfg, run_cfg.total_steps(world_size=2))
    assert [records[s]["lr"] for s in range(1, 11)] == pytest.approx(
        [run_cfg.optimizer.lr * schedule(s - 1) for s in range(1, 11)], rel=1e-12)


def test_too_many_nonfinite_losses_stop_with_a_good_checkpoint(prepared_corpus, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_corpus, output_dir=str(run_dir), zero_stage=2,
                           max_steps=10, checkpoint_interval=2, keep_checkpoints=20, export=False, log_interval=1,
                           eval_interval=100, max_consecutive_nonfinite=3)
    proc = _train(cfg, {INJECT_ENV: "3,4,5"})
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "the loss was NaN/inf for 3 steps in a row (steps 3-5" in out, out[-3000:]
    assert "max_consecutive_nonfinite=3" in out and "parameters are those of step 2" in out
    ckpts = run_dir / "checkpoints"
    assert checkpoint_tags(ckpts) == ["step2", "step4", "step5"]
    assert (ckpts / "latest").read_text() == "step5"
    assert _same(_weights(ckpts, "step2"), _weights(ckpts, "step5"))

    # continuing skips the bad batches (the data cursor moved past them) and keeps the count
    proc = _train(cfg, extra=["--resume"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {ckpts / 'step5'} at step 5" in proc.stdout
    records = _train_records(run_dir)
    assert sorted(records) == list(range(1, 11)) and records[10]["skipped_steps"] == 3
    assert all(records[s]["loss"] is not None for s in range(6, 11))


def _digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _limit_file_size(max_bytes):
    # what a full disk does to a writer, without filling the disk: writes past max_bytes fail with
    # EFBIG (Python ignores SIGXFSZ). The data and the small run files stay below the limit.
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))


def test_failed_save_keeps_the_previous_checkpoint(prepared_corpus, tmp_path):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_corpus, output_dir=str(run_dir), zero_stage=2,
                           max_steps=8, checkpoint_interval=4, keep_checkpoints=1, export=False, eval_interval=100)
    # 1. a run stopped at step 4 (the same run config: a shorter max_steps would change the schedule)
    proc = _train(cfg, extra=["max_steps=4"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before = _digests(ckpts / "step4")
    assert (ckpts / "latest").read_text() == "step4"

    # 2. continue with a disk that fills up: the step-8 checkpoint (1.2 MB model file) cannot be written
    proc = _train(cfg, preexec_fn=_limit_file_size(256 * 1024))
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "could not save checkpoint step8" in out and "a full disk or a file-size quota" in out, out[-4000:]
    assert f"the previous checkpoint {ckpts / 'step4'} is intact" in out
    assert "Traceback" not in out
    assert checkpoint_tags(ckpts) == ["step4"] and (ckpts / "latest").read_text() == "step4"
    assert _digests(ckpts / "step4") == before
    assert not list(ckpts.glob(".step8*")), "the partial save was not cleaned up"

    # 3. with space again, --resume continues from step 4 and finishes
    proc = _train(cfg, extra=["--resume"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resumed from {ckpts / 'step4'} at step 4" in proc.stdout
    assert checkpoint_tags(ckpts) == ["step8"]


def test_save_refused_when_free_space_is_short(tmp_path):
    previous = tmp_path / "step4"
    previous.mkdir()
    (previous / "weights.pt").write_bytes(b"x" * 4096)
    check_free_space(tmp_path, previous)  # 4 KiB fits
    import shutil

    free = shutil.disk_usage(tmp_path).free
    with open(previous / "weights.pt", "r+b") as f:  # a sparse file that claims more than the free space
        f.truncate(free + 2**30)
    with pytest.raises(CheckpointSaveError, match=r"not enough free disk space .*\(the size of step4\)"):
        check_free_space(tmp_path, previous)


class _EngineWritingInto:
    """Stands in for the DeepSpeed engine: writes a shard into the staging directory, then hits
    ``error`` half-way, as a directory that turned read-only (or a full disk) does."""

    def __init__(self, error=None):
        self.error = error

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest  # `latest` is ours to move, after the rename
        target = Path(save_dir) / tag
        target.mkdir(parents=True, exist_ok=True)
        (target / "mp_rank_00_model_states.pt").write_bytes(b"new weights")
        if self.error is not None:
            raise self.error


@pytest.fixture
def world_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("error, says", [
    (PermissionError(errno.EACCES, "Permission denied"), "the checkpoint directory is not writable"),
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
])
def test_save_protocol_keeps_previous_on_write_error(tmp_path, world_of_one, error, says):
    # the root user ignores directory permissions, so the unwritable directory is simulated here;
    # the real write path (DeepSpeed + torch.save under a file-size limit) is the test above
    ckpts = tmp_path / "checkpoints"
    state = {"step": 4, "cursor": 16, "tokens": 512}
    save_checkpoint(_EngineWritingInto(), ckpts, state, keep=1, rank=0, log=lambda m: None)
    before = _digests(ckpts / "step4")
    with pytest.raises(CheckpointSaveError) as info:
        save_checkpoint(_EngineWritingInto(error), ckpts, {**state, "step": 8}, keep=1, rank=0, log=lambda m: None)
    message = str(info.value)
    assert "could not save checkpoint step8" in message and says in message
    assert f"the previous checkpoint {ckpts / 'step4'} is intact" in message
    assert checkpoint_tags(ckpts) == ["step4"] and (ckpts / "latest").read_text() == "step4"
    assert _digests(ckpts / "step4") == before and not list(ckpts.glob(".step8*"))
    # and a good save after it publishes step8, moves `latest`, and drops step4 (keep=1)
    save_checkpoint(_EngineWritingInto(), ckpts, {**state, "step": 8}, keep=1, rank=0, log=lambda m: None)
    assert checkpoint_tags(ckpts) == ["step8"] and (ckpts / "latest").read_text() == "step8"
    assert json.loads((ckpts / "step8" / "run_state.json").read_text())["step"] == 8


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_checkpoint_directory_at_save_time(tmp_path, world_of_one):
    ckpts = tmp_path / "checkpoints"
    state = {"step": 4, "cursor": 16, "tokens": 512}
    save_checkpoint(_EngineWritingInto(), ckpts, state, keep=1, rank=0, log=lambda m: None)
    ckpts.chmod(0o555)
    try:
        with pytest.raises(CheckpointSaveError, match="not writable"):
            save_checkpoint(_EngineWritingInto(), ckpts, {**state, "step": 8}, keep=1, rank=0, log=lambda m: None)
    finally:
        ckpts.chmod(0o755)
    assert checkpoint_tags(ckpts) == ["step4"] and (ckpts / "latest").read_text() == "step4"

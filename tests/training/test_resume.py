"""Resuming (one-process DeepSpeed runs on CPU with the tiny model plus dropout and router jitter):
the random streams continue exactly where the checkpoint left them, the logged lr is the rate each
step applied, and a resume that would change the data order or lacks a random-state file is refused
with a clear error (a checkpoint from before random states were saved resumes with a warning).
Each checkpoint's files are verified against its manifest.json: a damaged one is skipped for the
previous checkpoint (resume) or refused (export, --resume TAG), naming the file."""

import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tnl_training.checkpointing import (RNG_STATE_KEY, RUN_STATE, CheckpointLoadError,
                                        restore_rng_state, rng_state_bytes, rng_state_path)
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
    (tag_dir / "manifest.json").unlink()  # older versions wrote no manifest either
    state = json.loads((tag_dir / RUN_STATE).read_text())
    del state[RNG_STATE_KEY]
    (tag_dir / RUN_STATE).write_text(json.dumps(state))
    proc = _train(noisy_run[1], f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"warning: checkpoint {tag_dir} was saved without random states" in proc.stdout
    assert f"warning: checkpoint {tag_dir} has no manifest.json (saved by an older version)" in proc.stdout
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


# ------------------------------------------------------------------------------ integrity (manifest.json)
def _copy_run(noisy_run, run_dir):
    """A run directory holding both checkpoints of the reference run (step4, step8 = latest)."""
    shutil.copytree(noisy_run[0] / "checkpoints", run_dir / "checkpoints")
    return run_dir / "checkpoints"


def _flip_bytes(path, count=16):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checkpoints_have_a_manifest_of_every_file(noisy_run):
    ckpts = noisy_run[0] / "checkpoints"
    for tag in (f"step{SAVED}", f"step{STEPS}"):
        manifest = json.loads((ckpts / tag / "manifest.json").read_text())
        files = {p.relative_to(ckpts / tag).as_posix() for p in (ckpts / tag).rglob("*")
                 if p.is_file() and p.name != "manifest.json"}
        assert set(manifest["files"]) == files and {RUN_STATE, "mp_rank_00_model_states.pt"} <= files
        for name, entry in manifest["files"].items():
            data = (ckpts / tag / name).read_bytes()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_flipped_bytes_fall_back_to_the_previous_checkpoint(noisy_run, tmp_path):
    ckpts = _copy_run(noisy_run, tmp_path / "run")
    target = ckpts / f"step{STEPS}" / "mp_rank_00_model_states.pt"
    _flip_bytes(target)
    # export refuses the damaged checkpoint, naming the file
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "tnl_training.export", str(tmp_path / "run"), str(out)],
                          env=run_env(), cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and not out.exists()
    assert f"error: {target} does not match its sha256 in manifest.json" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # resume skips it for step4, in one line that names the file, and continues the same run exactly
    proc = _train(noisy_run[1], f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    skipped = [line for line in proc.stdout.splitlines() if line.startswith("warning: skipping checkpoint")]
    assert skipped == [f"warning: skipping checkpoint {ckpts / f'step{STEPS}'}: {target} does not match its sha256 "
                       f"in manifest.json (its bytes changed since the save: disk or copy corruption); resuming from "
                       f"{ckpts / f'step{SAVED}'}"], proc.stdout[-3000:]
    assert f"resumed from {ckpts / f'step{SAVED}'} at step {SAVED}" in proc.stdout
    resumed, reference = _losses(tmp_path / "run"), _losses(noisy_run[0])
    assert sorted(resumed) == list(range(SAVED + 1, STEPS + 1))
    assert [resumed[s] for s in sorted(resumed)] == [reference[s] for s in sorted(resumed)]


def test_forced_resume_of_a_truncated_checkpoint_is_refused(noisy_run, tmp_path):
    ckpts = _copy_run(noisy_run, tmp_path / "run")
    target = ckpts / f"step{STEPS}" / "mp_rank_00_model_states.pt"
    size = target.stat().st_size
    target.write_bytes(target.read_bytes()[: size // 2])
    proc = _train(noisy_run[1], f"output_dir={tmp_path / 'run'}", "--resume", f"step{STEPS}")
    assert proc.returncode != 0
    assert (f"error: --resume step{STEPS}: {target} has {size // 2:,} bytes, manifest.json says {size:,} "
            "(truncated or overwritten)") in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_rank_file_falls_back_to_the_previous_checkpoint(noisy_run, tmp_path):
    ckpts = _copy_run(noisy_run, tmp_path / "run")
    missing = rng_state_path(ckpts / f"step{STEPS}", 0)
    missing.unlink()
    proc = _train(noisy_run[1], f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (f"warning: skipping checkpoint {ckpts / f'step{STEPS}'}: {missing} is missing (listed in manifest.json); "
            f"resuming from {ckpts / f'step{SAVED}'}\n") in proc.stdout, proc.stdout[-3000:]
    assert f"resumed from {ckpts / f'step{SAVED}'} at step {SAVED}" in proc.stdout


@pytest.mark.parametrize("content, says", [
    (b"\xff\xfe\x00garbage", "is not text (not UTF-8)"),
    (b"hello world", "does not name a checkpoint (it holds 'hello world')"),
])
def test_garbage_latest_is_a_clear_error(noisy_run, tmp_path, content, says):
    ckpts = _copy_run(noisy_run, tmp_path / "run")
    (ckpts / "latest").write_bytes(content)
    proc = _train(noisy_run[1], f"output_dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert f"error: {ckpts / 'latest'} {says}: write the tag of the checkpoint" in proc.stderr, proc.stderr[-3000:]
    assert "--resume TAG (tags here: step4, step8)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_run_state_is_named(noisy_run, tmp_path):
    ckpts = _copy_run(noisy_run, tmp_path / "run")
    (ckpts / f"step{STEPS}" / RUN_STATE).unlink()
    proc = _train(noisy_run[1], f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (f"warning: skipping checkpoint {ckpts / f'step{STEPS}'}: {ckpts / f'step{STEPS}' / RUN_STATE} is missing "
            f"(listed in manifest.json); resuming from {ckpts / f'step{SAVED}'}\n") in proc.stdout, proc.stdout[-3000:]
    # forced, or without a manifest (older version), it is an error naming the file
    (ckpts / f"step{STEPS}" / RUN_STATE).unlink(missing_ok=True)  # the run above saved step8 again
    (ckpts / f"step{STEPS}" / "manifest.json").unlink(missing_ok=True)
    proc = _train(noisy_run[1], f"output_dir={tmp_path / 'run'}", "--resume", f"step{STEPS}")
    assert proc.returncode != 0
    assert (f"error: --resume step{STEPS}: {ckpts / f'step{STEPS}' / RUN_STATE} is missing: {ckpts / f'step{STEPS}'} "
            "is not a complete checkpoint") in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("content, says", [(b"{not json", "is malformed (Expecting property name"),
                                           (b"[1, 2]", "is malformed (not a JSON object)")])
def test_malformed_run_state_is_a_clear_error(noisy_run, tmp_path, content, says):
    # a checkpoint without a manifest (older version) whose run_state.json was damaged
    ckpts = _copy_run(noisy_run, tmp_path / "run")
    (ckpts / f"step{STEPS}" / "manifest.json").unlink(missing_ok=True)
    (ckpts / f"step{STEPS}" / RUN_STATE).write_bytes(content)
    proc = _train(noisy_run[1], f"output_dir={tmp_path / 'run'}", "--resume", f"step{STEPS}")
    assert proc.returncode != 0
    assert f"error: --resume step{STEPS}: {ckpts / f'step{STEPS}' / RUN_STATE} {says}" in proc.stderr, \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------ resume guards
@pytest.mark.parametrize("override, says", [
    ("zero_stage=1", "zero_stage=1 differs from zero_stage=2 of checkpoint {tag}: DeepSpeed's optimizer state is laid "
                     "out per ZeRO stage. To continue, resume with zero_stage=2; or start a new run"),
    ("bf16=true", "bf16=true differs from bf16=false of checkpoint {tag}: the checkpoint's optimizer state was kept "
                  "for the other precision. To continue, resume with bf16=false"),
    ("micro_batch_size=1", "the global batch 1 (micro_batch_size 1 x gradient_accumulation_steps 1 x 1 data-parallel "
                           "replicas) differs from 2 (micro_batch_size 2 x gradient_accumulation_steps 1 x world 1) of checkpoint {tag}: "
                           "the learning-rate schedule, the step count and the data cursor are in steps of 2 rows. To "
                           "continue, keep micro_batch_size x gradient_accumulation_steps = 2"),
    ("model_config={other_model}", "model_config_hash="),
])
def test_resume_with_another_model_or_batch_is_refused(noisy_run, tmp_path, override, says):
    tag_dir = _resume_copy(noisy_run, tmp_path / "run")
    model = json.loads((noisy_run[0].parent / "model.json").read_text())
    model["router_jitter_noise"] = 0.3
    (tmp_path / "other_model.json").write_text(json.dumps(model))
    override = override.format(other_model=tmp_path / "other_model.json")
    proc = _train(noisy_run[1], f"output_dir={tmp_path / 'run'}", override)
    assert proc.returncode != 0
    assert f"error: {says.format(tag=tag_dir)}" in proc.stderr, proc.stderr[-3000:]
    assert "or start a new run (resume=none or another output_dir)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("field", ["tokenizer_fingerprint", "data_fingerprint"])
def test_resume_with_another_tokenizer_or_data_is_refused(noisy_run, tmp_path, field):
    # the checkpoint says it was trained on other tokenizer files / shards than this run's
    tag_dir = _resume_copy(noisy_run, tmp_path / "run")
    state = json.loads((tag_dir / RUN_STATE).read_text())
    state[field] = "0" * 64
    (tag_dir / RUN_STATE).write_text(json.dumps(state))
    (tag_dir / "manifest.json").unlink(missing_ok=True)  # the edit would otherwise fail verification
    proc = _train(noisy_run[1], f"output_dir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert f"differs from {field}=0000000000000000 of checkpoint {tag_dir}: " in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_same_global_batch_with_other_micro_batches_resumes(noisy_run, tmp_path):
    _resume_copy(noisy_run, tmp_path / "run")
    proc = _train(noisy_run[1], f"output_dir={tmp_path / 'run'}", "micro_batch_size=1", "gradient_accumulation_steps=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("resuming with micro_batch_size 1 x gradient_accumulation_steps 2 (checkpoint: 2 x 1); the global batch is "
            "still 2 rows") in proc.stdout
    assert sorted(_losses(tmp_path / "run")) == list(range(SAVED + 1, STEPS + 1))


# ------------------------------------------------------------------------------ finished runs
def test_rerunning_a_finished_run_changes_nothing(noisy_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(noisy_run[0], run_dir)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()
              and not p.name.startswith(".tnl-run.lock")}
    assert json.loads((run_dir / "summary.json").read_text())["val_loss"] is not None
    proc = _train(noisy_run[1], f"output_dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (f"{run_dir} is a complete run: checkpoint step{STEPS} is at step {STEPS} of {STEPS}. Nothing to do; raise "
            "max_steps (or max_tokens) to train further") in proc.stdout, proc.stdout[-3000:]
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()
             and not p.name.startswith(".tnl-run.lock")}
    assert after == before  # summary.json (val_loss), metrics, checkpoints: untouched
    # raising max_steps continues the run
    proc = _train(noisy_run[1], f"output_dir={run_dir}", f"max_steps={STEPS + 2}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert max(_losses(run_dir)) == STEPS + 2
    assert json.loads((run_dir / "summary.json").read_text())["val_loss"] is not None


def test_a_zero0_checkpoint_on_another_world_size_is_refused_clearly():
    """ZeRO-0 writes no *_optim_states.pt, so DeepSpeed's universal conversion cannot change its world size:
    refused with the fix, instead of ds_to_universal's traceback."""
    from tnl_training.config import ConfigError, RunConfig, apply_overrides
    from tnl_training.pretrain import check_resume_settings

    cfg = apply_overrides(RunConfig(), ["zero_stage=0", "micro_batch_size=2"])
    state = {"world_size": 2, "zero_stage": 0, "global_batch": 4, "micro_batch_size": 2,
             "gradient_accumulation_steps": 1, "seed": cfg.seed, "seq_len": cfg.seq_len}
    with pytest.raises(ConfigError, match="world size 1 differs from 2 .*ZeRO-0 checkpoint.*resume on 2 processes"):
        check_resume_settings(cfg, state, Path("ckpt/step4"), world_size=1)
    check_resume_settings(cfg, state, Path("ckpt/step4"), world_size=2)  # same world: fine
    check_resume_settings(cfg, {**state, "zero_stage": 2}, Path("ckpt/step4"), world_size=1)  # universal: fine

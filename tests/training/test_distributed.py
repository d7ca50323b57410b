"""Two-process DeepSpeed runs on CPU (gloo) with the tiny model: ZeRO-2 and ZeRO-3 losses fall,
kill-and-resume replays the uninterrupted loss curve, forced expert imbalance matches a
single-process run, and the exported directory loads with the Auto classes."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from tnl_training.checkpointing import write_manifest
from tnl_training.metrics import read_metrics, step_losses
from tnl_training.testing import REPO, launch_cmd, run_env, run_training, write_run_config

pytestmark = pytest.mark.slow
STEPS = 30


def _launch(cfg_path, extra=()):
    return subprocess.Popen(launch_cmd(2, ["--config", str(cfg_path), *extra]), env=run_env(), cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _run(cfg_path, log, extra=()):
    proc = run_training(2, ["--config", str(cfg_path), *extra], log=log)
    assert proc.returncode == 0, f"training failed, see {log}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _check_falls(run_dir):
    losses = step_losses(run_dir / "metrics.jsonl")
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = [losses[s] for s in range(1, 6)], [losses[s] for s in range(STEPS - 4, STEPS + 1)]
    assert sum(last) / 5 < sum(first) / 5 - 0.5, losses
    evals = read_metrics(run_dir / "metrics.jsonl", "eval")
    assert evals and all(math.isfinite(e["val_ppl"]) for e in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] + 1e-6
    logs = [r for r in read_metrics(run_dir / "metrics.jsonl", "train") if "tokens_per_s" in r]
    assert logs and all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in logs)
    assert all(len(r["expert_load_max_over_mean"]) == 3 for r in logs)  # tiny.json: 3 MoE layers
    assert (run_dir / "loss_curve.png").stat().st_size > 1000
    return losses


@pytest.fixture(scope="module")
def zero2_run(prepared_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero2")
    cfg = write_run_config(root / "run.yaml", prepared_corpus, output_dir=str(root / "run"), zero_stage=2,
                           sample_prompt="VIOLA. ", sample_tokens=12)
    _run(cfg, root / "log.txt")
    return root / "run", cfg


def test_zero2_loss_falls_and_export_loads(zero2_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tnl_model  # noqa: F401

    run_dir, _ = zero2_run
    _check_falls(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["export_max_abs_logit_diff"] < 1e-5  # exported model == engine, on held-out rows
    assert summary["sample"].startswith("VIOLA.")
    model_dir = run_dir / "model"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in model_dir.iterdir()}
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = "OLIVIA. Viola greets the duke, and the ring mocks Toby."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    enc = tok(text, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 5
    # the export CLI on the same checkpoint gives the same weights
    dst = tmp_path / "cli-export"
    proc = subprocess.run([sys.executable, "-m", "tnl_training.export", str(run_dir), str(dst)], env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = AutoModelForCausalLM.from_pretrained(str(dst)).eval()
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, again(**enc).logits)


def test_zero3_loss_falls(prepared_corpus, tmp_path):
    cfg = write_run_config(tmp_path / "run.yaml", prepared_corpus, output_dir=str(tmp_path / "run"), zero_stage=3)
    _run(cfg, tmp_path / "log.txt")
    _check_falls(tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["export_max_abs_logit_diff"] < 1e-5


class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: what a planted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_export_of_a_planted_checkpoint_is_refused(zero2_run, tmp_path):
    run_dir, _ = zero2_run
    planted = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints", planted / "checkpoints")
    tag = (planted / "checkpoints" / "latest").read_text().strip()
    marker = tmp_path / "pwned"
    target = planted / "checkpoints" / tag / "mp_rank_00_model_states.pt"
    states = torch.load(target, map_location="cpu", weights_only=True)
    states["payload"] = _Payload(marker)
    torch.save(states, target)
    write_manifest(target.parent)  # a manifest guards against damage, not against whoever can rewrite it
    proc = subprocess.run([sys.executable, "-m", "tnl_training.export", str(planted), str(tmp_path / "out")],
                          env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "mp_rank_00_model_states.pt: refused to load io.open" in proc.stderr + proc.stdout
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_zero0_run_exports_the_trained_weights(prepared_corpus, tmp_path):
    """ZeRO stage 0 saves no partitions, which DeepSpeed's zero_to_fp32 cannot read: the run's
    final export must still work and equal the engine."""
    cfg = write_run_config(tmp_path / "run.yaml", prepared_corpus, output_dir=str(tmp_path / "run"), zero_stage=0,
                           max_steps=3, checkpoint_interval=3, eval_interval=100, export=True)
    proc = run_training(1, ["--config", str(cfg)], log=tmp_path / "log.txt")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["export_max_abs_logit_diff"] < 1e-5


def _wait_for_step(metrics, step, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.is_file() and any(s >= step for s in step_losses(metrics)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.1)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_kill_and_resume_replays_the_same_losses(zero2_run, prepared_corpus, tmp_path):
    ref_losses = step_losses(zero2_run[0] / "metrics.jsonl")
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_corpus, output_dir=str(run_dir), zero_stage=2,
                           export=False)
    metrics = run_dir / "metrics.jsonl"
    ckpts = run_dir / "checkpoints"

    # 1. SIGTERM to the job's process group (what Ctrl-C, `kill -- -PGID` or a scheduler does): every rank
    #    saves a checkpoint at the next step boundary and exits.
    proc = _launch(cfg)
    _wait_for_step(metrics, 4, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    saved = sorted(int(p.name[4:]) for p in ckpts.glob("step*") if (p / "run_state.json").is_file())
    assert saved and saved[-1] < STEPS, out[-3000:]
    assert "checkpoint saved at step" in out

    # 2. Resume (the default), then SIGKILL rank 1 mid-run: no chance to save anything.
    proc = _launch(cfg)
    _wait_for_step(metrics, 13, proc)
    victims = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if any(a.startswith("--local_rank=1") for a in p.cmdline())]
    assert victims
    victims[0].send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=180)
    assert f"resumed from {ckpts / f'step{saved[-1]}'}" in out
    assert proc.returncode != 0

    # 3. Resume from the last checkpoint and finish.
    proc = _launch(cfg, ["--resume"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    losses = step_losses(metrics)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert losses[step] == pytest.approx(ref_losses[step], rel=1e-5, abs=1e-6), step

    # 4. Resume step 20 on another world size (1 process, accumulation 2: the same global batch) through
    #    DeepSpeed's universal checkpoint: same data, same losses up to summation order.
    other = tmp_path / "world1"
    proc = subprocess.run([sys.executable, "-m", "tnl_training.pretrain", "--config", str(cfg),
                           f"output_dir={other}", "gradient_accumulation_steps=2", "--resume", str(ckpts / "step20")],
                          env=run_env(), cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "via universal checkpoint" in proc.stdout
    moved = step_losses(other / "metrics.jsonl")
    assert sorted(moved) == list(range(21, STEPS + 1))
    for step in moved:
        assert moved[step] == pytest.approx(ref_losses[step], rel=1e-4), step


def test_forced_expert_imbalance_matches_single_process(tmp_path):
    """Rank 0 routes every token to experts 0 and 1 (experts 2, 3 get nothing there) while rank 1 routes
    normally; ZeRO-1/2/3 on 2 processes must neither hang nor drop expert gradients: the weights equal a
    single-process run that sees both micro-batches by gradient accumulation."""
    worker = Path(__file__).with_name("_imbalance_worker.py")
    env = run_env()
    stages = ["1", "2", "3"]
    two = tmp_path / "two.pt"
    proc = subprocess.run(launch_cmd(2, [str(worker), "--stages", *stages, "--out", str(two)], module=None), env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    one = tmp_path / "one.pt"
    proc = subprocess.run([sys.executable, str(worker), "--stages", *stages, "--out", str(one)], env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    a, b = torch.load(two), torch.load(one)
    assert a["world"] == 2 and b["world"] == 1
    for stage in map(int, stages):
        ra, rb = a["results"][stage], b["results"][stage]
        counts = ra["forced_counts"]  # rank 0's routing: experts 2 and 3 received no token at all
        assert (counts[2:] == 0).all() and (counts[:2] > 0).all(), counts
        assert ra["state"].keys() == rb["state"].keys()
        # every parameter was initialised by _init_weights, also when built through ZeRO-3's zero.Init path
        for name, w in ra["initial"].items():
            assert torch.isfinite(w).all(), name
            if w.ndim >= 2:
                assert 0.01 < w.std().item() < 0.04, (stage, name, w.std().item())  # initializer_range 0.02
            elif "norm" in name:
                assert torch.equal(w, torch.ones_like(w)), (stage, name)
            torch.testing.assert_close(w, rb["initial"][name], msg=lambda m: f"ZeRO-{stage} init {name}: {m}")
        for name in ra["state"]:
            torch.testing.assert_close(ra["state"][name], rb["state"][name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"ZeRO-{stage} {name}: {m}")

"""``compile=true``: DeepSpeed's engine.compile traces the model; training computes what it does
eagerly, and checkpoints and the export keep their parameter names (one process, ZeRO-2, CPU).
The compiled run also recomputes activations (``activation_checkpointing=true``), which must not
change a loss either.
The ``aot_eager`` backend traces every graph and runs AOT autograd without Inductor's codegen."""

import json

import pytest

from tnl_training.metrics import read_metrics
from tnl_training.testing import run_training, write_run_config

pytestmark = pytest.mark.slow


def _losses(prepared_corpus, tmp_path, compiled: bool):
    run_dir = tmp_path / ("compiled" if compiled else "eager")
    cfg = write_run_config(tmp_path / f"{run_dir.name}.yaml", prepared_corpus, output_dir=str(run_dir), max_steps=4,
                           log_interval=1, eval_interval=100, checkpoint_interval=2, export=compiled,
                           compile=compiled, compile_backend="aot_eager", activation_checkpointing=compiled)
    proc = run_training(1, ["--config", str(cfg)], log=tmp_path / f"{run_dir.name}.log")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("model compiled with torch.compile (backend aot_eager)" in proc.stdout) == compiled
    return run_dir, [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl", "train")]


def test_compiled_training_matches_eager(prepared_corpus, tmp_path):
    _, eager = _losses(prepared_corpus, tmp_path, compiled=False)
    run_dir, compiled = _losses(prepared_corpus, tmp_path, compiled=True)
    assert len(eager) == len(compiled) == 4
    assert compiled == pytest.approx(eager, rel=1e-5, abs=1e-6)
    assert (run_dir / "checkpoints" / "step4").is_dir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["export_max_abs_logit_diff"] < 1e-5  # the export (plain names) == the compiled engine

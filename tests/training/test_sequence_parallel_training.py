"""Sequence-parallel pretraining (``sequence_parallel_size``) equals the unsharded run.

The hybrid MoE tiny model (configs/model/tiny.json: lightning layers, a softmax layer with GQA and
partial RoPE, routed MoE layers and a dense layer) trained for 5 steps on the same rows:

- 2 processes as one sequence-parallel group (each rank half of every row) under ZeRO-2 and ZeRO-3
  against 1 process: the same per-step losses (1e-5 relative, fp32), validation losses and exported weights;
- 4 processes as 2 data-parallel replicas x 2 sequence shards against 2 data-parallel processes;
- settings that cannot run are refused before any work.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from tnl_training.config import ConfigError, RunConfig, apply_overrides
from tnl_training.testing import run_training, write_run_config

STEPS = 5


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: (r["loss"], r["lm_loss"], r["aux_loss"], r["z_loss"]) for r in rows if r["type"] == "train"}
    evals = {r["step"]: r["val_loss"] for r in rows if r["type"] == "eval"}
    return train, evals


def _train(root, name, nproc, **fields):
    run_dir = root / name
    cfg = write_run_config(root / f"{name}.yaml", root, output_dir=str(run_dir), max_steps=STEPS,
                           eval_interval=STEPS, checkpoint_interval=STEPS, optimizer={"warmup_steps": 0}, **fields)
    proc = run_training(nproc, ["--config", str(cfg)], log=root / f"{name}.log")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def _assert_same_run(run, reference):
    losses, evals = _losses(run)
    ref_losses, ref_evals = _losses(reference)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, values in ref_losses.items():
        torch.testing.assert_close(torch.tensor(losses[step], dtype=torch.float64),
                                   torch.tensor(values, dtype=torch.float64), rtol=1e-5, atol=1e-7,
                                   msg=f"losses (total, lm, aux, z) at step {step}")
    torch.testing.assert_close(torch.tensor(list(evals.values())), torch.tensor(list(ref_evals.values())),
                               rtol=1e-5, atol=0)
    weights, ref_weights = (load_file(str(d / "model" / "model.safetensors")) for d in (run, reference))
    assert weights.keys() == ref_weights.keys()
    for name, tensor in ref_weights.items():
        # per tensor, relative to its norm: Adam turns last-bit differences of near-zero gradients into
        # ~1e-6 absolute differences of single weights, while a wrong gradient moves whole tensors by >1e-2
        error = float((weights[name] - tensor).norm() / tensor.norm())
        assert error < 1e-4, f"exported {name}: relative difference {error:.2e}"


@pytest.mark.slow
def test_two_sequence_shards_train_like_one_process_under_zero_2_and_3(prepared_corpus):
    root = prepared_corpus
    for stage in (2, 3):
        # per stage: ZeRO-3 builds the model partitioned (zero.Init), drawing its initial weights differently
        reference = _train(root, f"sp_reference_zero{stage}", 1, zero_stage=stage)
        sharded = _train(root, f"sp2_zero{stage}", 2, zero_stage=stage, sequence_parallel_size=2)
        log = (root / f"sp2_zero{stage}.log").read_text()
        assert "1 replicas x 2 sequence shards of 16 tokens" in log
        assert json.loads((sharded / "checkpoints" / f"step{STEPS}" / "run_state.json").read_text())[
            "sequence_parallel_size"] == 2
        _assert_same_run(sharded, reference)


@pytest.mark.slow
def test_two_replicas_of_two_shards_train_like_two_data_parallel_processes(prepared_corpus):
    root = prepared_corpus
    reference = _train(root, "dp2_reference", 2)
    grid = _train(root, "dp2_sp2", 4, sequence_parallel_size=2)
    assert "2 replicas x 2 sequence shards of 16 tokens" in (root / "dp2_sp2.log").read_text()
    _assert_same_run(grid, reference)


@pytest.mark.parametrize("overrides, world, message", [
    (["sequence_parallel_size=2"], 3, "does not divide the 3 processes"),
    (["sequence_parallel_size=3", "seq_len=32"], 3, "seq_len=32 is not divisible by sequence_parallel_size=3"),
    (["sequence_parallel_size=2", "document_masking=true"], 2, "document_masking cannot be combined"),
    (["sequence_parallel_size=2", "compile=true"], 2, "compile=true is not supported"),
    (["sequence_parallel_size=0"], 1, "sequence_parallel_size must be >= 1"),
])
def test_settings_that_cannot_run_are_refused_before_any_work(monkeypatch, overrides, world, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = apply_overrides(RunConfig(), ["data.corpus=shakespeare", *overrides])
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_the_global_batch_counts_replicas_not_processes():
    cfg = apply_overrides(RunConfig(), ["micro_batch_size=3", "gradient_accumulation_steps=2",
                                        "sequence_parallel_size=2"])
    assert cfg.world_batch(8) == 3 * 2 * 4
    assert cfg.data_parallel_size(8) == 4


def test_the_long_context_recipe_is_a_valid_sequence_parallel_run(monkeypatch):
    import json as _json

    from tnl_training.config import load_config, resolve_path
    from tnl_training.prepare import check_sequence_length
    from tnl_training.testing import REPO

    monkeypatch.setenv("WORLD_SIZE", "8")
    recipe = REPO / "configs" / "train" / "long-context-sp.yaml"
    cfg = load_config(recipe)
    assert cfg.sequence_parallel_size == 8 and cfg.seq_len % 8 == 0 and not cfg.document_masking
    check_sequence_length(cfg, _json.loads(resolve_path(cfg.model_config, recipe).read_text()))
    monkeypatch.setenv("WORLD_SIZE", "12")
    with pytest.raises(ConfigError, match="does not divide the 12 processes"):
        load_config(recipe)

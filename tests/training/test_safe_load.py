"""No code runs from a checkpoint: DeepSpeed's loading calls run under tnl_training.safe_load.

A checkpoint file with a planted ``__reduce__`` payload is refused by name (file and type) and the
payload never runs: in the loader alone, and end to end through ``python -m tnl_training.export``
on a real ZeRO-2 checkpoint whose model-states file was replaced
(tests/training/test_distributed.py::test_export_of_a_planted_checkpoint_is_refused).

The allow-list covers a bf16 run moved to another world size: a two-process bf16 ZeRO-2 run resumes
on one process through DeepSpeed's universal checkpoint (conversion and load both under the safe
loader) with nothing refused, and a payload planted in its bf16 optimizer file is refused there.
"""

import math
import subprocess
import sys

import pytest
import torch

from tnl_training.checkpointing import convert_to_universal
from tnl_training.metrics import step_losses
from tnl_training.safe_load import DEEPSPEED_STATE_TYPES, UnsafeCheckpointError, weights_only_loading
from tnl_training.testing import REPO, run_env, run_training, write_run_config


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: what an attacker's file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_payload_is_refused_by_name_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": Payload(marker)}, path)
    with weights_only_loading():
        with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt: refused to load io\.open"):
            torch.load(path, map_location="cpu", weights_only=False)  # what DeepSpeed asks for
    assert not marker.exists()
    assert torch.load.__module__ == "torch.serialization"  # the block restored torch's own loader


def test_deepspeed_state_types_still_load(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    path = tmp_path / "optim.pt"
    state = {"zero_stage": ZeroStageEnum.gradients, "loss_scaler": LossScaler(1.0),
             "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}], "fp32": [torch.arange(4.0)]}
    torch.save(state, path)
    with weights_only_loading():
        loaded = torch.load(path, map_location="cpu", weights_only=False)
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and torch.equal(loaded["fp32"][0], torch.arange(4.0))


@pytest.mark.slow
def test_bf16_run_resumes_on_another_world_size_through_a_universal_checkpoint(prepared_corpus, tmp_path):
    """bf16 ZeRO-2 on 2 processes, resumed from step 2 on 1 process (accumulation 2: the same global
    batch). Its optimizer files hold LossScaler, ZeroStageEnum and fragment_address; the universal
    conversion (``python -m tnl_training.safe_load deepspeed.checkpoint.ds_to_universal``) and the
    engine's load read them with weights_only=True."""
    steps, saved = 4, 2
    cfg = write_run_config(tmp_path / "run.yaml", prepared_corpus, output_dir=str(tmp_path / "run"), bf16=True,
                           max_steps=steps, checkpoint_interval=saved, log_interval=1, eval_interval=100, export=False)
    proc = run_training(2, ["--config", str(cfg)], log=tmp_path / "log2.txt")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tag_dir = tmp_path / "run" / "checkpoints" / f"step{saved}"
    assert sorted(p.name for p in tag_dir.glob("*_optim_states.pt")) == [
        f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)]
    reference = step_losses(tmp_path / "run" / "metrics.jsonl")

    other = tmp_path / "world1"
    proc = subprocess.run([sys.executable, "-m", "tnl_training.pretrain", "--config", str(cfg), f"output_dir={other}",
                           "gradient_accumulation_steps=2", "--resume", str(tag_dir)],
                          env=run_env(), cwd=str(REPO), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "refused" not in output and "Traceback" not in output
    assert f"resumed from {tag_dir.parent / f'step{saved}_universal'} at step {saved} " in proc.stdout, proc.stdout[-3000:]
    assert "world size 2 -> 1 via universal checkpoint" in proc.stdout
    moved = step_losses(other / "metrics.jsonl")
    assert sorted(moved) == list(range(saved + 1, steps + 1))
    for step, loss in moved.items():
        assert math.isfinite(loss) and loss == pytest.approx(reference[step], rel=1e-4), (step, loss, reference)
    assert (other / "checkpoints" / "latest").read_text().strip() == f"step{steps}"

    # the conversion runs under the safe loader: a payload planted in a bf16 optimizer file is refused by name
    planted = tmp_path / "planted" / f"step{saved}"
    planted.mkdir(parents=True)
    for path in tag_dir.iterdir():
        planted.joinpath(path.name).write_bytes(path.read_bytes())
    target = planted / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with weights_only_loading():
        state = torch.load(target, map_location="cpu")
    marker = tmp_path / "pwned"
    torch.save({**state, "extra": Payload(marker)}, target)
    with pytest.raises(RuntimeError, match=rf"{target.name}: refused to load io\.open") as refused:
        convert_to_universal(planted, log=lambda message: None)
    assert all(name in str(refused.value) for name in DEEPSPEED_STATE_TYPES)
    assert not marker.exists() and not (planted.parent / f"step{saved}_universal").exists()

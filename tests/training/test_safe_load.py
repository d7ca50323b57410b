"""No code runs from a checkpoint: DeepSpeed's loading calls run under tnl_training.safe_load.

A checkpoint file with a planted ``__reduce__`` payload is refused by name (file and type) and the
payload never runs: in the loader alone, and end to end through ``python -m tnl_training.export``
on a real ZeRO-2 checkpoint whose model-states file was replaced
(tests/training/test_distributed.py::test_export_of_a_planted_checkpoint_is_refused).
"""

import pytest
import torch

from tnl_training.safe_load import UnsafeCheckpointError, weights_only_loading


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

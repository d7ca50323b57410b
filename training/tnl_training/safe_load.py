"""Loading DeepSpeed checkpoints without running code from them.

DeepSpeed reads its ``.pt`` checkpoint files with ``torch.load(weights_only=False)`` (its checkpoint
engine, ``zero_to_fp32``, ``ds_to_universal``): a file with a planted ``__reduce__`` payload runs
it. :func:`weights_only_loading` wraps those loading calls: inside it, every ``torch.load`` is
``weights_only=True`` with an explicit allow-list of the few non-tensor types DeepSpeed's own state
holds (:data:`DEEPSPEED_STATE_TYPES`), whatever the caller asked for. Anything else is refused
with :class:`UnsafeCheckpointError`, naming the file and the type. DeepSpeed's files are not edited.

    python -m tnl_training.safe_load MODULE [ARGS...]   # run a DeepSpeed tool (e.g.
                                                       # deepspeed.checkpoint.ds_to_universal) under it
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import re
import runpy
import sys

import torch

#: "module.Name" of every non-tensor type found in DeepSpeed checkpoints of this project's runs
#: (ZeRO 0-3, fp32 and bf16, one process or several, and the universal conversions of ZeRO 1-3;
#: checked with DeepSpeed 0.19: tests/training/test_safe_load.py resumes a two-process bf16 run on
#: one process). ZeRO-0 files hold tensors and plain containers only; ZeRO-3's optimizer files also
#: hold torch.Tensor subclass rebuilds, which torch's own weights_only list allows.
DEEPSPEED_STATE_TYPES = (
    # "zero_stage" of the ZeRO optimizer state: *_optim_states.pt, universal zero/optimizer_state.pt
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    # "loss_scaler" of the same state (a static scaler of 1 in fp32 and bf16 runs), in the same files
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    # "param_slice_mappings" of the ZeRO-1/2 optimizer state, in *_optim_states.pt
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file asked to unpickle something other than tensors and DeepSpeed's own state."""


def _trusted_types() -> list:
    found = []
    for dotted in DEEPSPEED_STATE_TYPES:
        module, _, name = dotted.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: that type cannot occur
            continue
    return found


@contextlib.contextmanager
def weights_only_loading():
    """Every ``torch.load`` in the block loads with ``weights_only=True`` and the DeepSpeed allow-list."""
    original = torch.load
    trusted = _trusted_types()

    def load(f, *args, weights_only=None, **kwargs):  # noqa: ARG001 - the caller's wish is overridden
        try:
            with torch.serialization.safe_globals(trusted):
                return original(f, *args, weights_only=True, **kwargs)
        except pickle.UnpicklingError as err:
            refused = re.search(r"GLOBAL ([\w.]+)", str(err))
            what = refused.group(1) if refused else "an object that is not a tensor or plain data"
            raise UnsafeCheckpointError(
                f"{f}: refused to load {what} from this checkpoint file: only tensors, plain data and DeepSpeed's "
                f"own state types ({', '.join(DEEPSPEED_STATE_TYPES)}) are loaded, so no code in a checkpoint "
                "can run. If you made this file yourself, re-save it from a trusted run; otherwise do not use it."
            ) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m tnl_training.safe_load MODULE [ARGS...]", file=sys.stderr)
        return 2
    sys.argv = argv
    with weights_only_loading():
        try:
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
        except UnsafeCheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

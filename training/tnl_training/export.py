"""Export a DeepSpeed checkpoint as a Hugging Face model directory.

    python -m tnl_training.export CKPT DST [--tag stepN] [--tokenizer DIR]

``CKPT`` is a run directory, its ``checkpoints/`` directory or one checkpoint tag
directory. The ZeRO partitions (stage 1, 2 or 3, any world size) are consolidated into
fp32 weights with DeepSpeed's ``zero_to_fp32`` (stage 0 keeps whole weights and needs none), loaded into ``TNLForCausalLM`` (every key
checked) and written with ``save_pretrained`` (safetensors) together with the tokenizer,
so ``AutoModelForCausalLM.from_pretrained(DST)`` and ``AutoTokenizer.from_pretrained(DST)``
load it. The directory is written under a temporary name and renamed when complete.
The checkpoint's files are verified against its ``manifest.json`` first (a file that is missing,
truncated or changed is named and nothing is exported).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch

from .checkpointing import MANIFEST, CheckpointLoadError, read_latest, verify_checkpoint
from .safe_load import UnsafeCheckpointError, weights_only_loading


class ExportError(ValueError):
    pass


def resolve_checkpoint(path: str | os.PathLike, tag: str | None = None) -> tuple[Path, str]:
    """(checkpoints directory, tag) for a run dir, a checkpoints dir or a tag dir."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if tag is None and (p / "latest").is_file():
        try:
            return p, read_latest(p)
        except CheckpointLoadError as err:
            raise ExportError(str(err).replace("pass --resume TAG", "pass --tag TAG")) from None
    if tag is not None:
        if not (p / tag).is_dir():
            raise ExportError(f"no checkpoint {tag!r} in {p}")
        return p, tag
    if p.is_dir() and any(p.glob("*model_states.pt")):
        return p.parent, p.name
    raise ExportError(f"{path} is not a DeepSpeed checkpoint (no 'latest' file, no *model_states.pt)")


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of checkpoint ``tag``, gathered from every ZeRO partition (stages 1-3).

    ZeRO stage 0 writes no partitions (the optimizer state sits in the model-states file) and
    DeepSpeed's ``zero_to_fp32`` cannot read such a checkpoint: there the module's own weights,
    which are the optimizer's weights, are the result.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    stage0 = _stage0_module_weights(Path(ckpt_dir) / tag)
    if stage0 is not None:
        return stage0
    with weights_only_loading():  # zero_to_fp32 unpickles with weights_only=False: no code may run
        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        except UnsafeCheckpointError as err:
            raise ExportError(str(err)) from None


def _stage0_module_weights(tag_dir: Path) -> dict[str, torch.Tensor] | None:
    model_states = tag_dir / "mp_rank_00_model_states.pt"
    if any(tag_dir.glob("*optim_states.pt")) or not model_states.is_file():
        return None
    try:
        states = torch.load(model_states, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same named error
        raise ExportError(f"cannot read {model_states}: {err}") from None
    if states.get("param_shapes") is not None:
        return None  # a ZeRO checkpoint whose partition files are missing: let zero_to_fp32 name them
    return {name: tensor.float() for name, tensor in states["module"].items()}


def export_checkpoint(ckpt: str | os.PathLike, dst: str | os.PathLike, tag: str | None = None,
                      tokenizer_dir: str | os.PathLike | None = None, model_config: str | os.PathLike | None = None,
                      log=print) -> Path:
    import tnl_model  # noqa: F401 - registers the Auto classes
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    ckpt_dir, tag = resolve_checkpoint(ckpt, tag)
    try:
        if not verify_checkpoint(ckpt_dir / tag):
            log(f"warning: checkpoint {ckpt_dir / tag} has no {MANIFEST} (saved by an older version): its files are "
                "not verified")
    except CheckpointLoadError as err:
        raise ExportError(f"{err}; checkpoint {ckpt_dir / tag} is not exported. Export another one (--tag TAG)") from None
    model_config = Path(model_config) if model_config else ckpt_dir / "model_config.json"
    if not model_config.is_file():
        raise ExportError(f"no model config at {model_config}; pass --model-config")
    if tokenizer_dir is None:
        ref = ckpt_dir / "tokenizer_path.txt"
        tokenizer_dir = ref.read_text().strip() if ref.is_file() else None
    config = AutoConfig.from_pretrained(str(model_config))
    config.use_cache = True  # training ran without the cache; generation wants it
    state = consolidated_state_dict(ckpt_dir, tag)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v.float() for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    persistent = set(model.state_dict().keys())
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    missing = [k for k in missing if k in persistent and k not in tied]
    if missing or unexpected:
        raise ExportError(f"checkpoint {ckpt_dir / tag} does not match the model config: missing {missing[:8]}, "
                          f"unexpected {list(unexpected)[:8]}")
    dst = Path(dst)
    tmp = dst.parent / f".{dst.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tmp))
    else:
        log("warning: no tokenizer recorded for this checkpoint; pass --tokenizer to include one")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    n = sum(v.numel() for v in state.values())
    log(f"exported {ckpt_dir / tag} ({n / 1e6:.2f}M parameters, fp32) to {dst}")
    return dst


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    parser = argparse.ArgumentParser(prog="python -m tnl_training.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run directory, checkpoints directory or checkpoint tag directory")
    parser.add_argument("dst", help="output Hugging Face model directory")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the run's)")
    parser.add_argument("--model-config", default=None, help="model config.json (default: the run's)")
    args = parser.parse_args(argv)
    try:
        export_checkpoint(args.checkpoint, args.dst, args.tag, args.tokenizer, args.model_config)
    except ExportError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()

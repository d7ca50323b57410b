"""Strict, pickle-free loading of TNL checkpoints through ``from_pretrained``.

What transformers (5.24, 5.25) does on its own, and what this module changes:

* A directory with only ``pytorch_model.bin`` is loaded by default (with
  ``torch.load(weights_only=True)``, i.e. it is unpickled). Here it is refused with a
  :class:`~tnl_model.checkpoint_io.CheckpointError` unless the caller passes
  ``allow_pickle=True``; even then only ``weights_only=True`` loading is allowed.
  For hub repositories the same rule is enforced by forcing ``use_safetensors=True``.
* A truncated or corrupt ``model.safetensors`` surfaces as a bare ``SafetensorError``
  without the file name. Here every safetensors file of a local directory is checked
  first (header parses, known dtypes, non-negative dims, byte sizes equal to dtype x shape,
  byte ranges that neither overlap nor leave gaps, the file exactly as long as its header
  says) without reading the tensor data; an index may only name files in its directory, and
  a weights file that is not a regular file (a FIFO would block ``open`` forever) is refused
  before it is opened.
* A checkpoint whose shapes differ from the config raises a ``RuntimeError`` that
  only says "look at the above report" (the report is a log message). Here it is a
  :class:`CheckpointMismatchError` (a ``ValueError``) listing every tensor name with
  both shapes. ``ignore_mismatched_sizes=True`` still re-initialises them, as in
  transformers.
* Tensors the model needs but the checkpoint lacks are silently initialised at random
  (a log warning). Here that is an error too, unless ``allow_missing_weights=True``.

Hook (one line in ``modeling_tnl.py``)::

    class TNLPreTrainedModel(StrictLoadingMixin, PreTrainedModel): ...

:func:`load_model` gives the same guarantees whether or not the mixin is installed
(it is what the ``tnl`` command line uses), and :func:`verify_checkpoint` compares a
directory with a config from the safetensors headers alone (no weights are read).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint_io import (INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE, CheckpointError, read_weight_map,
                            require_regular_file)

PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
#: bits per element of every safetensors dtype (safetensors 0.8: sub-byte floats pack densely)
_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
               "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "U16": 16, "U32": 32, "U64": 64, "C64": 64,
               "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
# Tensors that older checkpoints may carry but the model recomputes from the config.
_IGNORED_UNEXPECTED = (r"\.slope_rate$", r"\.query_decay$", r"\.key_decay$", r"\.diagonal_decay$")
_MAX_LISTED = 25


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the model built from the config."""


# --------------------------------------------------------------------------------------------
# Files


def _is_int(value) -> bool:
    return type(value) is int  # JSON integers only (not bool, not 2.0)


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from a safetensors file, after checking that the file is whole.

    Reads only the header, and refuses before opening anything that is not a regular file (a
    FIFO would block forever). Raises :class:`CheckpointError` naming the file (and the tensor)
    when it is truncated or padded, its header is not valid safetensors, a tensor has an unknown
    dtype, a shape that is not non-negative integers, a byte size other than dtype x shape, or a
    byte range outside the data; or two tensors overlap, or bytes belong to no tensor (the rules
    the safetensors library applies when it opens the file). Bit flips inside the tensor data
    cannot be detected: safetensors stores no checksum.
    """
    path = Path(path)
    require_regular_file(path)
    size = path.stat().st_size
    advice = "re-download it or save it again"
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated or corrupt: only {size} bytes, no safetensors header; {advice}")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8 or header_len > 100 * 2**20:
            raise CheckpointError(
                f"{path} is truncated or corrupt: the header claims {header_len} bytes but the file has {size}; {advice}"
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is corrupt: its safetensors header is invalid ({err}); {advice}") from err
    data_size = size - 8 - header_len
    entries, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in info.items()):
                raise CheckpointError(f"{path} is corrupt: its __metadata__ must map strings to strings; {advice}")
            continue

        def bad(problem):
            return CheckpointError(f"{path} is corrupt: tensor {name!r} {problem}; {advice}")

        if not isinstance(info, dict):
            raise bad("has no {dtype, shape, data_offsets} record")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPE_BITS:
            raise bad(f"has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
            raise bad(f"has a shape that is not a list of integers ({shape!r})")
        if any(d < 0 for d in shape):
            raise bad(f"has a negative dimension in its shape {shape}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise bad(f"has data_offsets that are not two integers ({offsets!r})")
        start, stop = offsets
        if start < 0 or stop < start:
            raise bad(f"has data_offsets [{start}, {stop}], not a byte range")
        bits = math.prod(shape) * _DTYPE_BITS[dtype]
        if bits % 8 or stop - start != bits // 8:
            raise bad(f"is {dtype} of shape {shape}, which takes {bits / 8:g} bytes, but its data_offsets "
                      f"[{start}, {stop}] hold {stop - start}")
        entries[name] = (dtype, tuple(shape))
        spans.append((start, stop, name))
    end = max((stop for _, stop, _ in spans), default=0)
    if 8 + header_len + end != size:
        last = max(spans, key=lambda span: span[1])[2] if spans else None
        raise CheckpointError(
            f"{path} is truncated or corrupt: its header describes {8 + header_len + end} bytes but the file has "
            f"{size}" + (f" (the last tensor, {last!r}, ends at byte {8 + header_len + end})" if last else "")
            + f"; {advice}"
        )
    position, previous = 0, None
    for start, stop, name in sorted(spans):
        if start < position:
            raise CheckpointError(f"{path} is corrupt: tensors {previous!r} and {name!r} overlap (their data_offsets "
                                  f"share bytes {start}..{position}); {advice}")
        if start > position:
            raise CheckpointError(f"{path} is corrupt: bytes {position}..{start} of its data belong to no tensor (a gap "
                                  f"before tensor {name!r}); {advice}")
        position, previous = stop, name
    return entries


def safetensors_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors weight files of a checkpoint directory (index shards or the single file); the
    index must name files inside the directory, and each must be a regular file."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = read_weight_map(index)
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{directory} is incomplete: shard(s) {', '.join(missing)} listed in {INDEX_FILE} "
                                  "are missing")
        for f in files:
            require_regular_file(f)
        return files
    single = directory / SINGLE_FILE
    if single.exists():
        require_regular_file(single)
        return [single]
    return []


def pickle_files(directory: str | os.PathLike) -> list[str]:
    directory = Path(directory)
    return sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin")


def _pickle_refusal(directory, names) -> CheckpointError:
    return CheckpointError(
        f"{directory} only has pickle weights ({', '.join(names)}); unpickling can run arbitrary code, so they are "
        "refused. If you trust the file, load it once with from_pretrained(..., allow_pickle=True) "
        "(torch.load with weights_only=True) and re-save it with save_pretrained(), which writes safetensors."
    )


def prepare_from_pretrained_kwargs(pretrained_model_name_or_path, kwargs: dict, allow_pickle: bool = False) -> dict:
    """Check a checkpoint before transformers touches it; return the kwargs to call ``from_pretrained`` with."""
    kwargs = dict(kwargs)
    if kwargs.get("weights_only") is False:
        raise CheckpointError("weights_only=False would unpickle arbitrary Python objects; TNL checkpoints never need "
                              "it (use safetensors, or allow_pickle=True for weights-only pickle loading)")
    if kwargs.get("state_dict") is not None or kwargs.get("gguf_file") or pretrained_model_name_or_path is None:
        return kwargs
    directory = Path(pretrained_model_name_or_path, kwargs.get("subfolder", "") or "")
    if directory.is_dir():
        tensors = safetensors_files(directory)
        if tensors and kwargs.get("use_safetensors") is not False:
            for path in tensors:
                read_safetensors_header(path)
            kwargs["use_safetensors"] = True
            return kwargs
        pickles = pickle_files(directory)
        if pickles:
            if not allow_pickle:
                raise _pickle_refusal(directory, pickles)
            kwargs["use_safetensors"], kwargs["weights_only"] = False, True
            return kwargs
        if not tensors:
            raise CheckpointError(f"{directory} has no weights: neither {SINGLE_FILE} nor {INDEX_FILE}")
        return kwargs
    # Hub repository (or a path that does not exist: transformers reports that).
    if allow_pickle:
        kwargs["weights_only"] = True
    elif kwargs.get("use_safetensors") is False:
        raise CheckpointError("use_safetensors=False would load pickle weights; pass allow_pickle=True to opt in")
    else:
        kwargs["use_safetensors"] = True
    return kwargs


# --------------------------------------------------------------------------------------------
# Loading report -> errors


def _shape(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def _listing(lines: list[str]) -> str:
    shown = lines[:_MAX_LISTED]
    more = f"\n  ... and {len(lines) - len(shown)} more" if len(lines) > len(shown) else ""
    return "\n".join(f"  {line}" for line in shown) + more


def mismatch_error(source, mismatched) -> CheckpointMismatchError:
    """``mismatched``: iterable of ``(name, checkpoint_shape, model_shape)``."""
    lines = [f"{name}: checkpoint {_shape(ckpt)} vs model {_shape(model)}" for name, ckpt, model in sorted(mismatched)]
    return CheckpointMismatchError(
        f"checkpoint {source} does not fit the model config: {len(lines)} tensor(s) have a different shape:\n"
        f"{_listing(lines)}\n"
        "The checkpoint was saved from a different config. Load it with its own config.json; pass "
        "ignore_mismatched_sizes=True only if you mean to re-initialise these tensors."
    )


def missing_error(source, missing, unexpected=()) -> CheckpointMismatchError:
    text = (f"checkpoint {source} lacks {len(missing)} tensor(s) the model needs (they would be left randomly "
            f"initialised):\n{_listing(sorted(missing))}")
    if unexpected:
        text += f"\nand has {len(unexpected)} tensor(s) the model does not use:\n{_listing(sorted(unexpected))}"
    text += ("\nThe checkpoint was saved from a different config (layer count or layer_types?). Load it with its own "
             "config.json; pass allow_missing_weights=True only if you mean to train the missing tensors from scratch.")
    return CheckpointMismatchError(text)


class StrictLoadingMixin:
    """Put first in ``TNLPreTrainedModel``'s bases: pickle-free, strict ``from_pretrained``.

    Extra keyword arguments: ``allow_pickle=False`` and ``allow_missing_weights=False``
    (both also work through ``AutoModelForCausalLM.from_pretrained``). Built on public entry points
    only: a local directory is checked against the config from its safetensors headers before
    transformers reads a weight (every mismatched tensor listed, instead of transformers' "look at
    the report above"), and transformers' own ``output_loading_info`` tells which tensors it did not
    find (a missing head is initialised, as transformers does; a missing body weight is an error).
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, allow_pickle: bool = False,
                        allow_missing_weights: bool = False, **kwargs):
        kwargs = prepare_from_pretrained_kwargs(pretrained_model_name_or_path, kwargs, allow_pickle=allow_pickle)
        source = pretrained_model_name_or_path
        directory = Path(source, kwargs.get("subfolder", "") or "") if source is not None else None
        config = kwargs.get("config")
        if (directory is not None and directory.is_dir() and kwargs.get("use_safetensors")
                and not kwargs.get("ignore_mismatched_sizes") and (config is None or hasattr(config, "layer_types"))
                and not (set(kwargs) & set(cls.config_class().to_dict()))):  # config overrides: checked after
            report = verify_checkpoint(directory, config)
            if report.mismatched:
                raise mismatch_error(directory, report.mismatched)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                              **kwargs)
        missing_body = [key for key in info["missing_keys"] if key.startswith(f"{model.base_model_prefix}.")]
        if missing_body and not allow_missing_weights:
            raise missing_error(source, missing_body, info["unexpected_keys"])
        return (model, info) if want_info else model


def strict_loading_installed(model_class=None) -> bool:
    if model_class is None:
        from .modeling_tnl import TNLPreTrainedModel as model_class
    return issubclass(model_class, StrictLoadingMixin)


# --------------------------------------------------------------------------------------------
# Checking a directory against a config without loading weights


@dataclass
class CheckpointReport:
    directory: str
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    num_tensors: int = 0

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing)

    def raise_for_problems(self) -> None:
        if self.mismatched:
            raise mismatch_error(self.directory, self.mismatched)
        if self.missing:
            raise missing_error(self.directory, self.missing, self.unexpected)


def expected_shapes(config, base_model: bool = False) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the state dict ``TNLForCausalLM(config)`` (or ``TNLModel``) saves, built on meta."""
    from .modeling_tnl import TNLForCausalLM, TNLModel

    with torch.device("meta"):
        model = (TNLModel if base_model else TNLForCausalLM)(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def verify_checkpoint(model_dir: str | os.PathLike, config=None) -> CheckpointReport:
    """Compare the tensors of a safetensors directory with what ``config`` needs (headers only).

    ``config`` defaults to the directory's own ``config.json``. Use
    ``verify_checkpoint(d, cfg).raise_for_problems()`` to turn problems into errors.
    """
    from .configuration_tnl import TNLConfig

    model_dir = Path(model_dir)
    if config is None:
        config = TNLConfig.from_pretrained(model_dir)
    files = safetensors_files(model_dir)
    if not files:
        pickles = pickle_files(model_dir) if model_dir.is_dir() else []
        if pickles:
            raise _pickle_refusal(model_dir, pickles)
        raise CheckpointError(f"{model_dir} has no weights: neither {SINGLE_FILE} nor {INDEX_FILE}")
    found: dict[str, tuple[int, ...]] = {}
    for path in files:
        found.update({name: shape for name, (_, shape) in read_safetensors_header(path).items()})
    base_model = not any(name.startswith("model.") or name == "lm_head.weight" for name in found)
    expected = expected_shapes(config, base_model=base_model)
    report = CheckpointReport(str(model_dir), num_tensors=len(found))
    for name, shape in expected.items():
        if name not in found:
            report.missing.append(name)
        elif tuple(found[name]) != shape:
            report.mismatched.append((name, tuple(found[name]), shape))
    ignored = re.compile("|".join(_IGNORED_UNEXPECTED))
    report.unexpected = sorted(n for n in found if n not in expected and not ignored.search(n)
                               and not (n == "lm_head.weight" and config.tie_word_embeddings))
    return report


def load_model(model_dir, *, allow_pickle: bool = False, allow_missing_weights: bool = False, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` with this module's guarantees, hook installed or not."""
    from transformers import AutoModelForCausalLM

    import tnl_model  # noqa: F401 - registers the Auto classes

    if strict_loading_installed():
        return AutoModelForCausalLM.from_pretrained(model_dir, allow_pickle=allow_pickle,
                                                    allow_missing_weights=allow_missing_weights, **kwargs)
    kwargs = prepare_from_pretrained_kwargs(model_dir, kwargs, allow_pickle=allow_pickle)
    config = kwargs.get("config")
    if Path(model_dir).is_dir() and kwargs.get("use_safetensors") and (config is None or hasattr(config, "layer_types")):
        report = verify_checkpoint(model_dir, config)
        if report.mismatched or (report.missing and not allow_missing_weights):
            report.raise_for_problems()
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


__all__ = ["CheckpointMismatchError", "StrictLoadingMixin", "CheckpointReport", "read_safetensors_header",
           "safetensors_files", "prepare_from_pretrained_kwargs", "verify_checkpoint", "expected_shapes",
           "load_model", "strict_loading_installed", "mismatch_error", "missing_error"]

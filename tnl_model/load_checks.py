"""Strict, pickle-free loading of TNL checkpoints through ``from_pretrained``.

What transformers 5.24 does on its own, and what this module changes:

* A directory with only ``pytorch_model.bin`` is loaded by default (with
  ``torch.load(weights_only=True)``, i.e. it is unpickled). Here it is refused with a
  :class:`~tnl_model.checkpoint_io.CheckpointError` unless the caller passes
  ``allow_pickle=True``; even then only ``weights_only=True`` loading is allowed.
  For hub repositories the same rule is enforced by forcing ``use_safetensors=True``.
* A truncated or corrupt ``model.safetensors`` surfaces as a bare ``SafetensorError``
  without the file name. Here every safetensors file of a local directory is checked
  first (header parses, dtypes and shapes agree with the byte ranges, the file is
  exactly as long as its header says) without reading the tensor data.
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

import contextvars
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint_io import INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE, CheckpointError

PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}
# Tensors that older checkpoints may carry but the model recomputes from the config.
_IGNORED_UNEXPECTED = (r"\.slope_rate$", r"\.query_decay$", r"\.key_decay$", r"\.diagonal_decay$")
_MAX_LISTED = 25


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the model built from the config."""


# --------------------------------------------------------------------------------------------
# Files


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from a safetensors file, after checking that the file is whole.

    Reads only the header. Raises :class:`CheckpointError` naming the file when it is
    truncated, padded, or its header is not valid safetensors. (Bit flips inside the
    tensor data cannot be detected: safetensors stores no checksum.)
    """
    path = Path(path)
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
        entries = {}
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (start, stop) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            expected = math.prod(shape) * _DTYPE_BYTES.get(dtype, 0)
            if dtype in _DTYPE_BYTES and stop - start != expected:
                raise ValueError(f"tensor {name} has shape {list(shape)} {dtype} but {stop - start} bytes")
            entries[name] = (dtype, shape)
            end = max(end, int(stop))
    except (ValueError, KeyError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is corrupt: its safetensors header is invalid ({err}); {advice}") from err
    if 8 + header_len + end != size:
        raise CheckpointError(
            f"{path} is truncated or corrupt: its header describes {8 + header_len + end} bytes but the file has "
            f"{size}; {advice}"
        )
    return entries


def safetensors_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors weight files of a checkpoint directory (index shards or the single file)."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err})") from err
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{directory} is incomplete: shard(s) {', '.join(missing)} listed in {INDEX_FILE} "
                                  "are missing")
        return files
    single = directory / SINGLE_FILE
    return [single] if single.exists() else []


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


@dataclass
class _Strictness:
    allow_missing_weights: bool = False


_STRICTNESS: contextvars.ContextVar[_Strictness] = contextvars.ContextVar("tnl_strict_loading", default=_Strictness())


class StrictLoadingMixin:
    """Put first in ``TNLPreTrainedModel``'s bases: pickle-free, strict ``from_pretrained``.

    Extra keyword arguments: ``allow_pickle=False`` and ``allow_missing_weights=False``
    (both also work through ``AutoModelForCausalLM.from_pretrained``).
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, allow_pickle: bool = False,
                        allow_missing_weights: bool = False, **kwargs):
        kwargs = prepare_from_pretrained_kwargs(pretrained_model_name_or_path, kwargs, allow_pickle=allow_pickle)
        token = _STRICTNESS.set(_Strictness(allow_missing_weights=allow_missing_weights))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        finally:
            _STRICTNESS.reset(token)

    @staticmethod
    def _finalize_model_loading(model, load_config, loading_info):
        from transformers import PreTrainedModel

        source = load_config.pretrained_model_name_or_path
        if loading_info.mismatched_keys and not load_config.ignore_mismatched_sizes:
            raise mismatch_error(source, loading_info.mismatched_keys)
        info = PreTrainedModel._finalize_model_loading(model, load_config, loading_info)
        # A missing head is transformers' standard flow (a base-model checkpoint in a causal-LM class):
        # it is initialised and transformers warns. A missing body weight stays an error.
        missing_body = [key for key in info.missing_keys if key.startswith(f"{model.base_model_prefix}.")]
        if missing_body and not _STRICTNESS.get().allow_missing_weights:
            raise missing_error(source, missing_body, info.unexpected_keys)
        return info


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

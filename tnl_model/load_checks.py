"""Every check made before or while a TNL checkpoint is read: the one place for them.

* Files: a weights file must be a regular file (a FIFO would block ``open`` forever); a
  safetensors header must describe the file exactly (known dtypes, non-negative dims, byte sizes
  equal to dtype x shape, byte ranges that neither overlap nor leave gaps, the file as long as the
  header says), checked without reading tensor data; an index (parsed here only) may only name
  files in its own directory.
* Pickle: a directory with only pickle weights is refused with one message, unless the caller
  passes ``allow_pickle=True``, and then only ``weights_only=True`` loading is allowed; hub
  repositories are forced to ``use_safetensors=True``.
* Shapes: a directory is compared with a config from its safetensors headers alone
  (:func:`verify_checkpoint`); every mismatched tensor is listed in a :class:`CheckpointMismatchError`
  (a ``ValueError``) where transformers raises a ``RuntimeError`` saying "look at the above report".
  ``ignore_mismatched_sizes=True`` still re-initialises them, as in transformers.
* Missing tensors: transformers initialises them at random with a log warning; here a missing body
  weight is an error unless ``allow_missing_weights=True`` (a missing head is initialised, as in
  transformers).

Hook (one line in ``modeling_tnl.py``)::

    class TNLPreTrainedModel(StrictLoadingMixin, PreTrainedModel): ...

It wraps the public ``from_pretrained`` and reads transformers' ``output_loading_info``; nothing
private is overridden. :func:`load_model` gives the same guarantees with or without the hook (the
``tnl`` command line uses it). This module imports only the config: the expected tensor shapes come
from the model classes registered with transformers' ``AutoModel`` / ``AutoModelForCausalLM``, so
there is no import cycle with ``modeling_tnl`` (which imports :class:`StrictLoadingMixin` from here).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING, AutoModelForCausalLM

from .configuration_tnl import TNLConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: pickle files a model directory may hold that are not weights (transformers' Trainer writes this one)
_NOT_WEIGHTS = ("training_args.bin",)
#: bits per element of every safetensors dtype (safetensors 0.8: sub-byte floats pack densely)
_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
               "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "U16": 16, "U32": 32, "U64": 64, "C64": 64,
               "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
# Tensors that older checkpoints may carry but the model recomputes from the config.
_IGNORED_UNEXPECTED = re.compile(r"\.(slope_rate|query_decay|key_decay|diagonal_decay)$")
_MAX_LISTED = 25
_ADVICE = "re-download it or save it again"
_PICKLE_OPT_IN = "use_safetensors=False would load pickle weights; pass allow_pickle=True to opt in"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read safely."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the model built from the config."""


# --------------------------------------------------------------------------------------------
# Files


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def require_regular_file(path: str | os.PathLike, what: str = "weights file") -> None:
    """Refuse ``path`` unless it is a regular file (symlinks followed), before anything opens it:
    opening a FIFO blocks until something writes to it, so a FIFO named ``model.safetensors``
    used to hang every loader."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except OSError as err:
        raise CheckpointError(f"{path} cannot be read ({err.strerror or err})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path} is {_kind(mode)}, not a regular file, and is refused unread (reading it "
                              f"could block forever); put the real {what} there")


def _escapes(name: str) -> bool:
    """Whether a shard name from an index points outside the index's directory (judged on the
    name itself: a symlink inside the directory, as in the Hugging Face cache, is fine)."""
    norm = os.path.normpath(name)
    return os.path.isabs(name) or norm == os.curdir or norm == os.pardir or norm.startswith(os.pardir + os.sep)


def read_weight_map(index_path: str | os.PathLike) -> dict[str, str]:
    """``weight_map`` of a ``model.safetensors.index.json``: tensor name -> shard file name, each
    a plain path inside the index's directory (``../x``, ``/abs/x`` are refused)."""
    index_path = Path(index_path)
    require_regular_file(index_path, INDEX_FILE)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{index_path} is not a valid safetensors index ({err})") from err
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{index_path} is not a valid safetensors index (weight_map must map tensor names "
                              "to shard file names)")
    for tensor, shard in weight_map.items():
        if _escapes(shard):
            raise CheckpointError(f"{index_path} lists shard {shard!r} for tensor {tensor}: a path outside the model "
                                  "directory, refused; an index may only name files in its own directory")
    return dict(weight_map)


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
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path} is truncated or corrupt: only {size} bytes, no safetensors header; {_ADVICE}")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8 or header_len > 100 * 2**20:
            raise CheckpointError(f"{path} is truncated or corrupt: the header claims {header_len} bytes but the file "
                                  f"has {size}; {_ADVICE}")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is corrupt: its safetensors header is invalid ({err}); {_ADVICE}") from err
    entries, spans = {}, []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in info.items()):
                raise CheckpointError(f"{path} is corrupt: its __metadata__ must map strings to strings; {_ADVICE}")
            continue
        entries[name], span = _header_entry(path, name, info)
        spans.append((*span, name))
    end = max((stop for _, stop, _ in spans), default=0)
    if 8 + header_len + end != size:
        last = max(spans, key=lambda span: span[1])[2] if spans else None
        raise CheckpointError(
            f"{path} is truncated or corrupt: its header describes {8 + header_len + end} bytes but the file has "
            f"{size}" + (f" (the last tensor, {last!r}, ends at byte {8 + header_len + end})" if last else "")
            + f"; {_ADVICE}"
        )
    position, previous = 0, None
    for start, stop, name in sorted(spans):
        if start < position:
            raise CheckpointError(f"{path} is corrupt: tensors {previous!r} and {name!r} overlap (their data_offsets "
                                  f"share bytes {start}..{position}); {_ADVICE}")
        if start > position:
            raise CheckpointError(f"{path} is corrupt: bytes {position}..{start} of its data belong to no tensor (a gap "
                                  f"before tensor {name!r}); {_ADVICE}")
        position, previous = stop, name
    return entries


def _header_entry(path: Path, name: str, info) -> tuple[tuple[str, tuple[int, ...]], tuple[int, int]]:
    """``((dtype, shape), (start, stop))`` of one tensor record of a safetensors header, checked."""

    def bad(problem):
        return CheckpointError(f"{path} is corrupt: tensor {name!r} {problem}; {_ADVICE}")

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
    return (dtype, tuple(shape)), (start, stop)


def safetensors_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors weight files of a checkpoint directory (index shards or the single file; ``[]``
    when it has neither); the index must name files inside the directory, and each must be a regular file."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
        files = [directory / name for name in sorted(set(read_weight_map(index).values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{directory} is incomplete: shard(s) {', '.join(missing)} listed in {INDEX_FILE} "
                                  "are missing")
    else:
        files = [directory / SINGLE_FILE] if (directory / SINGLE_FILE).exists() else []
    for f in files:
        require_regular_file(f)
    return files


def pickle_files(directory: str | os.PathLike) -> list[str]:
    """Names of the pickle weight files in ``directory``."""
    return sorted(p.name for p in Path(directory).iterdir()
                  if p.suffix in PICKLE_SUFFIXES and p.name not in _NOT_WEIGHTS)


def no_safe_weights_error(directory: str | os.PathLike) -> CheckpointError:
    """The error for a directory without safetensors weights: the pickle refusal when it has pickle files."""
    directory = Path(directory)
    pickles = pickle_files(directory) if directory.is_dir() else []
    if pickles:
        return CheckpointError(
            f"{directory} only has pickle weights ({', '.join(pickles)}); unpickling can run arbitrary code, so they "
            "are refused. If you trust the file, convert it once: load it with from_pretrained(..., allow_pickle=True) "
            "(torch.load with weights_only=True) and re-save it with save_pretrained(), which writes safetensors."
        )
    return CheckpointError(f"{directory} has no weights: neither {SINGLE_FILE} nor {INDEX_FILE}")


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """:func:`safetensors_files`, refusing a directory that has none (pickle-only or empty)."""
    files = safetensors_files(directory)
    if not files:
        raise no_safe_weights_error(directory)
    return files


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
        elif pickle_files(directory):
            if not allow_pickle:
                raise CheckpointError(_PICKLE_OPT_IN) if tensors else no_safe_weights_error(directory)
            kwargs["use_safetensors"], kwargs["weights_only"] = False, True
        elif not tensors:
            raise no_safe_weights_error(directory)
        return kwargs
    # Hub repository (or a path that does not exist: transformers reports that).
    if allow_pickle:
        kwargs["weights_only"] = True
    elif kwargs.get("use_safetensors") is False:
        raise CheckpointError(_PICKLE_OPT_IN)
    else:
        kwargs["use_safetensors"] = True
    return kwargs


# --------------------------------------------------------------------------------------------
# Shapes: a directory against a config, from the headers alone


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


def _registered_model_class(config_class, base_model: bool = False):
    """The model class registered for ``config_class`` (``import tnl_model`` registers TNL's)."""
    mapping = MODEL_MAPPING if base_model else MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return mapping[config_class]
    except KeyError:
        kind = "AutoModel" if base_model else "AutoModelForCausalLM"
        raise CheckpointError(f"no {kind} class is registered for {config_class.__name__}; import tnl_model "
                              "first") from None


def expected_shapes(config, base_model: bool = False) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the state dict the registered causal LM (or base model) saves for ``config``,
    built on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = _registered_model_class(type(config), base_model)(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def verify_checkpoint(model_dir: str | os.PathLike, config=None) -> CheckpointReport:
    """Compare the tensors of a safetensors directory with what ``config`` needs (headers only).

    ``config`` defaults to the directory's own ``config.json``. Use
    ``verify_checkpoint(d, cfg).raise_for_problems()`` to turn problems into errors.
    """
    model_dir = Path(model_dir)
    if config is None:
        config = TNLConfig.from_pretrained(model_dir)
    found: dict[str, tuple[int, ...]] = {}
    for path in weight_files(model_dir):
        found.update({name: shape for name, (_, shape) in read_safetensors_header(path).items()})
    base_model = not any(name.startswith("model.") or name == "lm_head.weight" for name in found)
    expected = expected_shapes(config, base_model=base_model)
    report = CheckpointReport(str(model_dir), num_tensors=len(found))
    for name, shape in expected.items():
        if name not in found:
            report.missing.append(name)
        elif tuple(found[name]) != shape:
            report.mismatched.append((name, tuple(found[name]), shape))
    report.unexpected = sorted(n for n in found if n not in expected and not _IGNORED_UNEXPECTED.search(n)
                               and not (n == "lm_head.weight" and config.tie_word_embeddings))
    return report


# --------------------------------------------------------------------------------------------
# Loading: the checks around transformers' public from_pretrained

#: keyword arguments that from_pretrained hands to the config (the checkpoint is then checked after loading);
#: ``dtype`` is from_pretrained's own and changes no shape
_CONFIG_KEYS = frozenset(({f.name for f in dataclasses.fields(TNLConfig)} | set(TNLConfig.attribute_map)
                          | {"attn_type_list", "rope_theta"}) - {"dtype"})


def _check_before_loading(source, kwargs: dict, allow_pickle: bool) -> dict:
    """Pickle and header checks, then (a local directory loaded with its own or a given TNL config) every
    mismatched shape at once; returns the kwargs for ``from_pretrained``."""
    kwargs = prepare_from_pretrained_kwargs(source, kwargs, allow_pickle=allow_pickle)
    config = kwargs.get("config")
    directory = Path(source, kwargs.get("subfolder", "") or "") if source is not None else None
    if (directory is not None and directory.is_dir() and kwargs.get("use_safetensors")
            and not kwargs.get("ignore_mismatched_sizes") and (config is None or isinstance(config, TNLConfig))
            and not _CONFIG_KEYS & set(kwargs)):
        report = verify_checkpoint(directory, config)
        if report.mismatched:
            raise mismatch_error(directory, report.mismatched)
    return kwargs


def _check_loading_info(source, model, info: dict, allow_missing_weights: bool) -> None:
    """transformers' ``output_loading_info``: a missing body weight is an error (a missing head is initialised)."""
    missing_body = [key for key in info["missing_keys"] if key.startswith(f"{model.base_model_prefix}.")]
    if missing_body and not allow_missing_weights:
        raise missing_error(source, missing_body, info["unexpected_keys"])


class StrictLoadingMixin:
    """Put first in ``TNLPreTrainedModel``'s bases: pickle-free, strict ``from_pretrained``.

    Extra keyword arguments: ``allow_pickle=False`` and ``allow_missing_weights=False``
    (both also work through ``AutoModelForCausalLM.from_pretrained``).
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, allow_pickle: bool = False,
                        allow_missing_weights: bool = False, **kwargs):
        kwargs = _check_before_loading(pretrained_model_name_or_path, kwargs, allow_pickle)
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                              **kwargs)
        _check_loading_info(pretrained_model_name_or_path, model, info, allow_missing_weights)
        return (model, info) if want_info else model


def strict_loading_installed(model_class=None) -> bool:
    """Whether ``model_class`` (default: the registered TNL causal LM) has the :class:`StrictLoadingMixin` hook."""
    return issubclass(model_class or _registered_model_class(TNLConfig), StrictLoadingMixin)


def load_model(model_dir, *, allow_pickle: bool = False, allow_missing_weights: bool = False, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` with this module's guarantees, hook installed or not."""
    if strict_loading_installed():
        return AutoModelForCausalLM.from_pretrained(model_dir, allow_pickle=allow_pickle,
                                                    allow_missing_weights=allow_missing_weights, **kwargs)
    kwargs = _check_before_loading(model_dir, kwargs, allow_pickle)
    want_info = kwargs.pop("output_loading_info", False)
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True, **kwargs)
    _check_loading_info(model_dir, model, info, allow_missing_weights)
    return (model, info) if want_info else model


__all__ = ["CheckpointError", "CheckpointMismatchError", "StrictLoadingMixin", "CheckpointReport",
           "read_safetensors_header", "read_weight_map", "require_regular_file", "safetensors_files", "weight_files",
           "pickle_files", "prepare_from_pretrained_kwargs", "verify_checkpoint", "expected_shapes", "load_model",
           "strict_loading_installed", "mismatch_error", "missing_error"]

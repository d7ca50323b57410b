"""Reading and writing safetensors checkpoint directories without unpickling anything.

A checkpoint directory holds either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Pickle files (``*.bin``, ``*.pt``) are never
read; a directory that only has those gets an error saying how to convert it.
"""

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read safely."""


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


class SafetensorsDirectory:
    """Lazy access to every tensor of a safetensors checkpoint directory by name."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is not a directory")
        self._handles = {}
        self.file_of_key = self._index()

    def _index(self) -> dict[str, str]:
        index_path = self.directory / INDEX_FILE
        if index_path.exists():
            return read_weight_map(index_path)
        single = self.directory / SINGLE_FILE
        if single.exists():
            return {key: SINGLE_FILE for key in self._open(SINGLE_FILE).keys()}
        pickles = sorted(p.name for p in self.directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{self.directory} only has pickle weights ({', '.join(pickles)}); they can run arbitrary code when "
                "loaded and are refused. Convert them once, in a trusted environment, with "
                "`model.save_pretrained(dir, safe_serialization=True)`."
            )
        raise CheckpointError(f"{self.directory} has no {SINGLE_FILE} or {INDEX_FILE}")

    def _open(self, filename: str):
        if filename not in self._handles:
            path = self.directory / filename
            if not path.exists():
                raise CheckpointError(f"shard {filename} listed in {INDEX_FILE} is missing from {self.directory}")
            require_regular_file(path)
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

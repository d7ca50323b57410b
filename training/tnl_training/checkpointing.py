"""Training checkpoints: where they live, which one to resume from, and saving them so that a
failure half-way (disk full, a directory that became read-only, a killed process) never damages
the previous one.

Layout of ``output_dir/checkpoints``::

    step40/            a complete DeepSpeed checkpoint (``run_state.json`` and one
                       ``rng_state_rank{R}.safetensors`` per rank are inside)
    step40_universal/  the same, converted for a different world size (made on demand)
    latest             the newest complete tag
    .step50.partial/   a save in progress; never read, removed by the next save

A save writes into ``.stepN.partial``, adds ``run_state.json`` and then ``manifest.json`` (name,
size and sha256 of every other file in the directory), renames the directory to ``stepN`` and only
then rewrites ``latest`` (write to a temporary name, then rename) and drops old tags.
A crash at any point leaves the previous checkpoint and ``latest`` as they were.

Resume and export verify the manifest first (:func:`verify_checkpoint`) and name the file that is
missing, has another size or other bytes. Resuming from ``latest`` skips a checkpoint that fails
for the newest one that passes and says so; ``--resume TAG`` fails instead. A checkpoint without a
manifest (saved by an older version) is used with a warning.

Each rank's random state (torch CPU and CUDA generators as uint8 tensors, python ``random`` and
numpy's global generator as JSON in the safetensors metadata; no pickle) is saved with the
checkpoint and restored on resume, so dropout and router jitter continue the uninterrupted run's
random streams.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tnl_training.prepare import PreflightError

CHECKPOINTS = "checkpoints"
RUN_STATE = "run_state.json"
LATEST = "latest"
PARTIAL_SUFFIX = ".partial"
#: headroom over the previous checkpoint's size when checking free space before a save
FREE_SPACE_MARGIN = 1.1
#: one file per rank in a checkpoint's tag directory; ``run_state.json`` names the pattern under
#: RNG_STATE_KEY (a checkpoint without that key predates saved random states)
RNG_STATE = "rng_state_rank{rank}.safetensors"
RNG_STATE_KEY = "rng_state_files"
RNG_STATE_FORMAT = "1"
#: integrity manifest in each tag directory: {"format", "files": {relative name: {"size", "sha256"}}}
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "1"
HASH_BLOCK = 1 << 20  # files are hashed in 1 MiB blocks (never read whole)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous one is untouched."""


class CheckpointLoadError(RuntimeError):
    """A part of the checkpoint to resume from is missing or corrupt."""


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    """Complete checkpoint tags (``stepN`` with a run_state.json), oldest first."""
    tags = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.is_dir() and p.name.startswith("step") and p.name[4:].isdigit() and (p / RUN_STATE).is_file():
                tags.append(p.name)
    return sorted(tags, key=lambda t: int(t[4:]))


def _step_dirs(ckpt_dir: Path) -> list[str]:
    """Every ``stepN`` directory, complete or not, newest first."""
    if not ckpt_dir.is_dir():
        return []
    names = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step") and p.name[4:].isdigit()]
    return sorted(names, key=lambda t: int(t[4:]), reverse=True)


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag named by ``ckpt_dir/latest`` (None when there is no such file); raises
    :class:`CheckpointLoadError` when its content is not a tag name."""
    latest_file = ckpt_dir / LATEST
    if not latest_file.is_file():
        return None
    fix = (f"write the tag of the checkpoint to continue from into it (e.g. step100), or pass --resume TAG "
           f"(tags here: {', '.join(reversed(_step_dirs(ckpt_dir))) or 'none'})")
    try:
        tag = latest_file.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointLoadError(f"{latest_file} is not text (not UTF-8): {fix}") from None
    if not (tag.startswith("step") and tag[4:].isdigit()):
        shown = tag if len(tag) <= 40 else tag[:40] + "..."
        raise CheckpointLoadError(f"{latest_file} does not name a checkpoint (it holds {shown!r}): {fix}")
    return tag


def read_run_state(tag_dir: Path) -> dict:
    """``tag_dir/run_state.json``; raises :class:`CheckpointLoadError` when missing or malformed."""
    path = Path(tag_dir) / RUN_STATE
    if not path.is_file():
        raise CheckpointLoadError(f"{path} is missing: {tag_dir} is not a complete checkpoint")
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        for key in ("step", "cursor", "tokens", "world_size"):
            if not isinstance(state.get(key), int):
                raise ValueError(f"no integer {key!r}")
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointLoadError(f"{path} is malformed ({err}): {tag_dir} cannot be resumed") from None
    return state


# ------------------------------------------------------------------------------ integrity manifest
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(tag_dir: Path) -> dict:
    """Write ``tag_dir/manifest.json``: size and sha256 of every other file below ``tag_dir``."""
    tag_dir = Path(tag_dir)
    files = {}
    for p in sorted(tag_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"):
            files[p.relative_to(tag_dir).as_posix()] = {"size": p.stat().st_size, "sha256": file_sha256(p)}
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    _write_atomically(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def verify_checkpoint(tag_dir: Path) -> bool:
    """Check every file of checkpoint ``tag_dir`` against its manifest. Returns False when the
    checkpoint has no manifest (saved by an older version), True when all files match; raises
    :class:`CheckpointLoadError` naming the first file that is missing, has another size or other
    bytes (sizes are compared before anything is hashed)."""
    tag_dir = Path(tag_dir)
    path = tag_dir / MANIFEST
    if not path.is_file():
        return False
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
        files = manifest["files"]
        entries = [(name, int(e["size"]), str(e["sha256"])) for name, e in files.items()]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointLoadError(f"{path} is malformed ({type(err).__name__}: {err}): the files of {tag_dir} "
                                  "cannot be verified") from None
    for name, size, _ in entries:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointLoadError(f"{path} is malformed: it lists {name!r}, outside {tag_dir}")
        f = tag_dir / name
        if not f.is_file():
            raise CheckpointLoadError(f"{f} is missing (listed in {MANIFEST})")
        actual = f.stat().st_size
        if actual != size:
            raise CheckpointLoadError(f"{f} has {actual:,} bytes, {MANIFEST} says {size:,} (truncated or "
                                      "overwritten)")
    for name, _, sha in entries:
        if file_sha256(tag_dir / name) != sha:
            raise CheckpointLoadError(f"{tag_dir / name} does not match its sha256 in {MANIFEST} (its bytes "
                                      "changed since the save: disk or copy corruption)")
    return True


def check_checkpoint(tag_dir: Path, log) -> dict:
    """Verify ``tag_dir`` (manifest, ``run_state.json``) and return its run state; raises
    :class:`CheckpointLoadError`. A checkpoint without a manifest gets a one-line warning."""
    if not verify_checkpoint(tag_dir):
        log(f"warning: checkpoint {tag_dir} has no {MANIFEST} (saved by an older version): its files are not "
            "verified")
    return read_run_state(tag_dir)


def find_resume(mode: str, ckpt_dir: Path, log=lambda m: None) -> Path | None:
    """The checkpoint directory to resume from (``mode`` is the run config's ``resume``), or None.

    Every candidate is verified (:func:`check_checkpoint`). With ``auto``/``latest`` a checkpoint
    that fails is skipped for the newest older one that passes, with one line saying which file
    failed; a named tag that fails raises :class:`CheckpointLoadError`."""
    if mode in ("none", "no", "false", ""):
        return None
    if mode in ("auto", "latest"):
        latest = read_latest(ckpt_dir)
        candidates = _step_dirs(ckpt_dir)
        if latest is not None and latest in candidates:  # `latest` first, then every other tag, newest first
            candidates = [latest] + [t for t in candidates if t != latest]
        if not candidates:
            if mode == "latest":
                raise PreflightError(f"--resume: no checkpoint in {ckpt_dir}")
            return None
        failures = []
        for tag in candidates:
            try:
                check_checkpoint(ckpt_dir / tag, log)
            except CheckpointLoadError as err:
                failures.append(str(err))
                continue
            for failed_tag, why in zip(candidates, failures):
                log(f"warning: skipping checkpoint {ckpt_dir / failed_tag}: {why}; resuming from {ckpt_dir / tag}")
            return ckpt_dir / tag
        raise CheckpointLoadError(
            f"{failures[0]}; no checkpoint in {ckpt_dir} passes verification"
            + ("" if len(failures) == 1 else " (" + "; ".join(f"{t}: {w}" for t, w in zip(candidates[1:], failures[1:])) + ")")
            + ": restore the files from a copy, or start a new run (resume=none or another output_dir)")
    path = Path(mode)
    if not path.is_dir():
        path = ckpt_dir / mode
    if not path.is_dir():
        raise PreflightError(f"--resume {mode}: no checkpoint {path}")
    try:
        check_checkpoint(path, log)
    except CheckpointLoadError as err:
        raise CheckpointLoadError(f"--resume {mode}: {err}. Resume from another checkpoint (--resume TAG, or "
                                  "--resume for the newest one that verifies)") from None
    return path


def convert_to_universal(tag_dir: Path, log) -> Path:
    """DeepSpeed's universal checkpoint of ``tag_dir`` (created once, next to it)."""
    out = tag_dir.parent / f"{tag_dir.name}_universal"
    if (out / ".complete").is_file():
        return out
    tmp = tag_dir.parent / f".{tag_dir.name}_universal.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"converting {tag_dir} to a universal checkpoint for a different world size ...")
    # ds_to_universal unpickles with weights_only=False: run it under tnl_training.safe_load.
    cmd = [sys.executable, "-m", "tnl_training.safe_load", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    shutil.copy2(tag_dir / RUN_STATE, tmp / RUN_STATE)
    (tmp / ".complete").write_text("ok\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


# ------------------------------------------------------------------------------ saving
def _write_atomically(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(text.encode("utf-8") if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ random state
def rng_state_path(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / RNG_STATE.format(rank=rank)


def rng_state_bytes() -> bytes:
    """This process's random state as a safetensors file (torch generators as uint8 tensors,
    python ``random`` and numpy's global generator as JSON metadata)."""
    from safetensors.torch import save

    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    metadata = {
        "format": RNG_STATE_FORMAT,
        "python_random": json.dumps([version, list(internal), gauss_next]),
        "numpy_random": json.dumps([kind, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)]),
    }
    return save(tensors, metadata=metadata)


def restore_rng_state(path: Path) -> None:
    """Set this process's random state from a file of :func:`rng_state_bytes`; raises
    :class:`CheckpointLoadError` naming the file when it is missing or unreadable."""
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointLoadError(f"{path} is missing: the checkpoint has no random state for this process; "
                                  "resume from another checkpoint (--resume TAG)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if metadata.get("format") != RNG_STATE_FORMAT:
            raise ValueError(f"unknown format {metadata.get('format')!r}")
        version, internal, gauss_next = json.loads(metadata["python_random"])
        kind, keys, pos, has_gauss, cached_gaussian = json.loads(metadata["numpy_random"])
        random.setstate((version, tuple(internal), gauss_next))
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
        torch.set_rng_state(tensors["torch_cpu"])
        if "torch_cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["torch_cuda"])
    except Exception as err:  # noqa: BLE001 - any unreadable content is a corrupt file
        raise CheckpointLoadError(f"{path} is corrupt ({type(err).__name__}: {err}); resume from another "
                                  "checkpoint (--resume TAG)") from None


def resume_rng_state(tag_dir: Path, run_state: dict, rank: int, same_world: bool, log) -> None:
    """Restore every rank's random state from checkpoint ``tag_dir``; all ranks raise together."""
    if RNG_STATE_KEY not in run_state:
        log(f"warning: checkpoint {tag_dir} was saved without random states; dropout and router jitter "
            "restart their random streams from the seed")
        return
    if not same_world:
        log("the world size changed: each process's random streams restart from the seed")
        return
    error = None
    try:
        restore_rng_state(rng_state_path(tag_dir, rank))
    except CheckpointLoadError as err:
        error = err
    if not _all_ranks_ok(error is None):
        raise error or CheckpointLoadError(f"another process could not restore its random state from {tag_dir} "
                                           "(see its error)")


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_free_space(ckpt_dir: Path, previous: Path | None) -> None:
    """Refuse to start a save that cannot fit: the next checkpoint is about as large as the last."""
    if previous is None or not previous.is_dir():
        return
    needed = int(directory_size(previous) * FREE_SPACE_MARGIN)
    free = shutil.disk_usage(ckpt_dir).free
    if free < needed:
        raise CheckpointSaveError(
            f"not enough free disk space in {ckpt_dir} for the next checkpoint: about {needed / 2**20:,.1f} MiB "
            f"needed (the size of {previous.name}), {free / 2**20:,.1f} MiB free")


def publish(ckpt_dir: Path, staging: Path, tag: str, state: dict) -> Path:
    """Turn a fully written staging directory into checkpoint ``tag`` (run state and manifest added)
    and point ``latest`` at it."""
    _write_atomically(staging / RUN_STATE, json.dumps(state, indent=1))
    write_manifest(staging)
    final = ckpt_dir / tag
    if final.exists():  # the same step saved again (e.g. a stop signal right after a periodic save)
        old = ckpt_dir / f".{tag}.replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    _write_atomically(ckpt_dir / LATEST, tag)
    return final


def rotate(ckpt_dir: Path, keep: int) -> None:
    """Drop all but the newest ``keep`` complete checkpoints (and their universal conversions)."""
    for old in checkpoint_tags(ckpt_dir)[:-keep]:
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        shutil.rmtree(ckpt_dir / f"{old}_universal", ignore_errors=True)


def remove_partial_saves(ckpt_dir: Path) -> None:
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob(f".step*{PARTIAL_SUFFIX}"):
            shutil.rmtree(p, ignore_errors=True)


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return f"the disk is full or a size limit was reached ({err})"
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"the checkpoint directory is not writable ({err})"
    text = str(err).strip().splitlines()
    last = text[-1] if text else ""
    if "unexpected pos" in last or "file write failed" in last:
        # torch.save reports a short write (ENOSPC / EFBIG underneath) only as a position mismatch
        return f"a file write was cut short, which means a full disk or a file-size quota (torch.save: {last})"
    return f"{type(err).__name__}: {last}"


def _all_ranks_ok(ok: bool) -> bool:
    import torch.distributed as dist

    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    return int(flag) == 0


def save_checkpoint(engine, ckpt_dir: Path, state: dict, keep: int, rank: int, log) -> Path:
    """Save checkpoint ``step{state['step']}`` of the DeepSpeed engine on every rank, atomically.

    Raises :class:`CheckpointSaveError` (naming the cause and the checkpoint that is still good)
    when any part cannot be written. A rank whose own write fails inside DeepSpeed cannot rejoin
    the other ranks' collectives, so the caller ends the run; the launcher stops the others."""
    tag = f"step{state['step']}"
    staging_tag = f".{tag}{PARTIAL_SUFFIX}"
    staging = ckpt_dir / staging_tag
    tags = checkpoint_tags(ckpt_dir)
    intact = f"the previous checkpoint {ckpt_dir / tags[-1]} is intact" if tags else "no earlier checkpoint exists"

    def failure(err: BaseException, where: str) -> CheckpointSaveError:
        return CheckpointSaveError(
            f"could not save checkpoint {tag} (rank {rank}, {where}): {_describe(err)}. Nothing was overwritten: "
            f"{intact}. Free space or fix the permissions of {ckpt_dir}, then continue with --resume.")

    error = None
    if rank == 0:
        try:
            remove_partial_saves(ckpt_dir)
            check_free_space(ckpt_dir, ckpt_dir / tags[-1] if tags else None)
        except CheckpointSaveError as err:
            error = CheckpointSaveError(f"{err}; {intact}. Free space, then continue with --resume.")
        except OSError as err:
            error = failure(err, "preparing the save")
    if not _all_ranks_ok(error is None):
        raise error or CheckpointSaveError(f"checkpoint {tag} not saved: rank 0 could not prepare it; {intact}")
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=staging_tag, client_state={"tnl": state}, save_latest=False)
    except (OSError, RuntimeError) as err:
        # any failing rank removes the staging directory: the launcher may kill rank 0 before it
        # gets here, and the other ranks' files are worthless without this rank's
        shutil.rmtree(staging, ignore_errors=True)
        raise failure(err, "writing the DeepSpeed state") from err
    try:
        _write_atomically(rng_state_path(staging, rank), rng_state_bytes())
    except OSError as err:
        error = failure(err, "writing the random state")
    if not _all_ranks_ok(error is None):  # also: every rank's file is there before rank 0 publishes
        shutil.rmtree(staging, ignore_errors=True)
        raise error or CheckpointSaveError(f"checkpoint {tag} not saved: another rank could not write its random "
                                           f"state; {intact}")
    state = {**state, RNG_STATE_KEY: RNG_STATE}
    publish_s = 0.0
    if rank == 0:
        try:
            started = time.perf_counter()
            publish(ckpt_dir, staging, tag, state)
            publish_s = time.perf_counter() - started
        except OSError as err:
            error = failure(err, "finishing the save")
            shutil.rmtree(staging, ignore_errors=True)
    if not _all_ranks_ok(error is None):
        raise error or CheckpointSaveError(f"checkpoint {tag} not saved: rank 0 could not finish it; {intact}")
    if rank == 0:
        rotate(ckpt_dir, keep)
        size = directory_size(ckpt_dir / tag)
        log(f"saved checkpoint {ckpt_dir / tag} ({size / 2**20:,.1f} MiB; {MANIFEST} hashed and written in "
            f"{publish_s:.2f} s)")
    return ckpt_dir / tag

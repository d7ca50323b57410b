"""One run per output directory.

Rank 0 holds an exclusive ``fcntl.flock`` on ``output_dir/.tnl-run.lock`` for the run's life; the
file names the holder (``host NAME pid N``). A second run on the same directory stops before doing
any work, naming that host and pid. The kernel releases a flock when its process dies, so the lock
of a run killed with SIGKILL (or a crashed machine's, on a local disk) is taken over by the next
run, which says so. A run that ends normally empties the file.

flock is reliable on local file systems; on a network file system shared by several machines it
depends on the server (NFSv4 and Lustre with ``flock`` mounts honour it).
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = ".tnl-run.lock"


class RunLockError(RuntimeError):
    """Another run holds the output directory."""


class RunLock:
    def __init__(self, path: Path, handle):
        self.path = path
        self._handle = handle

    def release(self) -> None:
        if self._handle is None:
            return
        try:
            self._handle.seek(0)
            self._handle.truncate()
            self._handle.flush()
        except OSError:
            pass
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None


def acquire_run_lock(output_dir: str | os.PathLike, log=lambda m: None) -> RunLock:
    """Lock ``output_dir`` for this process; raises :class:`RunLockError` naming the holder."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run's life
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not written its name yet"
        handle.close()
        raise RunLockError(
            f"{output_dir} is in use by another run ({holder}; lock file {path}). Wait for that run to end or stop "
            "it, or give this run another output_dir") from None
    handle.seek(0)
    previous = handle.read().strip()
    if previous:
        log(f"taking over the run lock of {path}: its holder ({previous}) ended without releasing it "
            "(killed or crashed)")
    handle.seek(0)
    handle.truncate()
    handle.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
    handle.flush()
    return RunLock(path, handle)

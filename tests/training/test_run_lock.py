"""One run per output directory: a second run on a locked output_dir stops before any work, naming
the holder's host and pid; the lock of a run killed with SIGKILL is taken over."""

import signal
import socket
import subprocess
import sys

import pytest

from tnl_training.testing import REPO, run_env, write_run_config

pytestmark = pytest.mark.slow

HOLD = """
import sys, time
from tnl_training.runlock import acquire_run_lock
lock = acquire_run_lock(sys.argv[1])  # kept: closing the file would release the lock
print("locked", flush=True)
time.sleep(600)
"""


def _holder(output_dir):
    """A process that holds the run lock of ``output_dir`` until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(output_dir)], env=run_env(), cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        raise AssertionError(f"the lock holder did not start: {line}{proc.stderr.read()[-2000:]}")
    return proc


def test_second_run_on_a_locked_directory_is_refused(prepared_corpus, tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_run_config(tmp_path / "run.yaml", prepared_corpus, output_dir=str(run_dir), max_steps=2,
                           checkpoint_interval=2, eval_interval=100, export=False)
    holder = _holder(run_dir)
    try:
        proc = subprocess.run([sys.executable, "-m", "tnl_training.pretrain", "--config", str(cfg)], env=run_env(),
                              cwd=str(REPO), capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode != 0
    assert (f"error: {run_dir} is in use by another run (host {socket.gethostname()} pid {holder.pid}; lock file "
            f"{run_dir / '.tnl-run.lock'})") in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
    from tnl_training.runlock import LOCK_FILE, RunLockError, acquire_run_lock

    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        with pytest.raises(RunLockError, match=f"pid {holder.pid}"):
            acquire_run_lock(run_dir)
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel drops the flock
        holder.wait()
    lines = []
    lock = acquire_run_lock(run_dir, lines.append)
    try:
        assert lines == [f"taking over the run lock of {run_dir / LOCK_FILE}: its holder (host {socket.gethostname()} "
                         f"pid {holder.pid}) ended without releasing it (killed or crashed)"]
        assert (run_dir / LOCK_FILE).read_text() == f"host {socket.gethostname()} pid {__import__('os').getpid()}\n"
    finally:
        lock.release()
    assert (run_dir / LOCK_FILE).read_text() == ""  # a run that ends normally leaves no holder
    acquire_run_lock(run_dir, lines.append).release()
    assert len(lines) == 1

"""One writer per run directory.

The process that writes a run directory (global rank 0) holds an exclusive OS
lock (flock) on `RUN/.lock` for the whole run, so a second launch on the same
directory stops at start-up instead of deleting the first one's partial
checkpoint and interleaving its metrics. The kernel releases the lock when the
process ends, however it ends, so a killed run never leaves a stale lock. The
file names the holder for the error message of the launch that is refused.
"""

import datetime
import fcntl
import os
import socket

from errors import UserError

LOCK_FILE = ".lock"


def lock_run_dir(run_dir):
    """Take the run directory's lock, or fail with a line naming its holder. Keep the
    returned file open for as long as the run writes the directory."""
    path = run_dir / LOCK_FILE
    try:
        lock_file = open(path, "a+")
    except OSError as e:
        raise UserError(f"{run_dir}: the run directory is not writable ({e.strerror or e}); checkpoints and "
                        "metrics are written there")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "another process"
        lock_file.close()
        raise UserError(f"{run_dir} is in use by another training run ({holder}); wait for it to end or "
                        "stop it, then resume with `latest` or `auto`")
    started = datetime.datetime.now(datetime.UTC)
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"host {socket.gethostname()}, pid {os.getpid()}, started {started:%Y-%m-%d %H:%M:%S} UTC\n")
    lock_file.flush()
    return lock_file

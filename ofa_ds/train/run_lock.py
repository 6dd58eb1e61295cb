"""One writer per run directory: `ofa-ds pretrain` holds OUT_DIR/run.lock for the run's life.

The lock is an flock on the file (released by the kernel when the holder exits, crashed or not, so a stale file is
simply taken over); the file names the holder (host, PID, start time) for the refusal a second run gets. Taken by the
launch's rank 0 before the process group starts; on filesystems without flock support the lock is skipped with a
warning rather than refusing every run.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ofa_ds.config import ConfigError

NAME = "run.lock"


class RunLock:
    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    def release(self) -> None:
        os.close(self.fd)


def acquire(out_dir: Path) -> RunLock | None:
    """The lock of out_dir, or a ConfigError naming the run that holds it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise ConfigError(
            f"{out_dir} is in use by another run ({holder}); wait for it to end or pick another out_dir"
        ) from None
    except OSError as e:
        os.close(fd)
        print(
            f"warning: {path}: cannot lock ({e.strerror}); not guarding {out_dir} against a second run", file=sys.stderr
        )
        return None
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    return RunLock(path, fd)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"host {info['host']}, PID {info['pid']}, started {info['started']}"
    except (ValueError, KeyError):
        return "holder unknown"


__all__ = ["RunLock", "acquire", "NAME"]

"""One writer per run directory (ofa_ds/train/run_lock.py)."""

import json
import os
import socket
import subprocess
import sys

import pretrain_harness as H
import pytest

from ofa_ds.config import ConfigError
from ofa_ds.train import run_lock


def test_a_second_run_on_the_same_out_dir_is_refused_naming_the_first(tmp_path, tmp_path_factory):
    data = H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")
    run = H.write_run(tmp_path, data)
    held = run_lock.acquire(tmp_path / "run")  # the first run, alive
    try:
        done = subprocess.run(
            [sys.executable, "-m", "ofa_ds.cli", "pretrain", str(run)],
            env=H.env(),
            cwd=H.ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"is in use by another run (host {socket.gethostname()}, PID {os.getpid()}, started " in done.stderr
        assert not (tmp_path / "run" / "checkpoints").exists()  # refused before it wrote anything
        with pytest.raises(ConfigError, match="in use by another run"):
            run_lock.acquire(tmp_path / "run")  # the same within one process's other open file
    finally:
        held.release()


def test_a_crashed_runs_lock_is_taken_over(tmp_path):
    lock = tmp_path / run_lock.NAME
    lock.write_text(json.dumps({"host": "gone", "pid": 999999, "started": "yesterday"}))  # no process holds it
    taken = run_lock.acquire(tmp_path)
    assert taken is not None
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    taken.release()

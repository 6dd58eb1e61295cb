"""SIGTERM to the launch script's PID alone (a user's `kill`, some schedulers) reaches every rank: the run saves its
stop checkpoint and ends (DeepSpeed's runner alone passes signals on only to ranks it started over ssh)."""

import os
import signal
import subprocess
import time

import pretrain_harness as H
import pytest


@pytest.mark.slow
def test_sigterm_to_the_launch_script_saves_a_stop_checkpoint(tmp_path, tmp_path_factory):
    data = H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")
    run = H.write_run(tmp_path, data, train={"steps": 500, "save_every": 1000, "global_batch": 4, "micro_batch": 2})
    env = {**H.env(), "NPROC": "2", "MASTER_PORT": str(H.free_port())}
    script = subprocess.Popen(
        ["bash", str(H.ROOT / "launch" / "single_node.sh"), str(run)],
        env=env,
        cwd=H.ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        metrics = tmp_path / "run" / "metrics.jsonl"
        deadline = time.time() + 600  # the first launch on a machine builds DeepSpeed's CPU comm op
        while not (metrics.is_file() and len(H.metrics(tmp_path / "run")) >= 2):
            assert script.poll() is None and time.time() < deadline, "the run ended or never started"
            time.sleep(1)
        os.kill(script.pid, signal.SIGTERM)  # the script alone, not its process group
        out, _ = script.communicate(timeout=300)
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
    assert "SIGTERM received, saving a checkpoint" in out, out[-3000:]
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest.startswith("step_") and int(latest[len("step_") :]) >= 2
    assert max(H.metrics(tmp_path / "run")) < 500  # it stopped, not finished

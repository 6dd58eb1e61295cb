"""Two nodes simulated on one machine: launch/multi_node.sh twice (the deepspeed launcher with --no_ssh and
--node_rank), one rank each, rendezvous at 127.0.0.1; validation runs across both."""
import subprocess

import pretrain_harness as H
import pytest


@pytest.mark.slow
def test_two_node_launch_trains(tmp_path, tmp_path_factory):
    data = H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")
    run = H.write_run(tmp_path, data, val_corpus=data["corpus"],
                      train={"steps": 2, "global_batch": 4, "micro_batch": 2, "save_every": 2, "eval_every": 2,
                             "eval_batches": 1})
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two simulated nodes\nnode-a slots=1\nnode-b slots=1\n")
    port = H.free_port()
    nodes = []
    for rank in (0, 1):
        env = {**H.env(), "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        nodes.append(subprocess.Popen(["bash", str(H.ROOT / "launch" / "multi_node.sh"), str(hostfile), str(run)],
                                      env=env, cwd=H.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in nodes]  # the first launch on a machine JIT-builds a DeepSpeed op
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(outs)
    assert "2 data-parallel rank(s) on 2 node(s)" in outs[0]
    assert sorted(H.metrics(tmp_path / "run")) == [1, 2]
    assert sorted(H.metrics(tmp_path / "run", "val/loss")) == [0, 2]  # before training, then every 2 updates
    assert H.metrics(tmp_path / "run", "val/nll/caption") and H.metrics(tmp_path / "run", "perf/mfu")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000002"

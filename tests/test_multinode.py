"""Two nodes simulated on one machine: launch/multi_node.sh twice (the deepspeed launcher with --no_ssh and
--node_rank), one rank each, rendezvous at 127.0.0.1; validation runs across both."""

import subprocess

import pretrain_harness as H
import pytest


@pytest.mark.slow
def test_two_node_launch_trains(tmp_path, tmp_path_factory):
    data = H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")
    run = H.write_run(
        tmp_path,
        data,
        val_corpus=data["corpus"],
        train={"steps": 2, "global_batch": 4, "micro_batch": 2, "save_every": 2, "eval_every": 2, "eval_batches": 1},
    )
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two simulated nodes\nnode-a slots=1\nnode-b slots=1\n")
    port = H.free_port()
    nodes = []
    for rank in (0, 1):
        env = {**H.env(), "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        nodes.append(
            subprocess.Popen(
                ["bash", str(H.ROOT / "launch" / "multi_node.sh"), str(hostfile), str(run)],
                env=env,
                cwd=H.ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=600)[0] for p in nodes]  # the first launch on a machine JIT-builds a DeepSpeed op
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(outs)
    assert "TP 1 x PP 1 x DP 2 = 2 rank(s) on 2 node(s)" in outs[0]
    assert sorted(H.metrics(tmp_path / "run")) == [1, 2]
    assert sorted(H.metrics(tmp_path / "run", "val/loss")) == [0, 2]  # before training, then every 2 updates
    assert H.metrics(tmp_path / "run", "val/nll/caption") and H.metrics(tmp_path / "run", "perf/mfu")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000002"


@pytest.mark.slow
def test_two_node_tensor_parallel_matches_one_node(tmp_path, tmp_path_factory):
    """TP=2 x DP=2 over two simulated nodes of 2 ranks (launch/multi_node.sh with --no_ssh and --node_rank): the
    launcher numbers node 0's ranks 0-1 and node 1's 2-3, and TP groups are consecutive ranks (groups.py), so each
    TP group is inside a node and DP runs across them. Same losses as the layout on one node."""
    import test_parallel_training as P

    base = tmp_path_factory.getbasetemp()
    one_node = P.layout_run(base, "tp2_dp2_zero3")
    run = P.write(tmp_path, H.tiny_data(base / "tiny_data"), "tp2_dp2_zero3")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    port = H.free_port()
    nodes = []
    for rank in (0, 1):
        env = {**H.env(), "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        nodes.append(
            subprocess.Popen(
                ["bash", str(H.ROOT / "launch" / "multi_node.sh"), str(hostfile), str(run)],
                env=env,
                cwd=H.ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=900)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(outs)
    assert "TP 2 x PP 1 x DP 2 = 4 rank(s) on 2 node(s) of 2" in outs[0]
    got, want = H.metrics(tmp_path / "run"), H.metrics(one_node / "run")
    assert got.keys() == want.keys() == set(range(1, 7))
    assert all(abs(got[k] - want[k]) <= 1e-5 for k in want), (got, want)

"""What ranks must agree on: the kernels they run, and the ranks a sync BatchNorm spans."""

import pretrain_harness as H
import pytest


@pytest.mark.slow
def test_ranks_on_different_kernels_stop_with_the_reason(tmp_path, tmp_path_factory):
    data = H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")
    run = H.write_run(tmp_path, data, train={"steps": 2, "global_batch": 4, "micro_batch": 2})
    # rank 1's node forces another attention backend (as a node whose Triton or CUDA extension differs would)
    codes, out = H.launch(2, [str(run)], rank_env={1: {"OFA_DS_ATTENTION": "reference"}})
    assert codes == [1, 1], out
    assert "ranks would run different kernels" in out
    assert (
        "rank 0 on " in out and ": attention sdpa, resnet torch" in out and ": attention reference, resnet torch" in out
    )
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_sync_node_batch_norm_spans_the_ranks_of_a_node(tmp_path, tmp_path_factory):
    """sync and sync_node on one host are the same statistics; with a node per rank, sync_node is per rank."""
    data = H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")
    losses = {}
    for name, mode, harness in [
        ("sync", "sync", []),
        ("node", "sync_node", []),
        ("node_per_rank", "sync_node", ["--fake-host"]),
    ]:
        run = H.write_run(
            tmp_path / name,
            data,
            train={"steps": 2, "global_batch": 4, "micro_batch": 2},
            model_overrides={**H.TINY_MODEL, "vocab_size": data["vocab"], "bn_mode": mode},
        )
        codes, out = H.launch(2, [str(run)], harness=harness)
        assert codes == [0, 0], out
        assert f"bn {mode}" in out
        losses[name] = H.metrics(tmp_path / name / "run")
    assert losses["node"] == losses["sync"]
    assert losses["node_per_rank"][1] != losses["sync"][1]

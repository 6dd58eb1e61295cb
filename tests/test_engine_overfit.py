"""The engine can fit: one fixed micro-batch, repeated, loses at least 90% of its loss."""

import pretrain_harness as H
import pytest


@pytest.mark.slow
def test_overfitting_a_fixed_tiny_batch(tmp_path, tmp_path_factory):
    data = H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")
    ds = {
        **H.DS_FP32_ZERO3,
        "optimizer": {"type": "AdamW", "params": {**H.DS_FP32_ZERO3["optimizer"]["params"], "lr": 5e-3}},
    }
    run = H.write_run(
        tmp_path,
        data,
        ds=ds,
        train={"steps": 50, "global_batch": 2, "micro_batch": 2, "end_lr": 5e-3, "save_every": 50},
    )
    codes, out = H.launch(1, [str(run)], harness=["--fixed-batch"])
    assert codes == [0], out
    loss = H.metrics(tmp_path / "run")
    assert loss[50] <= 0.1 * loss[1], (loss[1], loss[50])

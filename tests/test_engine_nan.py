"""A NaN loss stops the run without saving: `latest` stays on the last good checkpoint."""

import pretrain_harness as H
import pytest


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tmp_path_factory):
    data = H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")
    run = H.write_run(tmp_path, data, train={"steps": 4, "global_batch": 2, "micro_batch": 2, "save_every": 2})
    codes, out = H.launch(1, [str(run)], harness=["--fault", "nan@3"])
    assert codes == [1], out
    assert "ofa-ds pretrain: step 3: non-finite loss nan" in out and "last good checkpoint: step_00000002" in out
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000002"]
    assert sorted(H.metrics(tmp_path / "run")) == [1, 2]

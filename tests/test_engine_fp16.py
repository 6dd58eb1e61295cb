"""fp16: an update the loss scaler skips still counts; the lr schedule, the step and the data stay together."""

import json

import pretrain_harness as H
import pytest

from ofa_ds.train.schedule import lr_at

# fp16 with DeepSpeed's dynamic loss scale (as configs/ds/fp16_zero3.json), ZeRO-3
DS_FP16 = {
    **H.DS_FP32_ZERO3,
    "fp16": {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 7,
        "loss_scale_window": 128,
        "hysteresis": 1,
        "min_loss_scale": 1,
    },
}


@pytest.mark.slow
def test_a_skipped_fp16_update_keeps_the_lr_schedule_in_step(tmp_path, tmp_path_factory):
    data = H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")
    train = {"steps": 5, "global_batch": 2, "micro_batch": 2, "save_every": 5, "warmup_ratio": 0.4}
    run = H.write_run(tmp_path, data, ds=DS_FP16, train=train)
    record = tmp_path / "lr.jsonl"
    # update 2's gradients overflow fp16: the loss scaler halves the scale and DeepSpeed skips the update
    codes, out = H.launch(1, [str(run)], harness=["--cpu-fp16", "--fault", "overflow@2", "--record-lr", str(record)])
    assert codes == [0], out
    scale = H.metrics(tmp_path / "run", "train/loss_scale")
    assert scale[1] == 128 and scale[2] == 64, scale
    assert H.metrics(tmp_path / "run", "train/skipped_updates") == {1: 0, 2: 1, 3: 1, 4: 1, 5: 1}
    applied = [json.loads(line) for line in record.read_text().splitlines()]  # [update, lr the optimizer used]
    want = {t: lr_at(t, peak=1e-4, steps=5, warmup_ratio=0.4, power=1.0, end_lr=0.0) for t in (1, 3, 4, 5)}
    assert {t: lr for t, lr in applied} == pytest.approx(want), applied
    assert H.metrics(tmp_path / "run", "train/lr") == pytest.approx(
        {**want, 2: lr_at(2, peak=1e-4, steps=5, warmup_ratio=0.4, power=1.0, end_lr=0.0)}
    )
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000005"

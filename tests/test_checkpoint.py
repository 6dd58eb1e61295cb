"""Checkpoints: complete-before-`latest`, retention, RNG round trip; interrupted runs resume bit-identically."""

import json
import random
from pathlib import Path

import numpy as np
import pretrain_harness as H
import pytest
import torch
import torch.distributed as dist

from ofa_ds.config import ConfigError
from ofa_ds.train import checkpoint


class FakeEngine:
    """Writes one file per save like DeepSpeed's save_checkpoint; can fail half-way."""

    def __init__(self):
        self.fail = False

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest  # ofa-ds writes `latest` itself, after the checkpoint is complete
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save(client_state, d / "model_states.pt")
        if self.fail:
            raise OSError("disk full")


@pytest.fixture
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_latest_moves_only_to_complete_checkpoints_and_old_ones_are_pruned(tmp_path, group):
    eng, ckpt = FakeEngine(), tmp_path / "checkpoints"
    for step in (2, 4, 6):
        checkpoint.save(eng, ckpt, {"step": step}, keep_last=2)
    assert (ckpt / "latest").read_text() == "step_00000006"
    assert [p.name for p in checkpoint.complete_tags(ckpt)] == ["step_00000004", "step_00000006"]
    eng.fail = True
    with pytest.raises(OSError):
        checkpoint.save(eng, ckpt, {"step": 8}, keep_last=2)
    assert (ckpt / "latest").read_text() == "step_00000006"  # the broken step_00000008 is never pointed to
    assert (ckpt / "step_00000008").is_dir() and not (ckpt / "step_00000008" / "meta.json").exists()
    assert checkpoint.find(tmp_path) == ckpt / "step_00000006"
    with pytest.raises(ConfigError, match="step_00000008: incomplete checkpoint"):
        checkpoint.find(ckpt / "step_00000008")
    eng.fail = False
    checkpoint.save(eng, ckpt, {"step": 8}, keep_last=2)  # replaces the partial directory
    assert json.loads((ckpt / "step_00000008" / "meta.json").read_text()) == {"step": 8}
    assert [p.name for p in checkpoint.complete_tags(ckpt)] == ["step_00000006", "step_00000008"]


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    want = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand(7)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(want[0], got[0]) and want[1:] == got[1:]


def test_config_diffs_name_nested_keys():
    old = {"train": {"steps": 10, "lr_power": 1.0}, "out_dir": "a"}
    new = {"train": {"steps": 20, "lr_power": 1.0}, "out_dir": "a", "init_from": None}
    assert checkpoint.config_diffs(old, new) == ["train.steps: 10 -> 20"]


# ------------------------------------------------------------------------------------------------ interrupted runs


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["default", "partitioned"])
def test_interrupted_runs_resume_bit_identically(variant, tmp_path, tmp_path_factory):
    """OFA's dropout and drop-path on, per-rank BatchNorm, 2 loader workers per rank: SIGKILLed after a checkpoint,
    resumed and signalled, resumed and killed while writing a checkpoint, resumed again: the same losses and weights
    as the uninterrupted reference run (no workers), bit for bit."""
    base = tmp_path_factory.getbasetemp()
    data = H.tiny_data(base / "tiny_data")
    ref = H.reference_run(base, data, variant)
    run = H.write_run(tmp_path, data, ds=H.THRESHOLDS[variant], train={"steps": 4, "save_every": 2, "keep_last": 3})
    args = [str(run), "--init-from", str(ref / "init.safetensors"), "--set", "data.num_workers=2"]
    ckpt = tmp_path / "run" / "checkpoints"

    # 1. SIGKILL to every rank after update 3 (a lost node): checkpoint 2 stays `latest`, update 3 is lost
    codes, out = H.launch(2, args, harness=["--fault", "kill@3"])
    assert codes == [-9, -9], out
    assert (ckpt / "latest").read_text() == "step_00000002"

    # 2. resumes from 2; SIGTERM (as Slurm or the launcher sends it) after update 3: saves 3, exits cleanly
    codes, out = H.launch(2, [*args, "--resume"], harness=["--fault", "sigterm@3"])
    assert codes == [0, 0], out
    assert f"resuming at 2 from {ckpt / 'step_00000002'}" in out and "SIGTERM received" in out
    assert (ckpt / "latest").read_text() == "step_00000003"

    # 3. resumes from 3; SIGKILL to every rank while rank 0 writes its ZeRO shard of checkpoint 4: 3 stays `latest`
    codes, out = H.launch(2, [*args, "--resume"], harness=["--fault", "crash-in-save@4"])
    assert codes == [-9, -9], out
    assert (ckpt / "latest").read_text() == "step_00000003"
    partial = ckpt / "step_00000004"
    assert any(partial.glob("*optim_states.pt")) and not (partial / "meta.json").exists()

    # 4. resumes from 3 and finishes
    codes, out = H.launch(2, [*args, "--resume"], harness=["--dump-weights", str(tmp_path / "live.pt")])
    assert codes == [0, 0], out
    assert f"resuming at 3 from {ckpt / 'step_00000003'}" in out
    assert H.metrics(tmp_path / "run") == H.metrics(ref / "run")  # every update's loss, bit for bit
    live, want = torch.load(tmp_path / "live.pt", weights_only=True), torch.load(ref / "live.pt", weights_only=True)
    assert live.keys() == want.keys()
    assert [k for k in want if not torch.equal(live[k], want[k])] == []  # parameters and rank 0's buffers
    assert [p.name for p in checkpoint.complete_tags(ckpt)] == ["step_00000002", "step_00000003", "step_00000004"]

"""A checkpoint file never runs code: a pickle payload in any position of a checkpoint directory is refused, naming
the file, by `ofa-ds export`, `ofa-ds to-universal`, `ofa-ds pretrain --resume` and DeepSpeed's checkpoint engine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pretrain_harness as H
import pytest
import torch

from ofa_ds.model.convert import CheckpointError, load_safetensors
from ofa_ds.train import safe_load


class Payload:
    """Unpickling this runs `touch MARKER` (os.system), as a planted checkpoint would run anything."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def poison(path, marker) -> None:
    torch.save({"module": {"weight": torch.zeros(2)}, "payload": Payload(marker)}, path)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "ofa_ds.cli", *args],
        env=H.env(),
        cwd=H.ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _copy(src, tmp_path):
    dst = tmp_path / "checkpoints" / src.name
    shutil.copytree(src, dst)
    (dst.parent / "latest").write_text(src.name)
    return dst


POSITIONS = [
    "zero_pp_rank_0_mp_rank_00_model_states.pt",
    "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "rng_rank00001.pt",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", POSITIONS)
def test_a_poisoned_file_is_refused_and_never_run(name, tmp_path, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    ref = H.reference_run(base, H.tiny_data(base / "tiny_data"))
    tag = _copy(ref / "run" / "checkpoints" / "step_00000004", tmp_path)
    marker = tmp_path / "ran"
    poison(tag / name, marker)
    for args in (
        ["export", str(tag), str(tmp_path / "out.safetensors")],
        ["to-universal", str(tag)],
        ["pretrain", str(ref / "run.yaml"), "--resume", str(tag), "--out-dir", str(tmp_path / "resumed")],
    ):
        done = _cli(*args)
        assert done.returncode != 0, (args, done.stdout[-2000:])
        assert f"{tag / name}: refused" in done.stderr and "Traceback" not in done.stderr, (args, done.stderr[-3000:])
        assert not marker.exists(), args
    # DeepSpeed's own loads go through the engine's checkpoint engine, which is the safe load
    with pytest.raises(CheckpointError, match="refused"):
        safe_load.SafeCheckpointEngine().load(str(tag / name))
    assert not marker.exists()


@pytest.mark.slow
def test_a_poisoned_pipeline_layer_file_is_refused(tmp_path, tmp_path_factory):
    import test_parallel_training as P

    run = P.layout_run(tmp_path_factory.getbasetemp(), "pp2_zero1") / "run"
    src = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    tag = _copy(src, tmp_path)
    layer = sorted(tag.glob("layer_*-model_states.pt"))[1]
    marker = tmp_path / "ran"
    poison(layer, marker)
    done = _cli("export", str(tag), str(tmp_path / "out.safetensors"))
    assert done.returncode == 2 and f"{layer}: refused" in done.stderr and "Traceback" not in done.stderr
    assert not marker.exists()


def test_the_checkpoint_types_deepspeed_writes_are_allowed(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "ok.pt"
    torch.save({"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0), "t": torch.ones(3)}, path)
    safe_load.check(tmp_path)
    got = safe_load.load(path)
    assert got["zero_stage"] == ZeroStageEnum.weights and got["t"].equal(torch.ones(3))


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, b"garbage that is not a zip", b'{"a": 1}'])
def test_unreadable_files_are_named(content, tmp_path):
    bad = tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a readable checkpoint file"):
        safe_load.check(tmp_path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint file"):
        safe_load.load(bad)
    sft = tmp_path / "model.safetensors"
    sft.write_bytes(content)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_safetensors(sft)

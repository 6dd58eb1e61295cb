"""ZeRO-3 checkpoint -> consolidated safetensors (and OFA's format) -> model: the trained weights, exactly."""

import pretrain_harness as H
import pytest
import torch

from ofa_ds.cli import main
from ofa_ds.model.convert import load_any
from ofa_ds.model.ofa import OFAModel


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["default", "partitioned"])
def test_export_round_trip_reproduces_the_trained_weights(variant, tmp_path, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    ref = H.reference_run(base, H.tiny_data(base / "tiny_data"), variant)
    live = torch.load(ref / "live.pt", weights_only=True)  # gathered from the engine after the last update

    assert main(["export", str(ref / "run"), str(tmp_path / "model.safetensors"), str(tmp_path / "ofa.pt")]) == 0
    cfg, sd = load_any(tmp_path / "model.safetensors")
    model = OFAModel(cfg)
    model.load_state_dict(sd)
    got = model.state_dict()
    assert got.keys() == live.keys()
    assert all(torch.equal(got[k], live[k]) for k in live)

    cfg_ofa, sd_ofa = load_any(tmp_path / "ofa.pt")  # OFA's fairseq layout, read back through the converter
    assert cfg_ofa.embed_dim == cfg.embed_dim and cfg_ofa.vocab_size == cfg.vocab_size
    assert sd_ofa.keys() == sd.keys() and all(torch.equal(sd_ofa[k], sd[k]) for k in sd)

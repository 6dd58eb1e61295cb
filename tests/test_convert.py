"""`ofa-ds convert`: OFA .pt <-> ofa_ds .safetensors, vocabulary fitting, unreadable files."""

import pytest
import torch
from conftest import ASSETS

from ofa_ds.cli import main
from ofa_ds.model.convert import (
    CheckpointError,
    load_any,
    load_ofa_checkpoint,
    load_strict,
    ofa_to_ofa_ds,
    resize_vocab,
)
from ofa_ds.model.ofa import OFAModel

CKPT = ASSETS / "ofa_small_ref" / "ofa_small_ref_checkpoint.pt"


def test_cli_round_trip(tmp_path):
    assert main(["convert", str(CKPT), str(tmp_path / "m.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "back.pt")]) == 0
    orig = load_ofa_checkpoint(CKPT)["model"]
    back = load_ofa_checkpoint(tmp_path / "back.pt")
    for k, v in orig.items():
        assert back["model"][k].dtype == v.dtype and torch.equal(back["model"][k], v), k
    assert back["cfg"]["model"]["encoder_layers"] == 2
    cfg, sd = load_any(tmp_path / "m.safetensors")
    load_strict(OFAModel(cfg), {k: v.float() if v.is_floating_point() else v for k, v in sd.items()})


def test_vocab_fitting():
    cfg, sd = load_any(CKPT)
    bigger = resize_vocab(sd, 2100)["embed_tokens.weight"]
    assert bigger.shape == (2100, 256) and torch.equal(bigger[:2000], sd["embed_tokens.weight"])
    assert resize_vocab(sd, 1999)["embed_tokens.weight"].shape == (1999, 256)  # one larger: last row dropped
    with pytest.raises(CheckpointError, match="2000 rows, more than the tokenizer's 1500"):
        resize_vocab(sd, 1500)


class Opaque:  # not an allowed global for the weights-only unpickler
    pass


def test_unreadable_checkpoint_names_the_file(tmp_path):
    torch.save({"model": {}, "extra": Opaque()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt: cannot be read with torch.load"):
        load_ofa_checkpoint(tmp_path / "evil.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="list.pt: not a fairseq checkpoint"):
        load_ofa_checkpoint(tmp_path / "list.pt")


def test_fused_in_proj_checkpoint_converts_like_separate_projections():
    """BART-style checkpoints store q/k/v as one in_proj_weight/bias; OFA's loader splits them into thirds."""
    sd = load_ofa_checkpoint(CKPT)["model"]
    fused = dict(sd)
    for k in [k for k in sd if k.endswith(".q_proj.weight") or k.endswith(".q_proj.bias")]:
        base, kind = k.rsplit(".q_proj.", 1)
        fused[f"{base}.in_proj_{kind}"] = torch.cat([fused.pop(f"{base}.{p}_proj.{kind}") for p in "qkv"])
    assert any("encoder_attn.in_proj_weight" in k for k in fused)
    want, got = ofa_to_ofa_ds(sd), ofa_to_ofa_ds(fused)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

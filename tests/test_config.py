"""Presets, parameter counts (OFA_SPEC 2.2), config round trips and config errors."""

import pytest
import torch

from ofa_ds.config import PRESETS, ConfigError, ModelConfig, load_dict, model_preset, save_dict
from ofa_ds.model.ofa import OFAModel

# tiny..huge: OFA_SPEC 2.2 exactly (V = 59,457, tied embedding once, ResNet included, buffers excluded).
# Beyond huge: this project's presets, as listed in the README.
PARAMS = {
    "ofa_tiny": 33_488_336,
    "ofa_medium": 92_892_000,
    "ofa_base": 182_238_536,
    "ofa_large": 472_977_152,
    "ofa_huge": 929_486_848,
    "ofa_1.5b": 1_485_445_512,
    "ofa_3b": 3_064_550_800,
    "ofa_7b": 7_111_463_088,
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_count(name):
    with torch.device("meta"):
        model = OFAModel(model_preset(name))
    assert model.num_parameters() == PARAMS[name]


def test_presets_are_listed():
    assert list(PRESETS) == list(PARAMS)


def test_pretraining_configuration():
    cfg = model_preset("ofa_huge")
    assert (cfg.embed_dim, cfg.ffn_dim, cfg.heads, cfg.head_dim, cfg.encoder_layers, cfg.decoder_layers) == (
        1280,
        5120,
        16,
        80,
        24,
        12,
    )
    assert (cfg.token_bucket_size, cfg.image_bucket_size, cfg.max_positions, cfg.attn_scale_factor) == (
        256,
        42,
        1024,
        2,
    )
    assert (cfg.dropout, cfg.encoder_drop_path, cfg.decoder_drop_path, cfg.vocab_size) == (0.1, 0.1, 0.1, 59457)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    cfg = model_preset("ofa_base", bn_mode="frozen", dropout=0.0)
    save_dict(cfg.to_dict(), tmp_path / f"m{suffix}")
    assert ModelConfig.from_dict(load_dict(tmp_path / f"m{suffix}")) == cfg


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="ofa_tiny, ofa_medium, ofa_base, ofa_large, ofa_huge"):
        model_preset("ofa_gigantic")


@pytest.mark.parametrize(
    "bad, msg",
    [
        ({"embed_dims": 256}, "unknown key.*embed_dims"),
        ({"heads": "4"}, r"model.heads: expected int"),
        ({"embed_dim": 256, "heads": 3}, "heads=3 does not divide model.embed_dim=256"),
        ({"resnet": "resnet200"}, "valid: resnet18"),
        ({"bn_mode": "group"}, "valid: batch, sync, sync_node, frozen"),
    ],
)
def test_bad_config(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig.from_dict(bad)


def test_syntax_errors_are_one_line_with_file_line_and_column(tmp_path):
    import subprocess
    import sys

    from ofa_ds.config import load_dict

    bad = tmp_path / "run.yaml"
    bad.write_text("model: ofa_tiny\ntrain: {steps: 3\ncorpus: x\n")
    with pytest.raises(ConfigError, match=rf"^{bad}:3:7: YAML syntax: expected ',' or '}}'"):
        load_dict(bad)
    bad_json = tmp_path / "run.json"
    bad_json.write_text('{"model": "ofa_tiny",}')
    with pytest.raises(ConfigError, match=rf"^{bad_json}:1:22: Expecting property name"):
        load_dict(bad_json)
    good = tmp_path / "good.yaml"
    good.write_text("model: ofa_tiny\ncorpus: x\n")
    out = subprocess.run(
        [sys.executable, "-m", "ofa_ds.cli", "pretrain", str(good), "--set", "train={steps: 3"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().endswith(
        "--set train:1:10: YAML syntax: expected ',' or '}', but got '<stream end>' (while parsing a flow mapping)"
    ), out.stderr

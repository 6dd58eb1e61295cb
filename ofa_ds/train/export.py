"""`ofa-ds export CHECKPOINT OUT...`: a pretraining checkpoint as one consolidated model file.

    ofa-ds export runs/quickstart model.safetensors              # ofa_ds (loads with init_from / convert)
    ofa-ds export runs/quickstart/checkpoints/step_00000200 ofa.pt  # OFA's fairseq layout (loads in OFA's code)

CHECKPOINT is a run directory (its `latest`), its checkpoints/ or one step_* directory. The weights are
the fp32 master weights gathered from the ZeRO shards (DeepSpeed's zero_to_fp32), with the model's
buffers; the model config comes from the checkpoint's meta.json. Needs no process group or GPU.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ofa_ds.config import ModelConfig


def add_arguments(p) -> None:
    p.add_argument("checkpoint", type=Path, help="run directory, its checkpoints/, or a step_* directory")
    p.add_argument("out", type=Path, nargs="+", help="output file(s): .safetensors (ofa_ds) or .pt (OFA)")


def consolidated_state_dict(tag_dir: Path) -> tuple[ModelConfig, dict]:
    """(model config, full fp32 state dict) of a complete checkpoint directory."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from ofa_ds.model.convert import check_keys
    from ofa_ds.model.ofa import OFAModel
    from ofa_ds.train.checkpoint import read_meta

    cfg = ModelConfig.from_dict(read_meta(tag_dir)["model"])
    sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    with torch.device("meta"):
        check_keys(OFAModel(cfg).state_dict(), sd)
    return cfg, sd


def run(args) -> int:
    from ofa_ds.model.convert import save_ofa_checkpoint, save_safetensors
    from ofa_ds.train.checkpoint import find

    for out in args.out:
        if out.suffix not in (".safetensors", ".pt"):
            raise SystemExit(f"{out}: output must end in .safetensors (ofa_ds) or .pt (OFA)")
    tag_dir = find(args.checkpoint)
    cfg, sd = consolidated_state_dict(tag_dir)
    for out in args.out:
        (save_safetensors if out.suffix == ".safetensors" else save_ofa_checkpoint)(sd, cfg, out)
        print(f"{tag_dir} -> {out}")
    return 0

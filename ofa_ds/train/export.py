"""`ofa-ds export CHECKPOINT OUT...`: a pretraining checkpoint as one consolidated model file.

    ofa-ds export runs/quickstart model.safetensors              # ofa_ds (loads with init_from / convert)
    ofa-ds export runs/quickstart/checkpoints/step_00000200 ofa.pt  # OFA's fairseq layout (loads in OFA's code)

CHECKPOINT is a run directory (its `latest`), its checkpoints/ or one step_* directory. The weights are
the fp32 master weights gathered from the ZeRO shards (DeepSpeed's zero_to_fp32) and, for a tensor-parallel run,
joined over the TP ranks, with the model's buffers; the model config comes from the checkpoint's meta.json. Needs
no process group or GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ofa_ds.config import ConfigError, ModelConfig
from ofa_ds.model.convert import CheckpointError

MASTER = "fp32"
OPTIM_SUFFIX = "_optim_states.pt"


def add_arguments(p) -> None:
    p.add_argument("checkpoint", type=Path, help="run directory, its checkpoints/, or a step_* directory")
    p.add_argument("out", type=Path, nargs="+", help="output file(s): .safetensors (ofa_ds) or .pt (OFA)")


def consolidated_state_dict(tag_dir: Path, state: str = MASTER) -> tuple[ModelConfig, dict]:
    """(model config, full fp32 state dict) of a complete checkpoint directory, from any layout: DeepSpeed's
    zero_to_fp32 gathers the fp32 master weights of each model-parallel rank (a pipeline stage's TP rank), pipeline
    names are mapped back to the model's, then the TP shares are joined (parallel/tensor.py) and the vocabulary's
    padding is dropped. With `state` an optimizer state's key ("exp_avg"), that state of every parameter instead
    (the optimizer's flat partitions are laid out as the master weights' are), without buffers."""
    from ofa_ds.model.convert import check_keys
    from ofa_ds.model.ofa import OFAModel
    from ofa_ds.parallel.pipeline import layer_prefixes, source_name
    from ofa_ds.parallel.tensor import unshard
    from ofa_ds.train.checkpoint import read_meta

    meta = read_meta(tag_dir)
    cfg = ModelConfig.from_dict(meta["model"])
    layout = meta["config"].get("parallel", {})
    tp, pp = layout.get("tensor", 1), layout.get("pipeline", 1)
    parts = [{} for _ in range(tp)]
    for mp in range(tp * pp):  # DeepSpeed's model-parallel rank of stage s, TP rank t: s * tp + t
        sd = _model_parallel_rank(tag_dir, mp, tp * pp, mp % tp if pp > 1 else None, state)
        if pp > 1:
            prefixes = layer_prefixes(cfg)
            sd = {source_name(k, prefixes): v for k, v in sd.items()}
        parts[mp % tp].update(sd)
    with torch.device("meta"):
        model = OFAModel(cfg)
    want = model.state_dict() if state == MASTER else dict(model.named_parameters())
    sd = {k: unshard(k, [p[k] for p in parts], cfg.vocab_size) for k in parts[0] if k in want}
    check_keys(want, sd)
    return cfg, sd


def _model_parallel_rank(tag_dir: Path, mp: int, mp_size: int, pipeline_tp_rank: int | None, state: str) -> dict:
    """One model-parallel rank's fp32 state dict: zero_to_fp32 over a directory that holds that rank's files alone
    (DeepSpeed names them ..._mp_rank_RR_...; zero_to_fp32 reads every file it finds). A pipeline checkpoint keeps
    the module's tensors in per-layer files (layer_LL-model_TT-model_states.pt); zero_to_fp32 takes the buffers
    from the model-states file, so the view's copy of it gets them from there. For an optimizer state, the view's
    optimizer files hold that state where zero_to_fp32 reads the master weights."""
    import tempfile

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from ofa_ds.train.safe_load import load, safe_torch_load

    if mp_size == 1 and state == MASTER:
        with safe_torch_load():
            return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    with tempfile.TemporaryDirectory() as tmp:
        view = Path(tmp) / tag_dir.name
        view.mkdir()
        for f in tag_dir.glob(f"*mp_rank_{mp:02d}_*.pt"):
            if state != MASTER and f.name.endswith(OPTIM_SUFFIX):
                _save_as_master(f, view / f.name, state)
            else:
                (view / f.name).symlink_to(f.resolve())
        if pipeline_tp_rank is not None:
            states = view / f"mp_rank_{mp:02d}_model_states.pt"
            model_states = load(states)
            model_states["module"] = _pipeline_tensors(tag_dir, pipeline_tp_rank)
            states.unlink()
            torch.save(model_states, states)
        with safe_torch_load():
            return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=tag_dir.name)


def optimizer_files(tag_dir: Path) -> list[Path]:
    return sorted(tag_dir.glob("*" + OPTIM_SUFFIX))


def read_optimizer_file(path: Path) -> tuple[dict, str, dict]:
    """(file contents, the key of the master weights' flat partitions in its optimizer_state_dict, the optimizer's
    state per partition) of one ZeRO optimizer-states file. ZeRO-1/2 keep the partitions without their alignment
    padding and the optimizer's state with it (at the end); ZeRO-3 both whole."""
    from ofa_ds.train.safe_load import load

    sd = load(path, map_location="cpu")
    osd = sd["optimizer_state_dict"]
    if int(osd["zero_stage"]) == 3:
        key, base = "fp32_flat_groups", osd["optimizer_state_dict"]
    else:
        key, base = "single_partition_of_fp32_groups", osd["base_optimizer_state"]
    states = base["state"] if isinstance(base, dict) else dict(enumerate(base))
    return sd, key, states


def _save_as_master(src: Path, dst: Path, state: str) -> None:
    sd, key, states = read_optimizer_file(src)
    osd = sd["optimizer_state_dict"]
    osd[key] = [states[i][state][: flat.numel()] for i, flat in enumerate(osd[key])]
    torch.save(sd, dst)


def _pipeline_tensors(tag_dir: Path, tp_rank: int) -> dict:
    """A TP rank's layer files' tensors under the pipeline module's names ("L.name"; layer 0 is the tied
    embedding)."""
    from ofa_ds.parallel.pipeline import TIED
    from ofa_ds.train.safe_load import load

    out = {}
    for f in sorted(tag_dir.glob(f"layer_*-model_{tp_rank:02d}-model_states.pt")):
        index = int(f.name.split("-")[0][len("layer_") :])
        prefix = TIED if index == 0 else f"{index}."
        out.update({prefix + k: v for k, v in load(f).items()})
    return out


def run(args) -> int:
    from ofa_ds.model.convert import save_ofa_checkpoint, save_safetensors
    from ofa_ds.train.checkpoint import find

    for out in args.out:
        if out.suffix not in (".safetensors", ".pt"):
            raise SystemExit(f"{out}: output must end in .safetensors (ofa_ds) or .pt (OFA)")
    from ofa_ds.train.safe_load import check

    try:
        tag_dir = find(args.checkpoint)
        check(tag_dir)  # no file of it names anything loading would run
        cfg, sd = consolidated_state_dict(tag_dir)
    except (ConfigError, CheckpointError) as e:
        print(f"ofa-ds export: {e}", file=sys.stderr)
        return 2
    for out in args.out:
        (save_safetensors if out.suffix == ".safetensors" else save_ofa_checkpoint)(sd, cfg, out)
        print(f"{tag_dir} -> {out}")
    return 0

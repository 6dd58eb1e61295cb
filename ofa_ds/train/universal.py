"""`ofa-ds to-universal CHECKPOINT`: a checkpoint in a layout-free form, so that a run at another parallel layout
or world size resumes from it with its weights and optimizer states (DeepSpeed's universal-checkpoint idea: the
ZeRO shards of each layout joined into whole tensors under the model's own names).

    step_00000400/universal/model.safetensors       fp32 master weights and buffers (as `ofa-ds export` writes them)
    step_00000400/universal/exp_avg.safetensors     AdamW's first and second moments, same names and shapes
    step_00000400/universal/exp_avg_sq.safetensors
    step_00000400/universal/universal.json          AdamW's step count, the layout and world size it came from

`ofa-ds pretrain --resume` at another layout than the checkpoint's reads this directory: the weights go in as
`init_from` does (each TP rank keeps its share, ZeRO partitions them), and after DeepSpeed's engine exists every
rank writes its parameters' shares of the moments into DeepSpeed's optimizer. Random streams cannot follow ranks
to another layout: they are re-seeded from train.seed, the step and the data-parallel rank.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

DIRECTORY = "universal"
INFO = "universal.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


def add_arguments(p) -> None:
    p.add_argument("checkpoint", type=Path, help="run directory (its latest), its checkpoints/, or a step_* directory")


def write(tag_dir: Path) -> Path:
    """Write tag_dir/universal (replacing an older one); needs no process group."""
    from ofa_ds.model.convert import save_safetensors
    from ofa_ds.train.checkpoint import read_meta
    from ofa_ds.train.export import consolidated_state_dict, optimizer_files, read_optimizer_file
    from ofa_ds.train.safe_load import check

    check(tag_dir)  # no file of it names anything loading would run
    meta = read_meta(tag_dir)
    tmp = tag_dir / (DIRECTORY + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for state, name in (("fp32", "model"), *((m, m) for m in MOMENTS)):
        cfg, sd = consolidated_state_dict(tag_dir, state)  # one of the three in memory at a time
        save_safetensors(sd, cfg, tmp / f"{name}.safetensors")
        del sd
    _, _, states = read_optimizer_file(optimizer_files(tag_dir)[0])
    info = {
        "optimizer_step": int(states[0]["step"]),
        "step": meta["step"],
        "world_size": meta["world_size"],
        "parallel": meta.get("parallel", f"TP 1 x PP 1 x DP {meta['world_size']}"),
    }
    (tmp / INFO).write_text(json.dumps(info, indent=1))
    out = tag_dir / DIRECTORY
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def exists(tag_dir: Path) -> bool:
    return (tag_dir / DIRECTORY / INFO).is_file()


def read_weights(tag_dir: Path) -> dict:
    from ofa_ds.model.convert import load_safetensors

    return load_safetensors(tag_dir / DIRECTORY / "model.safetensors")[1]


def load_optimizer_states(engine, tag_dir: Path, groups, model_cfg) -> None:
    """Collective-free: every rank reads its own parameters' moments (safetensors reads only the tensors asked
    for) and hands DeepSpeed each parameter's whole (TP-local) moment; DeepSpeed keeps this rank's partition."""
    from deepspeed.utils import safe_set_full_optimizer_state
    from safetensors import safe_open

    from ofa_ds.parallel.pipeline import layer_prefixes, source_name
    from ofa_ds.parallel.tensor import shard

    directory = tag_dir / DIRECTORY
    info = json.loads((directory / INFO).read_text())
    _create_states(engine.optimizer, info["optimizer_step"])
    prefixes = layer_prefixes(model_cfg) if groups.pp_size > 1 else None
    for key in MOMENTS:
        with safe_open(str(directory / f"{key}.safetensors"), framework="pt") as f:
            for name, p in engine.module.named_parameters():
                if not p.requires_grad:
                    continue
                plain = source_name(name, prefixes) if prefixes else name
                whole = shard(plain, f.get_tensor(plain), groups.tp_rank, groups.tp_size)
                if hasattr(p, "ds_id"):
                    _set_zero3_state(engine.optimizer, p, whole, key)
                else:
                    safe_set_full_optimizer_state(p, whole, key)
    engine.global_steps = info["step"]


def _set_zero3_state(zero, p, whole: torch.Tensor, key: str) -> None:
    """This rank's partition of a ZeRO-3 parameter's state. DeepSpeed 0.19.8's set_full_hp_param reads past the
    end of a parameter whose last partitions are padding (fewer elements than ranks x partition); this keeps
    the padding."""
    part, _ = zero._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    start = part.numel() * zero._get_param_partition_rank(p)
    chunk = whole.flatten()[start : start + part.numel()]
    part[: chunk.numel()].copy_(chunk)


def _create_states(zero, step: int) -> None:
    """AdamW's state (zero moments at `step`) for each of DeepSpeed's fp32 partitions, as the optimizer's first
    step would create it, then linked to the parameters as DeepSpeed links it after that step (ZeRO-1/2)."""
    opt = zero.optimizer  # FusedAdam, DeepSpeedCPUAdam (int step) or torch's AdamW (tensor step)
    flats = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
    torch_adam = isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))
    for flat in flats:
        opt.state[flat] = {
            "step": torch.tensor(float(step)) if torch_adam else step,
            "exp_avg": torch.zeros_like(flat),
            "exp_avg_sq": torch.zeros_like(flat),
        }
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._lazy_init_hp_params_optimizer_state()


def run(args) -> int:
    from ofa_ds.train.checkpoint import find

    tag_dir = find(args.checkpoint)
    out = write(tag_dir)  # bad input: cli.main reports it in one line
    print(f"{tag_dir} -> {out}: resume it at any layout with `ofa-ds pretrain CONFIG --resume {tag_dir}`")
    return 0

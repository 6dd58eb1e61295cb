"""The DeepSpeed JSON of a run: read, checked against the run config, completed with the batch geometry.

The JSON holds what DeepSpeed does (ZeRO stage and buckets, precision, offload, the AdamW optimizer with OFA's
settings, gradient clipping); ofa-ds fills in the batch geometry from the run config and drives the learning rate
with its own schedule, so the keys it owns are refused here with where they are set instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from deepspeed.accelerator import get_accelerator

from ofa_ds.config import ConfigError, TrainConfig

# DeepSpeed keys that ofa-ds owns, and where they are set instead.
OWNED = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch / (train.micro_batch x data-parallel ranks)",
    "scheduler": "train.warmup_ratio / train.lr_power / train.end_lr (the lr schedule is ofa-ds's)",
}
REQUIRED = ("optimizer", "gradient_clipping", "zero_optimization")


def load_ds_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed: {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno}: {e.msg}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


def ds_config(ds: dict, train: TrainConfig, dp_size: int, where: str, pipeline_stages: int = 1) -> dict:
    """The DeepSpeed config for this run: the JSON checked, plus the batch geometry. The checks depend on the file
    alone, not on the machine that runs them (check_accelerator is the machine's side)."""
    pipe = ds.get("pipeline", {})
    if any(pipe.get(k) for k in ("pipe_partitioned", "grad_partitioned")):
        raise ConfigError(
            f"{where}: pipeline.pipe_partitioned / grad_partitioned: OFA's stages pass several tensors "
            f"that need gradients, which DeepSpeed's partitioned pipe transfer does not allow; remove them"
        )
    if pipeline_stages > 1:  # DeepSpeed turns them on by default with tensor parallelism
        ds = {**ds, "pipeline": {**pipe, "pipe_partitioned": False, "grad_partitioned": False}}
    for key, instead in OWNED.items():
        if key in ds:
            raise ConfigError(f"{where}: {key!r} is set by ofa-ds from {instead}; remove it")
    for key in REQUIRED:
        if key not in ds:
            raise ConfigError(f"{where}: {key!r} is required (see configs/ds/)")
    opt = ds["optimizer"]
    if not isinstance(opt, dict) or opt.get("type", "").lower() not in ("adamw", "adam"):
        raise ConfigError(f"{where}: optimizer.type must be AdamW (OFA_SPEC 7), got {opt!r}")
    if zero_stage(ds) not in (1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 1, 2 or 3, got {zero_stage(ds)!r}")
    if precision(ds) == "bf16":
        accum = ds.get("data_types", {}).get("grad_accum_dtype")
        if accum != "fp32":
            raise ConfigError(
                f'{where}: bf16 needs "data_types": {{"grad_accum_dtype": "fp32"}} (got {accum!r}): '
                f"DeepSpeed's default under ZeRO accumulates gradients in bf16, which drops the small "
                f"contributions of later micro-batches (configs/ds/README.md)"
            )
    return {
        **ds,
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.accumulation(dp_size),
    }


def check_accelerator(ds: dict, where: str) -> None:
    """Refuse a precision this machine's accelerator lacks (DeepSpeed's CPU accelerator reports fp16 from the
    host CPU's features)."""
    acc = get_accelerator()
    if precision(ds) == "fp16" and not acc.is_fp16_supported():
        raise ConfigError(
            f"{where}: fp16.enabled but the {acc.device_name()} accelerator has no fp16; use bf16 or fp32"
        )
    if precision(ds) == "bf16" and not acc.is_bf16_supported():
        raise ConfigError(
            f"{where}: bf16.enabled but the {acc.device_name()} accelerator has no bf16; use fp16 or fp32"
        )


def zero_stage(ds: dict) -> int:
    return ds.get("zero_optimization", {}).get("stage", 0)


def precision(ds: dict) -> str:
    return "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32"

"""OFA's learning-rate schedule (OFA_SPEC 7): linear warmup, then polynomial decay to `end_lr`.

Update t (1-based) of `steps` runs at

    peak * t / W                                                      for t <= W = int(warmup_ratio * steps)
    end + (peak - end) * (1 - (t - W) / (steps - W)) ** power         after

so warmup climbs from peak / W to peak and the last update runs at `end` (power 1 is fairseq's linear
`polynomial_decay`). The peak is the optimizer's lr (DeepSpeed config); the factor is applied through a
LambdaLR, which DeepSpeed steps once per optimizer update and saves with its checkpoints.
"""
from __future__ import annotations

import functools

from torch.optim.lr_scheduler import LambdaLR


def warmup_steps(steps: int, warmup_ratio: float) -> int:
    return int(warmup_ratio * steps)


def lr_at(t: int, *, peak: float, steps: int, warmup_ratio: float, power: float, end_lr: float) -> float:
    """Learning rate of update t (1-based)."""
    w = warmup_steps(steps, warmup_ratio)
    if t <= w:
        return peak * t / w
    if t >= steps:
        return end_lr
    return end_lr + (peak - end_lr) * (1 - (t - w) / (steps - w)) ** power


def _factor(done: int, *, peak: float, **kw) -> float:
    # LambdaLR passes the number of updates done so far; the next update is done + 1.
    return lr_at(done + 1, peak=peak, **kw) / peak


def scheduler(optimizer, *, steps: int, warmup_ratio: float, power: float, end_lr: float) -> LambdaLR:
    peak = optimizer.param_groups[0]["lr"]
    return LambdaLR(optimizer, functools.partial(_factor, peak=peak, steps=steps, warmup_ratio=warmup_ratio,
                                                 power=power, end_lr=end_lr))


__all__ = ["warmup_steps", "lr_at", "scheduler"]

"""OFA's learning-rate schedule (OFA_SPEC 7): linear warmup, then polynomial decay to `end_lr`.

Update t (1-based) of `steps` runs at

    peak * t / W                                                      for t <= W = int(warmup_ratio * steps)
    end + (peak - end) * (1 - (t - W) / (steps - W)) ** power         after

so warmup climbs from peak / W to peak and the last update runs at `end` (power 1 is fairseq's linear
`polynomial_decay`). The peak is the optimizer's lr (DeepSpeed config).

The trainer sets update t's rate before running it (`set_lr`), from its own update count: no scheduler state
lives in DeepSpeed, whose engine steps a scheduler only after an applied update. An fp16 update that the loss
scaler skips therefore still counts as update t, and the next one runs at t + 1's rate, as the trainer's step,
the data position and the checkpoints do; a resume needs nothing but the step.
"""

from __future__ import annotations


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


def set_lr(optimizer, lr: float) -> None:
    """Every parameter group of `optimizer` (DeepSpeed's wrapper or a torch optimizer) runs at `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr


__all__ = ["warmup_steps", "lr_at", "set_lr"]

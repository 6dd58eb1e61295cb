"""The ResNet's BatchNorm (+ residual) (+ ReLU) tails: one entry point, torch ops or the CUDA extension.

    y = batch_norm_act(x, weight, bias, running_mean, running_var, training=..., residual=..., relu=...)

x is (N, C, H, W). training=True normalises with batch statistics and updates the running statistics in
place (momentum, unbiased variance, as torch's BatchNorm2d); with `sync_group` the statistics are summed
over that process group first (the `sync` BatchNorm mode). training=False uses the running statistics
(eval, and the `frozen` mode whose weight and bias are buffers).

backend: "torch", "cuda" (the csrc/resnet extension) or "auto" (the extension on CUDA tensors of the
kernels' dtypes where it is built, torch ops elsewhere); None means the default, "auto" unless set by
`use_backend`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "torch", "cuda")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_default_backend = "auto"


@contextlib.contextmanager
def use_backend(backend: str):
    """Sets the backend of calls that pass none (the ResNet's), e.g. to compare or benchmark the paths."""
    global _default_backend
    if backend not in BACKENDS:
        raise ValueError(f"resnet kernel backend {backend!r}; valid: {', '.join(BACKENDS)}")
    previous, _default_backend = _default_backend, backend
    try:
        yield
    finally:
        _default_backend = previous


def batch_norm_act(
    x,
    weight,
    bias,
    running_mean,
    running_var,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual=None,
    relu: bool = True,
    sync_group=None,
    backend: str | None = None,
):
    backend = backend or _default_backend
    if backend not in BACKENDS:
        raise ValueError(f"resnet kernel backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "cuda" or (backend == "auto" and x.is_cuda and x.dtype in FUSED_DTYPES and extension_available()):
        from .cuda_ext import cuda_batch_norm_act

        return cuda_batch_norm_act(
            x,
            weight,
            bias,
            running_mean,
            running_var,
            training=training,
            momentum=momentum,
            eps=eps,
            residual=residual,
            relu=relu,
            sync_group=sync_group,
        )
    return torch_batch_norm_act(
        x,
        weight,
        bias,
        running_mean,
        running_var,
        training=training,
        momentum=momentum,
        eps=eps,
        residual=residual,
        relu=relu,
        sync_group=sync_group,
    )


def extension_available() -> bool:
    try:
        from .cuda_ext import is_built
    except ImportError:
        return False
    return is_built()


def torch_batch_norm_act(
    x,
    weight,
    bias,
    running_mean,
    running_var,
    *,
    training,
    momentum=0.1,
    eps=1e-5,
    residual=None,
    relu=True,
    sync_group=None,
):
    if training and sync_group is not None:
        y = _sync_batch_norm(x, weight, bias, running_mean, running_var, momentum, eps, sync_group)
    else:
        if running_mean is not None and weight is not None and weight.dtype != running_mean.dtype:
            # bf16/fp16 weights beside fp32 running statistics: torch's mixed-precision batch norm wants the affine in
            # the statistics' dtype (the gradient flows back through the cast)
            weight, bias = weight.to(running_mean.dtype), bias.to(running_mean.dtype)
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return F.relu(y) if relu else y


def _sync_batch_norm(x, weight, bias, running_mean, running_var, momentum, eps, group):
    """Batch statistics summed over `group` (autograd flows through the all-reduce)."""
    import torch.distributed.nn.functional as dist_fn

    C = x.shape[1]
    xf = x.float()
    count = torch.full((1,), x.numel() // C, dtype=torch.float32, device=x.device)
    stats = torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count])
    stats = dist_fn.all_reduce(stats, group=group)
    s, ss, n = stats[:C], stats[C : 2 * C], stats[2 * C]
    mean = s / n
    var = (ss / n - mean * mean).clamp_min(0)
    if running_mean is not None:
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
            unbiased = var.detach() * (n / (n - 1).clamp_min(1))
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    inv = torch.rsqrt(var + eps)
    scale = inv if weight is None else inv * weight.float()
    shift = -mean * scale if bias is None else bias.float() - mean * scale
    return (xf * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


__all__ = ["batch_norm_act", "torch_batch_norm_act", "extension_available", "use_backend"]

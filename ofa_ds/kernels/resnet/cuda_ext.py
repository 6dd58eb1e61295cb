"""The csrc/resnet CUDA extension: finding it (prebuilt by setup.py, else compiled just in time) and
`cuda_batch_norm_act`, the autograd Function over its ops (torch.ops.ofa_resnet.*).

OFA_DS_BUILD_CUDA=0 disables the JIT build as it disables the setup.py build.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import FUSED_DTYPES, build

PREBUILT = "ofa_ds.kernels.resnet._C"
log = logging.getLogger(__name__)
# torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name now warns); older torch has the old one.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ExtensionNotBuilt(RuntimeError):
    pass


def _prebuilt_path() -> str | None:
    spec = importlib.util.find_spec(PREBUILT)
    return spec.origin if spec is not None else None


def _jit_unavailable() -> str | None:
    """Why a JIT build is impossible here, or None."""
    if os.environ.get("OFA_DS_BUILD_CUDA") == "0":
        return "disabled by OFA_DS_BUILD_CUDA=0"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) for a JIT build"
    if not build.sources_present():
        return f"no csrc/resnet sources under {build.ROOT} (this ofa-ds was built without them)"
    return None


@functools.cache
def _load() -> tuple[str, str]:
    """('prebuilt' | 'jit', path) once the ops are registered, or ('', why not)."""
    path = _prebuilt_path()
    if path is not None:
        torch.ops.load_library(path)
        return "prebuilt", path
    why = _jit_unavailable()
    if why is not None:
        return "", why
    from torch.utils import cpp_extension

    log.info("compiling the ResNet CUDA extension (once; cached by torch.utils.cpp_extension)")
    try:
        sources = [str(build.ROOT / s) for s in (build.BINDING, *build.KERNELS)]
        cpp_extension.load(
            name="ofa_resnet_cuda",
            sources=sources,
            extra_cflags=build.CXX_FLAGS,
            extra_cuda_cflags=build.NVCC_FLAGS,
            is_python_module=False,
        )
    except (RuntimeError, OSError, ImportError) as e:
        log.warning("ResNet CUDA extension: JIT build failed, using torch ops: %s", e)
        return "", f"JIT build failed: {e}"
    return "jit", "ofa_resnet_cuda in torch.utils.cpp_extension's build cache (TORCH_EXTENSIONS_DIR)"


def is_built() -> bool:
    """True once the extension's ops are loaded (may JIT-compile on a CUDA machine on first call)."""
    return bool(_load()[0])


def extension_status() -> dict[str, str]:
    """For `ofa-ds env`: how the extension is or would be provided, without compiling anything."""
    if _load.cache_info().currsize:
        how, detail = _load()
        return {"resnet_cuda": how or "not built", "detail": detail}
    path = _prebuilt_path()
    if path is not None:
        return {"resnet_cuda": "prebuilt", "detail": path}
    why = _jit_unavailable()
    if why is not None:
        return {"resnet_cuda": "not built", "detail": why}
    return {"resnet_cuda": "jit", "detail": "compiled on first use on CUDA tensors"}


def cuda_batch_norm_act(
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
):
    """batch_norm_act (see ofa_ds.kernels.resnet) on the fused kernels; x (N, C, H, W) on a CUDA device.

    x and residual are made channels_last (a copy if they are not); y is channels_last.
    """
    if x.dim() != 4 or x.shape[1] < 1 or x.numel() == 0:
        raise ValueError(f"ofa_ds.kernels.resnet: x must be a non-empty (N, C, H, W) tensor, got {tuple(x.shape)}")
    if x.dtype not in FUSED_DTYPES:
        raise TypeError(f"ofa_ds.kernels.resnet: x dtype {x.dtype} unsupported; supported: float32, float16, bfloat16")
    C = x.shape[1]
    if training and sync_group is None and x.numel() // C < 2:
        raise ValueError(f"ofa_ds.kernels.resnet: training needs more than 1 value per channel, got {tuple(x.shape)}")
    how, detail = _load()
    if not how:
        raise ExtensionNotBuilt(
            f"ofa_ds.kernels.resnet: backend 'cuda' needs the csrc/resnet extension, which is "
            f"not built ({detail}); build it on a CUDA machine (pip install -e . with "
            f"OFA_DS_BUILD_CUDA=1) or use backend='torch'"
        )
    if not x.is_cuda:
        raise ValueError(f"ofa_ds.kernels.resnet: backend 'cuda' needs CUDA tensors; x is on {x.device}")
    if weight is None:
        weight = torch.ones(C, device=x.device)
    if bias is None:
        bias = torch.zeros(C, device=x.device)
    x = x.contiguous(memory_format=torch.channels_last)
    if residual is not None:
        residual = residual.contiguous(memory_format=torch.channels_last)
    return _BatchNormAct.apply(
        x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu, sync_group
    )


class _BatchNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, training, momentum, eps, relu, group):
        ops = torch.ops.ofa_resnet
        stats = None
        if training:
            stats = ops.welford_stats(x)  # (3, C): mean, m2, count of this rank
            if group is not None:
                gathered = stats.new_empty((dist.get_world_size(group) * 3, x.shape[1]))
                _all_gather_single(gathered, stats, group=group)
                stats = ops.welford_combine(gathered.view(-1, 3, x.shape[1]))  # Chan's combine over ranks
        y, mean, invstd = ops.bn_act_forward(
            x, residual, stats, weight, bias, running_mean, running_var, training, momentum, eps, relu
        )
        ctx.save_for_backward(x, y if relu else None, weight, mean, invstd, stats[2] if training else None)
        ctx.training, ctx.relu, ctx.group, ctx.has_residual = training, relu, group, residual is not None
        ctx.bias_dtype = bias.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, y, weight, mean, invstd, count = ctx.saved_tensors
        need_weight, need_bias = ctx.needs_input_grad[1:3]
        dy = dy.contiguous(memory_format=torch.channels_last)
        ops = torch.ops.ofa_resnet
        sums = dweight = dbias = None
        if ctx.training or need_weight or need_bias:
            sums = ops.grad_sums(dy, x, y, mean, ctx.relu)  # (2, C): sum(dz), sum(dz * (x - mean)) of this rank
            # Parameter gradients stay per rank (data parallelism reduces them); dx needs the global sums.
            dweight = (sums[1] * invstd).to(weight.dtype) if need_weight else None
            dbias = sums[0].to(ctx.bias_dtype, copy=True) if need_bias else None
            if ctx.group is not None:
                sums = sums.clone()
                dist.all_reduce(sums, group=ctx.group)
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        dres = torch.empty_like(x, memory_format=torch.channels_last) if ctx.has_residual else None
        ops.bn_act_backward(
            dy, x, y, mean, invstd, weight, sums if ctx.training else None, count, ctx.training, ctx.relu, dx, dres
        )
        return dx, dweight, dbias, dres, None, None, None, None, None, None, None

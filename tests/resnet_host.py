"""csrc/resnet's kernel math (bn_act_math.h) built for the host and driven through ctypes as torch.ops.ofa_resnet's
ops, so that tests/test_resnet_kernels.py can test it, and cuda_ext's autograd Function over it, without CUDA."""

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ofa_ds.kernels.resnet import build

CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # ofa_resnet::DType


def host_library() -> ctypes.CDLL:
    """csrc/resnet's shared math built for the host with g++ (cached per source version), with its C signatures."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the host build of csrc/resnet")
    sources = [build.ROOT / build.HOST_MATH, build.ROOT / build.CSRC / "bn_act_math.h"]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in sources))
    key.update(" ".join(build.host_math_command(cxx, "")).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ofa_ds" / "host_math"
    path = cache / f"bn_act_host-{key.hexdigest()[:16]}.so"
    if not path.exists():  # compiled once per source version (a few seconds)
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        r = subprocess.run(build.host_math_command(cxx, str(tmp)), capture_output=True, text=True)
        assert r.returncode == 0, f"host build of {build.HOST_MATH} failed:\n{r.stderr}"
        tmp.replace(path)
    lib = ctypes.CDLL(str(path))
    i32, i64, f32, p = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.ofa_welford_stats.argtypes = [i32, p, i64, i32, i32, i32, p]
    lib.ofa_welford_combine.argtypes = [p, i32, i32, p]
    lib.ofa_bn_act_forward.argtypes = [i32, p, p, p, i64, i32, p, p, p, p, p, p, p, f32, f32, i32, i32]
    lib.ofa_grad_sums.argtypes = [i32, p, p, p, p, i64, i32, i32, i32, i32, p]
    lib.ofa_bn_act_backward.argtypes = [i32, p, p, p, p, p, p, p, p, p, p, i64, i32, i32, i32]
    lib.ofa_from_float.argtypes = lib.ofa_to_float.argtypes = [i32, p, p, i64]
    return lib


def ptr(t):
    return None if t is None else t.data_ptr()


class HostOps:
    """torch.ops.ofa_resnet's ops (bn_act_binding.cpp) on CPU tensors over the host build.

    Row reductions use `parts` row blocks of `block_rows` lane rows, like a kernel launch; `widths`
    records the pack width each op used (16-byte vectors or the scalar path).
    """

    def __init__(self, lib, parts=3, block_rows=8):
        self.lib, self.parts, self.block_rows, self.widths = lib, parts, block_rows, {}

    def welford_stats(self, x):
        C = x.shape[1]
        stats = torch.empty(3, C)
        self.widths["stats"] = self.lib.ofa_welford_stats(
            CODE[x.dtype], ptr(x), x.numel() // C, C, self.parts, self.block_rows, ptr(stats)
        )
        return stats

    def welford_combine(self, partials):
        stats = torch.empty(3, partials.shape[2])
        self.lib.ofa_welford_combine(ptr(partials.contiguous()), partials.shape[0], partials.shape[2], ptr(stats))
        return stats

    def bn_act_forward(
        self, x, residual, stats, weight, bias, running_mean, running_var, training, momentum, eps, relu
    ):
        C = x.shape[1]
        y = torch.empty_like(x, memory_format=torch.channels_last)
        mean, invstd = torch.empty(C), torch.empty(C)
        self.widths["forward"] = self.lib.ofa_bn_act_forward(
            CODE[x.dtype],
            ptr(x),
            ptr(residual),
            ptr(y),
            x.numel() // C,
            C,
            ptr(stats),
            ptr(weight.float()),
            ptr(bias.float()),
            ptr(running_mean),
            ptr(running_var),
            ptr(mean),
            ptr(invstd),
            momentum,
            eps,
            int(training),
            int(relu),
        )
        return y, mean, invstd

    def grad_sums(self, dy, x, y, mean, relu):
        C = x.shape[1]
        sums = torch.empty(2, C)
        self.widths["grad_sums"] = self.lib.ofa_grad_sums(
            CODE[x.dtype],
            ptr(dy),
            ptr(x),
            ptr(y),
            ptr(mean),
            x.numel() // C,
            C,
            self.parts,
            self.block_rows,
            int(relu),
            ptr(sums),
        )
        return sums

    def bn_act_backward(self, dy, x, y, mean, invstd, weight, sums, count, training, relu, dx, dres):
        C = x.shape[1]
        self.widths["backward"] = self.lib.ofa_bn_act_backward(
            CODE[x.dtype],
            ptr(dy),
            ptr(x),
            ptr(y),
            ptr(dx),
            ptr(dres),
            ptr(mean),
            ptr(invstd),
            ptr(weight.float()),
            ptr(sums),
            ptr(count),
            x.numel() // C,
            C,
            int(training),
            int(relu),
        )

"""`ofa-ds env`: what this machine offers a pretraining run (versions, accelerator, backend, compiled ops), each
installed dependency outside the range ofa-ds declares (ofa_ds/dependencies.py; CI tests constraints.txt's versions),
and whether NVIDIA apex is present.

Run it on every node of a cluster before the first launch; `--json` prints the same as one JSON object.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

from ofa_ds.dependencies import check_installed

PACKAGES = (
    "ofa-ds",
    "torch",
    "deepspeed",
    "megatron-core",
    "triton",
    "numpy",
    "pyarrow",
    "sentencepiece",
    "safetensors",
    "tensorboard",
)
DS_OPS = ("fused_adam", "cpu_adam", "deepspeed_shm_comm")  # the DeepSpeed ops pretraining can use
ENV_PREFIXES = ("DS_ACCELERATOR", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "NCCL_", "MASTER_", "TORCH_EXTENSIONS_DIR")


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def report() -> dict:
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    accelerator = {
        "deepspeed_accelerator": acc.device_name(),
        "devices": devices or [f"cpu ({os.cpu_count()} cores)"],
        "cpu": cpu_model(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "bf16": acc.is_bf16_supported(),
        "fp16": bool(acc.is_fp16_supported()),
    }
    backend = {
        "pretrain_uses": "nccl" if acc.device_name() == "cuda" else "gloo",
        "available": [b for b in ("nccl", "gloo", "mpi") if getattr(dist, f"is_{b}_available")()],
    }
    dependencies = {"outside_tested_ranges": check_installed(), "apex": apex_status()}
    return {
        "versions": versions,
        "dependencies": dependencies,
        "accelerator": accelerator,
        "backend": backend,
        "extensions": extensions(),
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
    }


def apex_status() -> str:
    """NVIDIA apex is optional. PyPI's package named apex is another project: it is reported as not NVIDIA's."""
    import importlib.util

    try:
        if importlib.util.find_spec("apex") is None:
            return "not installed (optional)"
        nvidia = importlib.util.find_spec("apex.normalization") is not None
    except Exception as e:  # importing a foreign apex package can fail in any way
        return f"a package named apex that cannot be imported ({type(e).__name__}): not NVIDIA's apex"
    if not nvidia:
        return "a package named apex that is not NVIDIA's (PyPI's apex is unrelated): not used"
    if importlib.util.find_spec("amp_C") is None:
        return "NVIDIA apex, Python only (built without its CUDA extensions)"
    return "NVIDIA apex with its CUDA extensions (amp_C)"


def cpu_model() -> str:
    """The host CPU's model name and vector extensions (what the C and oneDNN paths run on)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    name = fields.get("model name\t", platform.machine()).strip()
    flags = fields.get("flags\t\t", "").split()
    vector = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(vector) or 'no AVX2'})"


def extensions() -> dict:
    """DeepSpeed ops (prebuilt, JIT-built in the cache, or compiled on first use) and ofa_ds's own."""
    import deepspeed.git_version_info as ds_info
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    from ofa_ds.data import transforms, tsv_rows
    from ofa_ds.kernels.attention import triton_available
    from ofa_ds.kernels.resnet.cuda_ext import extension_status

    out = {}
    builders = {
        "fused_adam": "FusedAdamBuilder",
        "cpu_adam": "CPUAdamBuilder",
        "deepspeed_shm_comm": "ShareMemCommBuilder",
    }
    for op in DS_OPS:
        builder = get_accelerator().create_op_builder(builders[op])
        if builder is None:
            out[op] = "not available on this accelerator"
        elif ds_info.installed_ops.get(op):
            out[op] = "prebuilt"
        elif any(Path(_get_build_directory(builder.name, False)).glob("*.so")):
            out[op] = "JIT-built (cached)"
        else:
            out[op] = "JIT on first use" if builder.is_compatible(verbose=False) else "incompatible"
    out["ofa_ds resnet_cuda"] = " - ".join(extension_status().values())
    out["triton"] = "available" if triton_available() else "not installed"
    out["ofa_ds pixel_ops"] = "built" if transforms._pixel_ops else "not built: Pillow and numpy (same pixels, slower)"
    out["ofa_ds jpegtran"] = "built" if tsv_rows._jpegtran else "not built: tsv2arrow keeps progressive JPEGs"
    return out


def run(args) -> int:
    r = report()
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    lines = [f"ofa-ds env ({sys.executable})"]
    for section in ("versions", "dependencies", "accelerator", "backend", "extensions", "environment"):
        lines.append(f"{section}:")
        if section == "dependencies":  # one line per flag
            outside = r[section]["outside_tested_ranges"]
            lines += [f"  WARNING: {line}" for line in outside]
            lines += [] if outside else ["  every declared dependency is inside its tested range"]
            lines.append(f"  {'apex':<22} {r[section]['apex']}")
            continue
        for k, v in r[section].items():
            lines.append(f"  {k:<22} {', '.join(map(str, v)) if isinstance(v, list) else v}")
    print("\n".join(lines))
    return 0

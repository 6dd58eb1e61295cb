"""OFA's image backbone (ResNet stem + stages 1-3), training forward+backward images/s. JSON out.

    python benchmarks/resnet.py --out benchmarks/results/resnet.json
    python benchmarks/resnet.py --models resnet152 --resolutions 480 --batch 16 --dtypes bf16

On a GPU: ResNet-50/101/152 at 256/384/480 px, channels-last with cuDNN convolutions, bf16 (the whole
module cast, as OFA's --fp16 runs BN in half) and fp32, BatchNorm in training mode, each with the fused
csrc/resnet kernels (`cuda`) and with torch ops (`torch`); images/s, ms per step, peak memory, and the
fused/torch speed-up. Without CUDA it times the torch path on the CPU at a small default size and says the
GPU figures are pending hardware.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ofa_ds.config import RESNET_LAYERS  # noqa: E402
from ofa_ds.kernels.resnet import use_backend  # noqa: E402
from ofa_ds.kernels.resnet.cuda_ext import extension_status, is_built  # noqa: E402
from ofa_ds.model.resnet import ResNet  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def time_steps(model, x, steps: int, warmup: int) -> float:
    """Seconds per forward+backward step (mean over `steps` after `warmup`)."""

    def step():
        model(x).float().square().mean().backward()  # a scalar loss over every output element

    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def run_one(name, resolution, batch, dtype, backend, device, steps, warmup) -> dict:
    torch.manual_seed(0)
    model = ResNet(RESNET_LAYERS[name]).to(device=device, dtype=DTYPES[dtype], memory_format=torch.channels_last)
    x = torch.randn(batch, 3, resolution, resolution, device=device, dtype=DTYPES[dtype])
    x = x.contiguous(memory_format=torch.channels_last)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with use_backend(backend):
        seconds = time_steps(model, x, steps, warmup)
    row = {
        "model": name,
        "resolution": resolution,
        "batch": batch,
        "dtype": dtype,
        "backend": backend,
        "images_per_s": round(batch / seconds, 2),
        "ms_per_step": round(1e3 * seconds, 2),
    }
    if device == "cuda":
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return row


def main(argv=None) -> int:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet50,resnet101,resnet152" if gpu else "resnet50")
    p.add_argument("--resolutions", default="256,384,480" if gpu else "256")
    p.add_argument("--dtypes", default="bf16,fp32" if gpu else "fp32")
    p.add_argument("--batch", type=int, default=32 if gpu else 2, help="images per step")
    p.add_argument("--steps", type=int, default=20 if gpu else 2)
    p.add_argument("--warmup", type=int, default=5 if gpu else 1)
    p.add_argument("--out", type=Path, help="write the JSON here (it is printed either way)")
    args = p.parse_args(argv)

    device = "cuda" if gpu else "cpu"
    torch.backends.cudnn.benchmark = True
    backends = ["torch", "cuda"] if gpu and is_built() else ["torch"]
    report = {
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if gpu else None,
        "threads": torch.get_num_threads(),
        "extension": extension_status(),
        "steps": args.steps,
        "warmup": args.warmup,
        "results": [],
    }
    if not gpu:
        report["gpu"] = "pending: no CUDA device here; these are CPU figures of the torch path only"
    elif "cuda" not in backends:
        report["gpu"] = "fused kernels not built here (see extension); torch path only"
    for name in args.models.split(","):
        for resolution in map(int, args.resolutions.split(",")):
            for dtype in args.dtypes.split(","):
                rows = {
                    b: run_one(name, resolution, args.batch, dtype, b, device, args.steps, args.warmup)
                    for b in backends
                }
                if len(rows) == 2:
                    speedup = rows["cuda"]["images_per_s"] / rows["torch"]["images_per_s"]
                    rows["cuda"]["speedup_vs_torch"] = round(speedup, 3)
                for row in rows.values():
                    print(json.dumps(row), file=sys.stderr)
                report["results"].extend(rows.values())
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

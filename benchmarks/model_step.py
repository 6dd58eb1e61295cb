"""Forward+backward time and peak memory of one OFA training step, per attention backend. JSON on stdout.

    python benchmarks/model_step.py --preset ofa_tiny --batch 2 --attn reference,sdpa
    python benchmarks/model_step.py --preset ofa_base --batch 8 --image-size 384 --attn sdpa,triton   # on a GPU
    python benchmarks/model_step.py --preset ofa_base --batch 2 --shared 2 --attn sdpa   # a VL row's two examples

The batch is one v1-style stream: `--batch` samples with an image of `--image-size` px (of which `--patches`
are kept, as OFA's patch sampling; -1 keeps all), `--src-len` text tokens and `--tgt-len` target tokens; with
`--shared k` every k examples share one image (image_index), as the loader's v1 streams (k = 2) reach the model.
Each backend runs in its own process so peak memory (CUDA: max allocated; CPU: peak RSS above the model's
resident baseline) is not shared between them. FLOPs are flops.py's count of the step; the GEMM rate is a 2048^3
fp32 matmul's on the same device and threads (the best of the runs before and after the steps), for comparison.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import emit  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def gemm_rate(dev) -> float:
    """FLOP/s of a 2048 x 2048 x 2048 fp32 matmul: the best of 8, after a warm-up (the device's peak, not its
    typical rate: the ratio to it is not flattered by a slow moment of a shared machine)."""
    import torch

    m = torch.randn(2048, 2048, device=dev)
    times = []
    for _ in range(9):
        t = time.perf_counter()
        torch.mm(m, m)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * 2048**3 / min(times[1:])


def measure(a) -> dict:
    import torch

    from ofa_ds.config import model_preset
    from ofa_ds.model.ofa import OFAModel
    from ofa_ds.train.flops import stream_shape, train_flops

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gemm_before = gemm_rate(dev)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    torch.manual_seed(0)
    cfg = model_preset(a.preset, attn_backend=a.one)
    model = OFAModel(cfg).to(dev).train()
    B, R = a.batch, a.image_size
    grid = (R // 16) ** 2
    g = torch.Generator().manual_seed(0)
    stream = {
        "src_tokens": torch.randint(4, 50000, (B, a.src_len), generator=g),
        "prev_output_tokens": torch.randint(4, 50000, (B, a.tgt_len), generator=g),
        "patch_images": torch.randn(B // a.shared, 3, R, R, generator=g),
        "patch_masks": torch.ones(B, dtype=torch.bool),
    }
    if a.shared > 1:
        stream["image_index"] = torch.arange(B) // a.shared
    if 0 < a.patches < grid:
        stream["patch_idx"] = torch.stack([torch.randperm(grid, generator=g)[: a.patches] for _ in range(B)])
    stream = {k: v.to(dev) for k, v in stream.items()}
    target = torch.randint(4, 50000, (B, a.tgt_len), generator=g).to(dev)

    def step():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(stream)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), target.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up
    base = rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    )
    median = statistics.median(times)
    flops = train_flops(cfg, [stream_shape(stream)])
    result = {
        "preset": a.preset,
        "attn": a.one,
        "device": dev.type,
        "dtype": a.dtype,
        "batch": B,
        "image_size": R,
        "images": B // a.shared,
        "patches": a.patches if 0 < a.patches < grid else grid,
        "src_len": a.src_len,
        "tgt_len": a.tgt_len,
        "threads": torch.get_num_threads(),
        "params": model.num_parameters(),
        "step_s_median": median,
        "step_s_all": times,
        "step_flops": flops,
        "flops_per_s": flops / median,
        "gemm_flops_per_s": max(gemm_before, gemm_rate(dev)),
        "peak_mem_mb": round(peak, 1),
        "peak_mem_kind": "cuda max allocated"
        if dev.type == "cuda"
        else "peak RSS above the resident model (includes the first steps' allocator growth)",
    }
    if a.profile:
        result["profile"] = profile_step(step, a.profile)
    return result


def profile_step(step, top: int) -> list[dict]:
    """One more step under torch's profiler: the `top` operators by their own time, with their input shapes and,
    for the matmuls and convolutions, the FLOP/s they ran at (where the time goes that the FLOPs do not explain)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        step()
    rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    return [
        {
            "op": e.key,
            "shapes": str(e.input_shapes)[:120],
            "calls": e.count,
            "self_s": round(e.self_cpu_time_total / 1e6, 4),
            "gflops_per_s": round(e.flops / e.self_cpu_time_total / 1e3, 1) if e.flops else None,
        }
        for e in rows[:top]
    ]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--preset", default="ofa_tiny", help="model preset (ofa_ds.config.PRESETS)")
    p.add_argument("--batch", type=int, default=2, help="examples per step")
    p.add_argument("--image-size", type=int, default=384, help="image side in pixels")
    p.add_argument("--patches", type=int, default=196, help="sampled patches per image (0: every patch)")
    p.add_argument("--src-len", type=int, default=40, help="source text tokens")
    p.add_argument("--tgt-len", type=int, default=24, help="target tokens")
    p.add_argument("--shared", type=int, default=1, help="examples per image (divides --batch)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype")
    p.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    p.add_argument("--attn", default="reference,sdpa", help="comma-separated attention backends, one process each")
    p.add_argument("--profile", type=int, default=0, help="also profile one step: its N most expensive operators")
    p.add_argument("--out", help="also write the results to this JSON file")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one backend in this process
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a)))
        return
    results = []
    for backend in a.attn.split(","):
        argv = [sys.executable, __file__, *sys.argv[1:], "--one", backend]
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    emit(results, a.out)


if __name__ == "__main__":
    main()

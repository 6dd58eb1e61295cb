"""What a run reports: tensorboard scalars, the same as JSON lines, a progress bar, and the start-up summary.

Only rank 0 writes. Scalar names (also the JSON keys):
  train/loss, train/loss_v1, train/loss_v2    the loss and its two stream terms (conf-weighted token means)
  train/nll/<task>                            unweighted mean token nll per task (ofa_ds.data.tasks.TASKS)
  train/lr, train/grad_norm, train/loss_scale (fp16 only)
  perf/samples_per_s (examples, v1 + v2), perf/tokens_per_s (non-pad target tokens), perf/step_s,
  perf/data_wait_s (per update, time the slowest rank waited for its loader: 0 when workers keep up),
  perf/tflops (achieved per device, analytic FLOPs), perf/mfu (against perf_peak_tflops), perf/mem_gb
  val/loss, val/loss_v1, val/loss_v2, val/nll/<task>
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

# Dense tensor-core (bf16, fp16, tf32) and plain fp32 peaks per GPU, TFLOP/s (vendor datasheets, SXM parts).
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def peak_tflops(stated: float | None, precision: str) -> tuple[float | None, str]:
    """Per-device peak for MFU and where it comes from."""
    if stated is not None:
        return stated, "train.peak_tflops"
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for gpu, peaks in GPU_PEAK_TFLOPS.items():
            if gpu in name:
                return peaks["tf32" if precision == "fp32" else precision], f"{gpu} {precision} datasheet"
        return None, f"unknown GPU {name!r}: set train.peak_tflops"
    return measure_gemm_tflops(torch.bfloat16 if precision == "bf16" else torch.float32), "measured CPU GEMM"


def measure_gemm_tflops(dtype: torch.dtype, n: int = 512, seconds: float = 0.3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def memory_gb() -> float:
    """Peak accelerator memory of this rank, or the process's resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class Metrics:
    def __init__(self, out_dir: Path, *, rank: int, steps: int, start_step: int):
        self.rank = rank
        if rank != 0:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        # purge_step drops the events a resumed run is about to rewrite
        self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.jsonl = open(out_dir / "metrics.jsonl", "a")
        self.bar = tqdm(
            total=steps,
            initial=start_step,
            desc="pretrain",
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
        )
        self.shown: dict[str, str] = {}  # the bar's fields; v2 and tokens/s keep their last value between updates

    def log(self, step: int, scalars: dict) -> None:
        if self.rank != 0:
            return
        for k, v in scalars.items():
            if v is not None:
                self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self.jsonl.flush()
        if scalars.get("perf/tokens_per_s") is not None:
            self.shown["tok/s"] = f"{scalars['perf/tokens_per_s']:.3g}"

    def advance(self, step: int, loss_v1: float, loss_v2: float | None, lr: float) -> None:
        """The bar shows each stream's loss (their sum, train/loss, jumps as v2 batches come and go), lr and the
        last logged tokens/s; tqdm adds the ETA."""
        if self.rank == 0:
            self.bar.update(step - self.bar.n)
            self.shown["v1"] = f"{loss_v1:.3f}"
            if loss_v2 is not None:
                self.shown["v2"] = f"{loss_v2:.3f}"
            self.shown["lr"] = f"{lr:.2e}"
            fields = {k: self.shown[k] for k in ("v1", "v2", "lr", "tok/s") if k in self.shown}
            self.bar.set_postfix(fields, refresh=False)

    def print(self, text: str) -> None:
        if self.rank == 0:
            self.bar.write(text)

    def close(self) -> None:
        if self.rank == 0:
            self.bar.close()
            self.tb.close()
            self.jsonl.close()


def summary(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(["ofa-ds pretrain"] + [f"  {k:<{width}}  {v}" for k, v in rows])


__all__ = ["peak_tflops", "measure_gemm_tflops", "memory_gb", "Metrics", "summary"]

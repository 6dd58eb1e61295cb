"""`ofa-ds bench CONFIG`: throughput of the real training step (DeepSpeed engine, layout, loader) of a run config.

    deepspeed --num_gpus 8 --no_local_rank --module ofa_ds.cli bench configs/pretrain/ofa_huge_a100x8.yaml
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --no_local_rank --module ofa_ds.cli bench \\
        configs/pretrain/quickstart.yaml --synthetic --set train.micro_batch=2 --set train.global_batch=4
    ofa-ds bench CONFIG --sweep train.micro_batch=1,2,4          # one results file per point, and a PNG

The run config fixes the preset, the layout (`parallel`), the batch geometry, the DeepSpeed JSON (ZeRO stage,
precision) and activation checkpointing; `--set` overrides any key, as for `ofa-ds pretrain`. `--warmup` updates
run first, then `--steps` timed updates (no checkpoints, no validation). Batches come from the run's corpus through
the real loader, or with `--synthetic` from random tokens and pixels of the stated lengths (2 v1 examples per VL
row sharing an image, 4 v2 examples per 8 rows, as the loader builds them).

Reported (rank 0 writes MODEL_LAYOUT_HARDWARE_DATE.json and .csv under --out): samples/s (v1 + v2 examples), VL
rows/s, source and target tokens/s, the median update time and its breakdown (data wait, forward, backward,
optimizer; a pipeline's schedule as one; communication is inside backward and optimizer, where DeepSpeed overlaps
it), model TFLOP/s per device (train/flops.py's count over the measured time, the ResNet once per distinct image, no
recompute) and MFU against the datasheet peak (A100/H100/H200) and against a GEMM measured on this device, and per
rank: peak memory (CUDA: max allocated; CPU: the process's peak RSS, which a sweep carries from point to point), the
weight and optimizer bytes the rank holds, and with
`--memory` the peak of memory allocated and freed within one stream's forward and backward (activations and
transients; what stays allocated, such as gradients, is excluded), measured with torch's profiler.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ofa_ds.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="run config (YAML or JSON)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override a run-config key, as for ofa-ds pretrain; repeatable",
    )
    p.add_argument("--warmup", type=int, default=2, help="updates before timing")
    p.add_argument("--steps", type=int, default=5, help="timed updates")
    p.add_argument("--synthetic", action="store_true", help="random batches instead of the corpus")
    p.add_argument("--src-len", type=int, default=32, help="--synthetic: source tokens of v1 examples")
    p.add_argument("--tgt-len", type=int, default=16, help="--synthetic: target tokens of v1 examples")
    p.add_argument("--v2-src-len", type=int, default=32, help="--synthetic: source tokens of v2 examples")
    p.add_argument("--v2-tgt-len", type=int, default=64, help="--synthetic: target tokens of v2 examples")
    p.add_argument("--memory", action="store_true", help="also profile one update's allocations (activations)")
    p.add_argument("--sweep", metavar="KEY=V1,V2,...", help="one benchmark per value of a run-config key, and a PNG")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for the results")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)


def run(args) -> int:
    from ofa_ds.train.pretrain import _quiet_deepspeed

    points = [None]
    if args.sweep:
        key, sep, values = args.sweep.partition("=")
        if not sep or not values:
            print(f"ofa-ds bench: --sweep {args.sweep!r}: expected KEY=V1,V2,...", file=sys.stderr)
            return 2
        points = [f"{key}={v}" for v in values.split(",")]
    # bad input raises ConfigError before any process group: cli.main reports it in one line
    plans = [_prepare(args, [*args.overrides, *([point] if point else [])]) for point in points]
    _quiet_deepspeed()
    from ofa_ds.train.engine import init_distributed

    backend = init_distributed()
    results = [Bench(plan, backend, args).measure() for plan in plans]
    import torch.distributed as dist

    if dist.get_rank() == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        for r in results:
            print(_write(r, args.out))
        if args.sweep:
            print(_plot(results, args.sweep.partition("=")[0], args.out))
    dist.barrier()
    return 0


def _prepare(args, overrides: list[str]):
    from ofa_ds.train.prepare import prepare

    if args.synthetic:
        overrides = ["corpus=synthetic", *overrides]  # a run config needs one; --synthetic reads none
    ns = argparse.Namespace(
        config=args.config, overrides=overrides, out_dir=None, init_from=None, resume=None, change_geometry=False
    )
    plan = prepare(ns, data=not args.synthetic)
    if args.warmup < 0 or args.steps < 1:
        raise ConfigError(f"--warmup {args.warmup} --steps {args.steps}: need warmup >= 0 and steps >= 1")
    return plan


# ---------------------------------------------------------------------------------------------------- measuring


class Bench:
    def __init__(self, plan, backend: str, args):
        from ofa_ds.train.pretrain import Trainer

        plan.out_dir = Path(tempfile.gettempdir()) / "ofa-ds-bench"  # the trainer's config.yaml; no checkpoints
        self.trainer = Trainer(plan, backend)
        self.args, self.plan = args, plan

    def batches(self):
        t, tr = self.plan.run.train, self.trainer
        if self.args.synthetic:
            return synthetic_batches(self.plan.model, self.plan.run.data, t.micro_batch, self.args, seed=tr.dp_rank)
        from ofa_ds.data.loader import build_loader

        return iter(
            build_loader(
                self.plan.corpus,
                self.plan.tokenizer,
                self.plan.run.data,
                dp_rank=tr.dp_rank,
                dp_size=tr.dp,
                micro_batch=t.micro_batch,
            )
        )

    def measure(self) -> dict:
        import torch.distributed as dist

        from ofa_ds.train.engine import train_step

        tr, t = self.trainer, self.plan.run.train
        batches = self.batches()
        gas = t.accumulation(tr.dp)
        rows, source = [], torch.zeros(1, dtype=torch.float64)
        for i in range(self.args.warmup + self.args.steps):
            timed = i >= self.args.warmup
            times = {} if timed else None
            start = time.perf_counter()
            micro = [next(batches) for _ in range(gas)]
            waited = time.perf_counter() - start
            stats = train_step(
                tr.engine, micro, model_cfg=self.plan.model, num_tasks=len(tr.tasks), groups=tr.groups, times=times
            )
            seconds = time.perf_counter() - start
            if timed:
                source += sum(_source_tokens(b[s]) for b in micro for s in ("v1", "v2") if b.get(s) is not None)
                rows.append(
                    {
                        "step_s": seconds,
                        "data_wait_s": waited,
                        **{k: v for k, v in times.items() if k != "streams"},
                        "flops": stats.flops,
                        "examples": stats.examples,
                        "target_tokens": sum(stats.tokens),
                    }
                )
        activations = self._activation_peak(batches, gas) if self.args.memory else None
        dist.all_reduce(source, group=tr.groups.dp_group)
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(
            per_rank,
            {"rank": dist.get_rank(), **_memory(), **held_bytes(tr.engine), "activations_peak_bytes": activations},
        )
        return self._summary(rows, float(source) / len(rows), per_rank)

    def _activation_peak(self, batches, gas: int) -> int:
        """The peak, over the streams of one update's first micro-batch, of memory allocated and freed within a
        stream's forward + backward. With gradient accumulation the first micro-batch's gradients are allocated
        then and kept (not counted); at the update's last backward DeepSpeed copies and frees them (its buckets), so
        the later micro-batches are not measured unless there is only one."""
        from torch.profiler import ProfilerActivity, profile

        from ofa_ds.train.engine import train_step

        tr = self.trainer
        micro = [next(batches) for _ in range(gas)]
        times: dict = {}
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            train_step(
                tr.engine, micro, model_cfg=self.plan.model, num_tasks=len(tr.tasks), groups=tr.groups, times=times
            )
        events = _allocations(prof)
        first = len([s for s in ("v1", "v2") if micro[0].get(s) is not None])
        windows = times["streams"][:first] if gas > 1 else times["streams"]
        return max(transient_peak(events, begin, end) for begin, end in windows)

    def _summary(self, rows: list[dict], source_per_update: float, per_rank: list[dict]) -> dict:
        from ofa_ds.model.ofa import OFAModel
        from ofa_ds.train.ds_json import precision, zero_stage
        from ofa_ds.train.env import report

        tr, plan, t = self.trainer, self.plan, self.plan.run.train
        step = statistics.median(r["step_s"] for r in rows)
        flops = statistics.median(r["flops"] for r in rows)
        prec = precision(plan.ds)
        tflops = flops / step / tr.world / 1e12
        datasheet = datasheet_peak(prec)
        gemm = gemm_tflops(tr.engine.device, prec)
        with torch.device("meta"):
            params = OFAModel(plan.model).num_parameters()
        phases = ("data_wait_s", "forward", "backward", "optimizer", "pipeline")
        breakdown = {k.removesuffix("_s"): statistics.median(r.get(k, 0.0) for r in rows) for k in phases}
        return {
            "model": plan.model.name,
            "parameters": params,
            "model_config": plan.model.to_dict(),
            "layout": plan.run.parallel.describe(tr.world),
            "tp": plan.run.parallel.tensor,
            "pp": plan.run.parallel.pipeline,
            "dp": tr.dp,
            "zero_stage": zero_stage(plan.ds),
            "precision": prec,
            "activation_checkpointing": t.activation_checkpointing,
            "micro_batch": t.micro_batch,
            "global_batch": t.global_batch,
            "world_size": tr.world,
            "batches": "synthetic" if self.args.synthetic else plan.run.corpus,
            "warmup": self.args.warmup,
            "updates": len(rows),
            "step_s": step,
            "step_s_all": [r["step_s"] for r in rows],
            "breakdown_s": breakdown,
            "samples_per_s": statistics.median(r["examples"] for r in rows) / step,
            "vl_rows_per_s": t.global_batch / step,
            "tokens_per_s": {
                "source": source_per_update / step,
                "target": statistics.median(r["target_tokens"] for r in rows) / step,
            },
            "flops_per_update": flops,
            "tflops_per_device": tflops,
            "peak_tflops": {"datasheet": datasheet, "measured_gemm": gemm},
            "mfu": {"datasheet": tflops / datasheet if datasheet else None, "measured_gemm": tflops / gemm},
            "memory_per_rank": per_rank,
            "hardware": hardware(tr.world),
            "versions": report(),
            "config": plan.run.to_dict(),
            "ds_config": plan.ds,
            "date": time.strftime("%Y-%m-%d"),
        }


def _source_tokens(stream: dict) -> float:
    """Non-pad source tokens plus the image patches each example with an image keeps."""
    text = float((stream["src_tokens"] != 1).sum())
    idx = stream.get("patch_idx")
    per_image = idx.shape[1] if idx is not None else (stream["patch_images"].shape[-1] // 16) ** 2
    return text + per_image * float(stream["patch_masks"].sum())


# ---------------------------------------------------------------------------------------------------- memory


def _allocations(prof) -> list[tuple[int, int, int]]:
    """(time ns, bytes (negative: freed), address) of every CPU allocator event, in time order."""
    from torch._C._profiler import _EventType

    out, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            f = node.extra_fields
            out.append((node.start_time_ns, f.alloc_size, f.ptr))
        stack.extend(node.children)
    return sorted(out)


def transient_peak(events: list[tuple[int, int, int]], begin: int, end: int) -> int:
    """Peak bytes, within [begin, end], of the blocks allocated there and freed there too."""
    window = [e for e in events if begin <= e[0] <= end]
    opened, delta = {}, [0] * (len(window) + 1)
    for i, (_, size, ptr) in enumerate(window):
        if size > 0:
            opened[ptr] = (i, size)
        elif ptr in opened:
            j, n = opened.pop(ptr)
            delta[j] += n
            delta[i] -= n
    peak = current = 0
    for d in delta:
        current += d
        peak = max(peak, current)
    return peak


def _memory() -> dict:
    if torch.cuda.is_available():
        return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "peak_kind": "cuda max_memory_allocated"}
    import resource

    return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_kind": "peak RSS"}


def held_bytes(engine) -> dict:
    """Bytes of weights and of optimizer state (fp32 master partitions and AdamW's moments) this rank holds, by
    storage (a flat buffer once)."""
    seen: set[int] = set()

    def size(tensors) -> int:
        n = 0
        for x in tensors:
            s = x.untyped_storage()
            if s.nbytes() and s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                n += s.nbytes()
        return n

    module = engine.module
    weights = size(p.data for p in module.parameters())
    weights += size(p.ds_tensor for p in module.parameters() if hasattr(p, "ds_tensor"))
    opt = engine.optimizer
    master = [*getattr(opt, "fp32_partitioned_groups_flat", []), *getattr(opt, "single_partition_of_fp32_groups", [])]
    inner = getattr(opt, "optimizer", opt)
    moments = [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"params_bytes": weights, "optimizer_bytes": size(master) + size(moments)}


# ---------------------------------------------------------------------------------------------------- peaks


def datasheet_peak(precision: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    from ofa_ds.train.metrics import GPU_PEAK_TFLOPS

    for gpu, peaks in GPU_PEAK_TFLOPS.items():
        if gpu in name:
            return peaks[precision if precision != "fp32" or not torch.backends.cuda.matmul.allow_tf32 else "tf32"]
    return None


def gemm_tflops(device: torch.device, precision: str, seconds: float = 0.5) -> float:
    """Dense matmul rate measured on this device, in the run's compute dtype."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def hardware(world: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    out = {"cpu": cpu, "cpu_cores": os.cpu_count(), "ranks": world, "threads_per_rank": torch.get_num_threads()}
    if torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(), gpus_per_node=torch.cuda.device_count())
    return out


# ---------------------------------------------------------------------------------------------------- synthetic


def synthetic_batches(model_cfg, data_cfg, micro_batch: int, args, seed: int):
    """Endless micro-batches in the loader's format: per VL row, 2 v1 examples sharing one random image with
    sample_patch_num patches each; every 8th row adds 4 v2 examples (image infilling's shape: a hole, all patches)."""
    from ofa_ds.data.collate import collate
    from ofa_ds.data.tasks import TASK_ID, Example

    rng = np.random.default_rng(seed)
    R, R2, V = data_cfg.image_size, data_cfg.extra_image_size, model_cfg.vocab_size
    grid = (R // 16) ** 2
    K = data_cfg.sample_patch_num if 0 < data_cfg.sample_patch_num < grid else None

    def example(task, image, src, tgt, hole=None):
        source = [0, *rng.integers(4, V, src - 2).tolist(), 2]
        target = [*rng.integers(4, V, tgt - 1).tolist(), 2]
        patch_idx = None if K is None or task == TASK_ID["image_infilling"] else rng.permutation(grid)[:K]
        return Example(task, source, target, [0, *target[:-1]], image, 1.0, patch_idx=patch_idx, hole=hole)

    row = 0
    while True:
        v1, v2 = [], []
        for _ in range(micro_batch):
            image = rng.integers(0, 256, (3, R, R), dtype=np.uint8)
            v1 += [example(TASK_ID["caption"], image, args.src_len, args.tgt_len) for _ in range(2)]
            row += 1
            if row % 8 == 0:
                for _ in range(4):
                    hole = (R2 // 4, R2 // 4, 3 * R2 // 4, 3 * R2 // 4)
                    image2 = rng.integers(0, 256, (3, R2, R2), dtype=np.uint8)
                    v2.append(example(TASK_ID["image_infilling"], image2, args.v2_src_len, args.v2_tgt_len, hole))
        yield {"v1": collate(v1, R, model_cfg.pad_id), "v2": collate(v2, R2, model_cfg.pad_id) if v2 else None}


# ---------------------------------------------------------------------------------------------------- output


def _write(result: dict, out: Path) -> Path:
    hw = result["hardware"].get("gpu") or result["hardware"]["cpu"]
    hw = "".join(c if c.isalnum() else "-" for c in hw).strip("-")[:40]
    layout = (
        f"tp{result['tp']}_pp{result['pp']}_dp{result['dp']}_z{result['zero_stage']}_"
        f"mb{result['micro_batch']}_{result['precision']}_{result['activation_checkpointing']}"
    )
    stem = out / f"{result['model']}_{layout}_{hw}_{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    flat = {k: v for k, v in result.items() if not isinstance(v, (dict, list))}
    flat.update({f"breakdown_{k}_s": v for k, v in result["breakdown_s"].items()})
    flat.update({f"tokens_per_s_{k}": v for k, v in result["tokens_per_s"].items()})
    flat.update(
        {
            "mfu_measured_gemm": result["mfu"]["measured_gemm"],
            "mfu_datasheet": result["mfu"]["datasheet"],
            "peak_memory_gib_max": max(r["peak_gib"] for r in result["memory_per_rank"]),
        }
    )
    with stem.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat))
        w.writeheader()
        w.writerow(flat)
    return stem.with_suffix(".json")


def _plot(results: list[dict], key: str, out: Path) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("ofa-ds bench --sweep: the plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    leaf = key.split(".")[-1]
    xs = [r.get(leaf, r["config"].get(key.split(".")[0], {}).get(leaf)) for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["samples_per_s"] for r in results], "o-", label="samples/s")
    ax.set_xlabel(key)
    ax.set_ylabel("samples/s")
    ax2 = ax.twinx()
    ax2.plot(
        xs,
        [max(m["peak_gib"] for m in r["memory_per_rank"]) for r in results],
        "s--",
        color="tab:red",
        label="peak memory (GiB)",
    )
    ax2.set_ylabel("peak memory per rank (GiB)")
    ax.set_title(f"{results[0]['model']} {results[0]['layout']}: {key} sweep")
    fig.tight_layout()
    path = out / f"{results[0]['model']}_sweep_{leaf}_{results[0]['date']}.png"
    fig.savefig(path, dpi=100)
    return path


__all__ = ["Bench", "transient_peak", "held_bytes", "gemm_tflops", "synthetic_batches"]

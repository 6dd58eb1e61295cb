"""The parts of benchmarks/gpu_check.py (what each does: its docstring), each a function run in its own process by
the driver there, returning its figures or raising an Outcome (skipped / failed with a reason)."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMA = "ofa-ds gpu_check 1"
STATUSES = ("ok", "failed", "skipped")
MIN_PART_S = 30  # a part is not started with less than this left of the budget
# max |kernel - float64| / max(1, max |float64|) per tensor: the bounds of tests/test_attention_triton.py (the
# rounding of probabilities and dS to the input dtype before the P @ V and dS @ K products)
ATTENTION_TOL = {"torch.float32": 1e-5, "torch.float16": 2e-3, "torch.bfloat16": 3e-2}
# |loss_triton - loss_sdpa| <= rtol * |loss_sdpa| + atol at every update: same weights, batch and dropout-free
# model, so the curves differ only by the attention's rounding (bf16: both paths round to bf16 at different points)
LOSS_TOL = {"bf16": (0.02, 0.02), "fp16": (0.02, 0.02), "fp32": (1e-4, 1e-5)}
# attention_bench: OFA's v1 encoder (196 sampled patches + 128 text) and its image-infilling decoder (257 codes)
BENCH_SHAPES = ("enc_196+128", "dec_code_257")
BENCH_HEADS = {"ofa_base": (64, 12), "ofa_large": (64, 16), "ofa_huge": (80, 16)}  # (head dim, heads)


class Outcome(Exception):
    """A part's end other than ok: skipped (with the reason) or failed (with the error), and what it measured."""

    def __init__(self, status: str, message: str, figures: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.figures = status, message, figures or {}


def one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {' | '.join(lines[:3])}"[:1500]


def skipped(reason: str, **figures) -> Outcome:
    return Outcome("skipped", reason, figures)


def failed(error: str, **figures) -> Outcome:
    return Outcome("failed", error, figures)


# ---------------------------------------------------------------------------------------------------- parts


def part_env(args, run) -> dict:
    import importlib.metadata

    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    from ofa_ds.train.env import report

    r = report()
    gpu = {}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_gib": round(p.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
        }
    try:
        flash = importlib.metadata.version("flash-attn")
    except importlib.metadata.PackageNotFoundError:
        flash = "not installed"
    r["gpu"] = {**gpu, "cuda_home": CUDA_HOME, "flash_attn": flash}
    v = r["versions"]
    r["summary"] = f"{gpu.get('name', 'cpu')}: torch {v['torch']}, triton {v['triton']}, deepspeed {v['deepspeed']}"
    return r


def part_resnet_extension(args, run) -> dict:
    from ofa_ds.kernels.resnet import extension_available
    from ofa_ds.kernels.resnet.cuda_ext import extension_status

    before = extension_status()  # says why not without compiling anything
    if before["resnet_cuda"] == "not built":
        raise skipped(f"not built and not buildable here: {before['detail']}", status=before)
    start = time.perf_counter()
    built = extension_available()  # the public loader: loads the prebuilt library or compiles csrc/resnet
    seconds = round(time.perf_counter() - start, 1)
    status = extension_status()
    if not built:
        raise failed(f"build failed: {status['detail']}", status=status, load_s=seconds)
    errors = batch_norm_smoke()
    figures = {"status": status, "load_s": seconds, "fp32_rel_err_vs_torch": errors}
    bad = {k: v for k, v in errors.items() if v > (1e-3 if k.startswith(("dweight", "dbias", "running")) else 1e-4)}
    if bad:
        raise failed(f"fused BatchNorm differs from torch ops: {bad}", **figures)
    figures["summary"] = f"{status['resnet_cuda']} ({seconds} s); fp32 tail matches torch ops"
    return figures


def batch_norm_smoke() -> dict:
    """One ResNet tail (BatchNorm in training mode + residual + ReLU), forward and backward, fused vs torch ops, fp32;
    relative errors as tests/test_resnet_kernels.py bounds them (1e-4 elementwise, 1e-3 for the channel sums)."""
    import torch

    from ofa_ds.kernels.resnet import batch_norm_act

    torch.manual_seed(0)
    C, cl = 64, torch.channels_last
    x = torch.randn(4, C, 24, 24, device="cuda").contiguous(memory_format=cl)
    res = torch.randn(4, C, 24, 24, device="cuda").contiguous(memory_format=cl)
    dy = torch.randn(4, C, 24, 24, device="cuda")
    w, b = torch.rand(C, device="cuda") + 0.5, torch.randn(C, device="cuda")
    outs = {}
    for backend in ("torch", "cuda"):
        leaves = [t.clone().requires_grad_() for t in (x, res, w, b)]
        rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
        y = batch_norm_act(
            leaves[0], leaves[2], leaves[3], rm, rv, training=True, residual=leaves[1], relu=True, backend=backend
        )
        outs[backend] = [y, *torch.autograd.grad(y, leaves, dy), rm, rv]
    names = ("y", "dx", "dresidual", "dweight", "dbias", "running_mean", "running_var")
    return {n: rel_err(got, want) for n, got, want in zip(names, outs["cuda"], outs["torch"])}


def rel_err(got, want) -> float:
    return (got.double() - want.double()).abs().max().item() / max(1.0, want.double().abs().max().item())


def part_attention_check(args, run) -> dict:
    import torch

    from benchmarks import attention

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = attention.sweep(args.attention_cases, device)
    worst = 0.0
    for row in rows:
        bound = ATTENTION_TOL[row["dtype"]]
        row["bound"] = bound
        row["within_bound"] = all(e <= bound for e in row["rel_err"].values())
        worst = max(worst, max(row["rel_err"].values()) / bound)
    figures = {
        "device": device,
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "sizes": attention.SWEEP_SIZES[device],
        "batch": 2,
        "heads": 2,
        "cases": rows,
        "worst_fraction_of_bound": worst,
    }
    try:
        figures["flex_score_mod"] = {"status": "ok", **attention.flex_check(device)}
    except Exception as e:  # the Triton figures above stand on their own
        figures["flex_score_mod"] = {"status": "failed", "error": one_line(e)}
    outside = [f"{r['dtype']} d={r['head_dim']} {r['kind']}: {r['rel_err']}" for r in rows if not r["within_bound"]]
    if outside:
        raise failed(
            f"{len(outside)} of {len(rows)} cases outside the bounds {ATTENTION_TOL}: " + "; ".join(outside), **figures
        )
    if figures["flex_score_mod"]["status"] != "ok":
        raise failed(f"FlexAttention score_mod check: {figures['flex_score_mod']['error']}", **figures)
    kinds = sorted({r["kind"] for r in rows})
    figures["summary"] = (
        f"{len(rows)} cases on {device} ({', '.join(kinds)}), worst error {worst:.0%} of its bound; "
        "flex score_mod matches"
    )
    return figures


def part_engine(args, run, model: str = "ofa_base") -> dict:
    """One `ofa-ds bench` measurement (run = the attention backend); the driver compares the backends' losses."""
    import torch

    from ofa_ds.train.bench import _prepare
    from ofa_ds.train.engine import init_distributed
    from ofa_ds.train.pretrain import _quiet_deepspeed

    cuda = torch.cuda.is_available()
    config, lengths, (warmup, steps) = engine_config(args.out_dir, model if cuda else "cpu", run)
    ns = argparse.Namespace(config=config, synthetic=True, warmup=warmup, steps=steps, memory=False, **lengths)
    plan = _prepare(ns, [])  # as `ofa-ds bench --synthetic CONFIG` (checks the config before any process group)
    _quiet_deepspeed()
    backend = init_distributed()
    losses = []
    try:
        with recorded_losses(losses):
            bench = repeated_batch_bench()(plan, backend, ns)
            summary = bench.measure()
    except Exception as e:
        if cuda and (isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)):
            total = torch.cuda.get_device_properties(0).total_memory / 2**30
            raise skipped(
                f"{model} does not fit in {torch.cuda.get_device_name()} ({total:.0f} GiB) at micro-batch "
                f"{plan.run.train.micro_batch}: {one_line(e)}",
                losses=losses,
            ) from None
        raise
    config.with_name(f"{config.stem}_bench.json").write_text(json.dumps(summary, indent=1, default=str))
    memory = summary["memory_per_rank"][0]
    return {
        "model": summary["model"],
        "parameters": summary["parameters"],
        "device": str(bench.trainer.engine.device),
        "attn_backend": run,
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
        "kernels": bench.trainer.kernels,
        "precision": summary["precision"],
        "zero_stage": summary["zero_stage"],
        "micro_batch": summary["micro_batch"],
        "lengths": lengths,
        "updates": warmup + steps,
        "timed": steps,
        "step_s": summary["step_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "samples_per_s": summary["samples_per_s"],
        "tflops_per_device": summary["tflops_per_device"],
        "mfu": summary["mfu"],
        "peak_tflops": summary["peak_tflops"],
        "peak_memory_gib": memory["peak_gib"],
        "peak_memory_kind": memory["peak_kind"],
        "losses": losses,
    }


def engine_config(out: Path, model: str, attn_backend: str) -> tuple[Path, dict, tuple[int, int]]:
    """The run config of one engine measurement, its synthetic lengths and (warmup, timed) updates. Dropout off: the
    two backends' loss curves then differ by the attention's rounding only."""
    no_dropout = {"dropout": 0.0, "encoder_drop_path": 0.0, "decoder_drop_path": 0.0}
    if model == "cpu":  # one layer each, head dim 64 (a size the Triton kernel takes), 32 px images, 2 patches
        tiny = {
            "embed_dim": 64,
            "ffn_dim": 128,
            "heads": 1,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "resnet": "resnet18",
            "vocab_size": 300,
        }
        cfg = {
            "model": "ofa_tiny",
            "model_overrides": tiny,
            "data": {"image_size": 32, "extra_image_size": 32, "sample_patch_num": 2, "num_workers": 0},
            "deepspeed": str(ROOT / "configs/ds/cpu_demo.json"),
            "train": {"global_batch": 2, "micro_batch": 2},
        }
        lengths, updates = dict(src_len=16, tgt_len=8, v2_src_len=16, v2_tgt_len=16), (1, 2)
    else:  # OFA's data sizes (384 px v1 with 196 patches, 256 px v2), the configs' 8 VL rows per GPU, bf16 ZeRO-1
        cfg = {
            "model": model,
            "model_overrides": {},
            "data": {"num_workers": 0},
            "deepspeed": str(ROOT / "configs/ds/a100_bf16_zero1.json"),
            "train": {"global_batch": 8, "micro_batch": 8},
        }
        lengths, updates = dict(src_len=64, tgt_len=32, v2_src_len=64, v2_tgt_len=257), (5, 15)
    cfg["model_overrides"].update(attn_backend=attn_backend, **no_dropout)
    name = f"{cfg['model'] if model == 'cpu' else model}_{attn_backend}"
    cfg.update(corpus="synthetic", out_dir=str(out / "engine" / name))
    path = out / "engine" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=1))
    return path, lengths, updates


def repeated_batch_bench():
    """`ofa-ds bench`'s Bench on the first update's micro-batches repeated. The synthetic stream's random targets
    would hold the loss at log(vocabulary) whatever the attention computes; one batch learned over 20 updates makes
    the loss fall, so two backends' curves agreeing says their gradients agree. Shapes, hence throughput, are the
    same."""
    from ofa_ds.train.bench import Bench

    class RepeatedBatchBench(Bench):
        def batches(self):
            gas = self.plan.run.train.accumulation(self.trainer.dp)
            return itertools.cycle(list(itertools.islice(super().batches(), gas)))

    return RepeatedBatchBench


@contextlib.contextmanager
def recorded_losses(losses: list):
    """Bench.measure looks up ofa_ds.train.engine.train_step when it runs; the wrapper keeps each update's loss,
    which Bench's summary does not report."""
    import ofa_ds.train.engine as engine

    real = engine.train_step

    def train_step(*a, **kw):
        stats = real(*a, **kw)
        losses.append(stats.loss)
        return stats

    engine.train_step = train_step
    try:
        yield
    finally:
        engine.train_step = real


def combine_engine(results: dict[str, dict]) -> dict:
    """The part's result from its triton and sdpa runs: both ok and the losses within LOSS_TOL at every update."""
    figures = {"runs": {run: r.get("figures", {}) for run, r in results.items()}}
    bad = {run: r for run, r in results.items() if r["status"] != "ok"}
    if any(r["status"] == "failed" for r in bad.values()):
        errors = [f"{run}: {r.get('error', r.get('reason'))}" for run, r in bad.items()]
        return {"status": "failed", "error": "; ".join(errors), "figures": figures}
    if bad:
        return {
            "status": "skipped",
            "reason": "; ".join(f"{run}: {r['reason']}" for run, r in bad.items()),
            "figures": figures,
        }
    tri, ref = figures["runs"]["triton"], figures["runs"]["sdpa"]
    rtol, atol = LOSS_TOL[ref["precision"]]
    diffs = [abs(a - b) for a, b in zip(tri["losses"], ref["losses"])]
    within = len(tri["losses"]) == len(ref["losses"]) and all(
        d <= rtol * abs(b) + atol for d, b in zip(diffs, ref["losses"])
    )  # NaN compares False: outside
    figures["loss_check"] = {
        "rtol": rtol,
        "atol": atol,
        "max_abs_diff": max(diffs, default=None),
        "within": within,
        "sdpa_first_last": [ref["losses"][0], ref["losses"][-1]],
    }
    figures["triton_speedup_vs_sdpa"] = ref["step_s"] / tri["step_s"]
    where = " (Triton interpreter: not the kernel's speed)" if tri["interpreter"] else ""
    mfu = tri["mfu"]["datasheet"] if tri["mfu"]["datasheet"] is not None else tri["mfu"]["measured_gemm"]
    figures["summary"] = (
        f"{tri['model']} {tri['precision']}{where}: triton {tri['tokens_per_s']['source']:.0f} "
        f"source tok/s, {tri['step_s'] * 1e3:.0f} ms/update, peak {tri['peak_memory_gib']:.1f} GiB; "
        f"MFU {mfu:.1%}; {figures['triton_speedup_vs_sdpa']:.2f}x sdpa; loss "
        f"{ref['losses'][0]:.3f} -> {ref['losses'][-1]:.3f}, max |triton - sdpa| "
        f"{max(diffs, default=float('nan')):.2g}"
    )
    if not within:
        return {
            "status": "failed",
            "figures": figures,
            "error": f"triton losses {tri['losses']} leave sdpa's {ref['losses']} (rtol {rtol}, atol {atol})",
        }
    return {"status": "ok", "figures": figures}


def part_gpu_tests(args, run) -> dict:
    import importlib.util
    import xml.etree.ElementTree as ET

    if importlib.util.find_spec("pytest") is None:
        raise skipped("pytest is not installed")
    xml = args.out_dir / "gpu_tests.xml"
    xml.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--basetemp={args.out_dir / 'pytest_tmp'}",
        f"--junitxml={xml}",
        "tests",
    ]
    rc = subprocess.run(cmd, cwd=ROOT).returncode  # its output goes to this part's log
    if not xml.is_file():
        raise failed(f"pytest exited {rc} without a report")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    root = ET.parse(xml).getroot()
    for suite in [root] if root.tag == "testsuite" else root.findall("testsuite"):
        for k in counts:
            counts[k] += int(suite.get(k, 0))
    problems = []
    for case in root.iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                problems.append(
                    {"test": f"{case.get('classname')}::{case.get('name')}", "message": (el.get("message") or "")[:500]}
                )
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    figures = {**counts, "exit_code": rc, "problems": problems}
    if rc != 0 or counts["passed"] == 0:  # on a GPU, none passing means they did not run
        raise failed(
            f"pytest -m gpu exited {rc}: {counts['passed']} passed, {counts['failures']} failed, "
            f"{counts['errors']} errors: " + ", ".join(p["test"] for p in problems[:10]),
            **figures,
        )
    figures["summary"] = f"{counts['passed']} passed, {counts['skipped']} skipped"
    return figures


def part_attention_bench(args, run) -> dict:
    import importlib.util

    from benchmarks import attention

    heads = list(BENCH_HEADS.values())
    rows = attention.gpu_bench(argparse.Namespace(batch=0, tokens=65536), shapes=BENCH_SHAPES, heads=heads)
    table = bench_table(rows)
    figures = {
        "shapes": BENCH_SHAPES,
        "heads": BENCH_HEADS,
        "tokens_per_batch": 65536,
        "dtype": "bf16",
        "flash_attn_installed": importlib.util.find_spec("flash_attn") is not None,
        "table": table,
        "rows": rows,
    }
    sdpa = [r["speedup_vs_sdpa_bias"] for r in table if "speedup_vs_sdpa_bias" in r]
    flops = [r["triton_tflops"] for r in table if r["triton_tflops"] is not None]
    if flops:
        figures["summary"] = f"triton {min(flops):.0f}-{max(flops):.0f} TFLOP/s" + (
            f", {min(sdpa):.2f}-{max(sdpa):.2f}x SDPA with bias" if sdpa else ""
        )
    return figures


def bench_table(rows: list[dict]) -> list[dict]:
    """One line per shape x heads x mode: the Triton kernel's time, TFLOP/s and memory, and its speed-up over each
    alternative that ran (an alternative's error stays in its row)."""
    groups: dict[tuple, dict] = {}  # gpu_bench's rows run impl by impl inside a shape x heads
    for r in rows:
        groups.setdefault((r["shape"], r["head_dim"], r["heads"], r["mode"]), {})[r["impl"]] = r
    table = []
    for key, group in groups.items():
        mine = group.get("ofa_ds_triton", {})
        row = dict(
            zip(("shape", "head_dim", "heads", "mode"), key),
            triton_ms=mine.get("ms"),
            triton_tflops=mine.get("tflops"),
            triton_peak_mb=mine.get("peak_mb"),
        )
        for name, other in group.items():
            if name != "ofa_ds_triton" and "ms" in other and "ms" in mine:
                row[f"speedup_vs_{name}"] = other["ms"] / mine["ms"]
        table.append(row)
    return table


def part_resnet_bench(args, run) -> dict:
    from benchmarks import resnet

    path = args.out_dir / "resnet_bench.json"
    resnet.main(
        [
            "--models",
            "resnet101,resnet152",
            "--resolutions",
            "384",
            "--dtypes",
            "bf16",
            "--batch",
            "16",
            "--steps",
            "10",
            "--warmup",
            "3",
            "--out",
            str(path),
        ]
    )
    report = json.loads(path.read_text())
    if "gpu" in report:  # resnet.py's note: the fused kernels are not built, torch figures only
        raise skipped(f"{report['gpu']}: {report['extension']['detail']}", **report)
    speedups = {
        f"{r['model']}_{r['resolution']}_{r['dtype']}": r["speedup_vs_torch"]
        for r in report["results"]
        if "speedup_vs_torch" in r
    }
    report["summary"] = "fused vs torch ops: " + ", ".join(f"{k} {v:.2f}x" for k, v in speedups.items())
    return report

"""One command that says whether every GPU path of ofa-ds works on this node, and how fast. One JSON out.

    bash benchmarks/gpu_check.sh [OUT_DIR] [--budget SECONDS] [--only PART,PART] [--attention-cases N]

Runs with the node's own torch and only installed packages. Each part runs in its own process under its own time
limit, so a failure, a hang or a broken CUDA context is recorded and the next part still runs; the parts together
stay within --budget (default 470 s: under 8 minutes). A part the budget no longer covers is reported as skipped.

  env               `ofa-ds env`'s report and the GPU's properties (printed)
  resnet_extension  GPU: loads the csrc/resnet extension through its public loader (prebuilt, else compiled just in
                    time) and runs one fp32 BatchNorm + residual + ReLU forward and backward against torch ops; or
                    says why it is not built
  attention_check   the Triton attention against the float64 reference on the same inputs: output and the gradients
                    of q, k, v and both relative tables, per dtype x head dim (benchmarks/attention.py's sweep: fp32,
                    fp16, bf16 x 64, 80, 128, over the padded [image ; text] encoder, the causal padded text decoder
                    and the causal image-code decoder). GPU: compiled kernels at OFA's lengths (324 and 257 tokens);
                    CPU: the Triton interpreter at 29-33 tokens. Plus the benchmark's FlexAttention score_mod against
                    the reference (forward)
  engine            `ofa-ds bench`'s measurement (the DeepSpeed engine, the real training step) with
                    model.attn_backend triton, then sdpa, on one micro-batch repeated: tokens/s, MFU, peak memory and
                    each update's loss; the Triton losses must track the SDPA losses (LOSS_TOL). GPU: ofa_base, bf16,
                    20 updates; CPU: a one-layer model (head dim 64), fp32, the interpreter, 3 updates
  gpu_tests         GPU: pytest -m gpu
  attention_bench   GPU: benchmarks/attention.py's timings (the Triton kernel, SDPA with the materialised bias,
                    FlexAttention with OFA's bias as a score_mod, FlashAttention-2 without bias where installed),
                    TFLOP/s and peak memory at OFA-Base, -Large and -Huge heads
  resnet_bench      GPU: benchmarks/resnet.py, fused kernels vs torch ops, ResNet-101 and -152 at 384 px, bf16
  engine_large      GPU: engine for ofa_large (skipped when it does not fit in memory)

Writes OUT_DIR/gpu_check.json (rewritten after every part) and each process's output under OUT_DIR/logs/. Exit
status 1 when a part failed. Without CUDA the GPU parts are skipped with that reason and the others run on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_check_parts import (  # noqa: E402
    MIN_PART_S,
    SCHEMA,
    STATUSES,
    Outcome,
    combine_engine,
    one_line,
    part_attention_bench,
    part_attention_check,
    part_engine,
    part_env,
    part_gpu_tests,
    part_resnet_bench,
    part_resnet_extension,
)


@dataclass
class Part:
    name: str
    fn: Callable
    gpu_only: bool
    limit_s: int  # its own cap inside the budget: a hung part cannot take the time of the parts after it
    runs: tuple[str, ...] = ("",)  # one process each; the engine runs one per attention backend
    combine: Callable | None = None


PARTS = [
    Part("env", part_env, False, 60),
    Part("resnet_extension", part_resnet_extension, True, 240),
    Part("attention_check", part_attention_check, False, 180),
    Part("engine", part_engine, False, 240, ("triton", "sdpa"), combine_engine),
    Part("gpu_tests", part_gpu_tests, True, 150),
    Part("attention_bench", part_attention_bench, True, 180),
    Part("resnet_bench", part_resnet_bench, True, 90),
    Part("engine_large", partial(part_engine, model="ofa_large"), True, 180, ("triton", "sdpa"), combine_engine),
]

# ---------------------------------------------------------------------------------------------------- one part


def worker(args) -> int:
    """Runs one part (one run of it) in this process; its result goes to --result whatever happens."""
    part = {p.name: p for p in PARTS}[args.part]
    try:
        result = {"status": "ok", "figures": part.fn(args, args.run)}
    except Outcome as o:
        result = {"status": o.status, "reason" if o.status == "skipped" else "error": o.message, "figures": o.figures}
    except Exception as e:
        traceback.print_exc()
        result = {"status": "failed", "error": one_line(e), "figures": {}}
    args.result.write_text(json.dumps(result, indent=1, default=str))
    return 0


# ---------------------------------------------------------------------------------------------------- driver


def run_child(cmd: list[str], log: Path, timeout: float, env: dict) -> int | None:
    """Exit code, or None when it ran past `timeout` (then it and everything it started are killed)."""
    with log.open("ab") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None


def json_lines(log: Path) -> list:
    """The JSON objects a part printed one per line (benchmark rows), kept when it dies before its result."""
    rows = []
    if not log.is_file():
        return rows
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows[-200:]


def run_part(part: Part, args, limit: float, env: dict) -> dict:
    end = time.monotonic() + limit
    results, logs = {}, []
    for run in part.runs:
        tag = f"{part.name}_{run}" if run else part.name
        log, result = args.out_dir / "logs" / f"{tag}.log", args.out_dir / "logs" / f"{tag}.result.json"
        log.unlink(missing_ok=True)
        result.unlink(missing_ok=True)
        logs.append(str(log.relative_to(args.out_dir)))
        left = end - time.monotonic()
        if run != part.runs[0] and left < 5:  # the first run gets the part's limit, whatever it is
            results[run] = {"status": "failed", "error": f"no time left of the part's {limit:.0f} s", "figures": {}}
            continue
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            str(args.out_dir),
            "--part",
            part.name,
            "--run",
            run,
            "--result",
            str(result),
            "--attention-cases",
            str(args.attention_cases),
        ]
        rc = run_child(cmd, log, left, env)
        if result.is_file():
            results[run] = json.loads(result.read_text())
            continue
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        why = f"timed out after {left:.0f} s" if rc is None else f"exited {rc} without a result"
        results[run] = {
            "status": "failed",
            "error": f"{why}; log tail: {' | '.join(tail)}"[:2000],
            "figures": {"partial_rows": json_lines(log)},
        }
    out = part.combine(results) if part.combine else results[""]
    if out["status"] == "failed" and len(part.runs) == 1 and not out["figures"]:
        out["figures"]["partial_rows"] = json_lines(args.out_dir / logs[0])  # the rows before an exception
    out["logs"] = logs
    return out


def format_env(r: dict) -> str:
    lines = []
    for section in ("versions", "accelerator", "gpu", "backend", "extensions"):
        items = r.get(section, {}).items()
        lines.append(
            f"  {section}: "
            + ", ".join(f"{k} {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in items)
        )
    return "\n".join(lines)


def child_env(cuda: bool) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # a killed part's log holds everything it printed
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    if cuda:
        env.pop("TRITON_INTERPRET", None)  # the compiled kernels are what is checked
        env["DS_ACCELERATOR"] = "cuda"
    else:
        env["TRITON_INTERPRET"] = "1"  # read when triton is imported
        env["DS_ACCELERATOR"] = "cpu"
    return env


def drive(args) -> int:
    import torch

    start, started = time.monotonic(), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    args.out_dir = args.out_dir.resolve()
    (args.out_dir / "logs").mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - {p.name for p in PARTS}
    if unknown:
        print(
            f"gpu_check: --only {args.only}: unknown parts {sorted(unknown)}; parts: "
            f"{', '.join(p.name for p in PARTS)}",
            file=sys.stderr,
        )
        return 2
    env = child_env(cuda)
    out_json = args.out_dir / "gpu_check.json"
    print(
        f"gpu_check on {socket.gethostname()}: {device if cuda else 'no CUDA device: GPU parts skipped'}; torch "
        f"{torch.__version__}; budget {args.budget:.0f} s; writing {out_json}",
        flush=True,
    )
    report = {
        "schema": SCHEMA,
        "started": started,
        "seconds": 0.0,
        "budget_s": args.budget,
        "cuda": cuda,
        "device": device,
        "torch": torch.__version__,
        "host": socket.gethostname(),
        "out_dir": str(args.out_dir),
        "parts": {},
        "summary": {},
        "notes": [],
    }
    for i, part in enumerate(PARTS, 1):
        t = time.monotonic()
        left = start + args.budget - t
        limit = min(part.limit_s, left)
        if only is not None and part.name not in only:
            result = {"status": "skipped", "reason": "not selected (--only)"}
        elif part.gpu_only and not cuda:
            result = {"status": "skipped", "reason": f"needs CUDA (torch {torch.__version__} sees no CUDA device)"}
        elif left < MIN_PART_S:
            result = {
                "status": "skipped",
                "reason": f"the {args.budget:.0f} s budget is spent ({left:.0f} s left); "
                "a rerun reuses the compile caches, or raise --budget",
            }
        else:
            result = run_part(part, args, limit, env)
        result = {
            "status": result["status"],
            "gpu_only": part.gpu_only,
            "seconds": round(time.monotonic() - t, 1),
            "limit_s": round(float(max(limit, 0)), 1),
            **result,
            "figures": result.get("figures", {}),
        }
        report["parts"][part.name] = result
        if part.name == "resnet_extension" and result["status"] == "failed":
            # every later process would retry the failed compile (minutes each): they run the ResNet on torch ops
            env["OFA_DS_BUILD_CUDA"] = "0"
            report["notes"].append("resnet_extension failed: later parts ran with OFA_DS_BUILD_CUDA=0 (torch ops)")
        detail = result["figures"].get("summary") or result.get("reason") or result.get("error") or ""
        print(
            f"[{i}/{len(PARTS)}] {part.name:<17} {result['status']:<7} {result['seconds']:6.1f} s  {detail}"[:400],
            flush=True,
        )
        if part.name == "env" and result["status"] == "ok":
            print(format_env(result["figures"]), flush=True)
        report["seconds"] = round(time.monotonic() - start, 1)
        report["summary"] = {s: [n for n, p in report["parts"].items() if p["status"] == s] for s in STATUSES}
        tmp = out_json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
        tmp.replace(out_json)  # a check killed midway leaves the parts done so far
    s = report["summary"]
    print(
        f"gpu_check: {len(s['ok'])} ok, {len(s['failed'])} failed {s['failed']}, {len(s['skipped'])} skipped, "
        f"{report['seconds']:.0f} s -> {out_json}",
        flush=True,
    )
    return 1 if s["failed"] else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", nargs="?", type=Path, default=Path("gpu_check_out"), help="default ./gpu_check_out")
    p.add_argument("--budget", type=float, default=470.0, help="seconds for all parts together (default 470)")
    p.add_argument("--only", help="comma-separated parts to run (the others are reported skipped)")
    p.add_argument(
        "--attention-cases",
        type=int,
        default=9,
        help="attention_check cases: 9 has every dtype x head dim pair once, 27 each with every kind",
    )
    p.add_argument("--part", help=argparse.SUPPRESS)  # the driver's call of one part in its own process
    p.add_argument("--run", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return worker(args) if args.part else drive(args)


if __name__ == "__main__":
    sys.exit(main())

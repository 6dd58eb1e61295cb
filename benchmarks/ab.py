"""Before/after on one machine: run a benchmark in two commits' checkouts, alternately, and keep every result.

    OMP_NUM_THREADS=1 python benchmarks/ab.py --before ee30887 --reps 3 \\
        --before-args "--batch 8" --after-args "--batch 8 --shared 2" \\
        --out benchmarks/results/model_step_cpu_b8.json -- \\
        benchmarks/model_step.py --preset ofa_base --image-size 384 --patches 196 --attn sdpa --steps 3 --one sdpa

Each commit is checked out once into a git worktree under --work (its compiled data extensions copied from this
checkout); the runs alternate before, after, before, ... so that a shared machine's slow minutes fall on both. The
benchmark prints one JSON object as its last line. The summary takes medians over the runs: the step time and, for
model_step's output, the achieved FLOP/s counted with the after side's FLOPs (the FLOPs the model needs: a before
that did more work is not credited for it) over the best GEMM rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import emit  # noqa: E402


def checkout(rev: str, work: Path) -> Path:
    """A worktree of rev (HEAD: this checkout itself, uncommitted changes included)."""
    if rev == "HEAD":
        return ROOT
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    tree = work / sha
    if not tree.exists():
        subprocess.run(
            ["git", "worktree", "add", "-f", "--detach", str(tree), sha], cwd=ROOT, check=True, capture_output=True
        )
        for ext in (ROOT / "ofa_ds" / "data").glob("*.so"):
            shutil.copy2(ext, tree / "ofa_ds" / "data" / ext.name)
    return tree


def run(tree: Path, argv: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, *argv], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"ab.py: {' '.join(argv)} failed in {tree}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(before: list[dict], after: list[dict]) -> dict:
    """Medians over the runs; a before run without a GEMM rate of its own (older benchmarks) is compared with the
    GEMM rate of the after run of the same repeat, measured minutes apart."""

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    out = {"step_s_median": {"before": med(before, "step_s_median"), "after": med(after, "step_s_median")}}
    out["speedup"] = out["step_s_median"]["before"] / out["step_s_median"]["after"]
    if all(k in after[0] for k in ("step_flops", "gemm_flops_per_s")):
        needed = after[0]["step_flops"]
        ratios: dict[str, list[float]] = {"before": [], "after": []}
        for b, a in zip(before, after):
            ratios["before"].append(needed / b["step_s_median"] / b.get("gemm_flops_per_s", a["gemm_flops_per_s"]))
            ratios["after"].append(needed / a["step_s_median"] / a["gemm_flops_per_s"])
        out["needed_flops_per_step"] = needed
        out["before_gemm"] = "its own" if "gemm_flops_per_s" in before[0] else "the after run's of the same repeat"
        out["achieved_over_gemm_runs"] = ratios
        out["achieved_over_gemm"] = {side: statistics.median(v) for side, v in ratios.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--before", required=True, help="the earlier commit")
    p.add_argument("--after", default="HEAD", help="the later commit (HEAD: this checkout as it is)")
    p.add_argument("--reps", type=int, default=3, help="runs of each side, alternated")
    p.add_argument("--before-args", default="", help="arguments only the before side gets")
    p.add_argument("--after-args", default="", help="arguments only the after side gets")
    p.add_argument("--work", default="/tmp/ofa_ds_ab", help="where the worktrees go")
    p.add_argument("--out", help="also write the results to this JSON file")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the benchmark script and its arguments")
    a = p.parse_args()
    import torch

    from ofa_ds.train.env import cpu_model

    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        p.error("give the benchmark after --")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    sides = {
        "before": (checkout(a.before, Path(a.work)), command + shlex.split(a.before_args)),
        "after": (checkout(a.after, Path(a.work)), command + shlex.split(a.after_args)),
    }
    results: dict[str, list[dict]] = {"before": [], "after": []}
    for rep in range(a.reps):
        for side, (tree, argv) in sides.items():
            results[side].append(run(tree, argv))
            print(f"rep {rep + 1} {side}: step {results[side][-1].get('step_s_median')}", file=sys.stderr)
    doc = {
        "before": a.before,
        "after": a.after,
        "command": shlex.join(["python", "benchmarks/ab.py", *sys.argv[1:]]),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "commands": {side: " ".join(argv) for side, (_, argv) in sides.items()},
        "order": f"before, after alternated {a.reps} times",
        "summary": summary(results["before"], results["after"]),
        "runs": results,
        "hardware": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
    }
    emit(doc, a.out)


if __name__ == "__main__":
    main()

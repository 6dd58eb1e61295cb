"""`ofa-ds plot RUN_DIR [RUN_DIR ...]`: PNGs of a run's metrics.jsonl, several runs overlaid.

    ofa-ds plot quickstart_out/run                   # quickstart_out/run/plots/*.png
    ofa-ds plot runs/a runs/b --out plots/           # a and b on the same axes

One PNG per panel: losses per stream (train v1/v2, validation), losses per task (train and validation nll), learning
rate, throughput (samples/s, tokens/s) and MFU. A resumed run's later lines replace the earlier ones of a step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PANELS = {  # file -> (title, metric keys or a prefix ending in "/")
    "loss": ("loss per stream", ["train/loss_v1", "train/loss_v2", "val/loss_v1", "val/loss_v2"]),
    "tasks": ("nll per task", ["train/nll/", "val/nll/"]),
    "lr": ("learning rate", ["train/lr"]),
    "throughput": ("throughput", ["perf/samples_per_s", "perf/tokens_per_s"]),
    "mfu": ("model FLOPs utilisation", ["perf/mfu"]),
}


def add_arguments(p) -> None:
    p.add_argument("runs", type=Path, nargs="+", help="run directories (each with metrics.jsonl)")
    p.add_argument("--out", type=Path, help="directory for the PNGs (default: RUN_DIR/plots of the first run)")


def read(run: Path) -> dict[str, dict[int, float]]:
    """metric -> {step: value}."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(2, "no metrics.jsonl (not a run directory?)", str(path))
    series: dict[str, dict[int, float]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            print(f"{path}:{n}: not JSON, skipped (a run killed mid-write?)", file=sys.stderr)
            continue
        for k, v in row.items():
            if isinstance(v, (int, float)) and k not in ("step", "time"):
                series.setdefault(k, {})[row["step"]] = v
    return series


def plot(runs: list[Path], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {run: read(run) for run in runs}
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (title, keys) in PANELS.items():
        fig, ax = plt.subplots(figsize=(7, 4))
        drawn = 0
        for run, series in data.items():
            for key in sorted(k for k in series if any(k == m or (m.endswith("/") and k.startswith(m)) for m in keys)):
                steps = sorted(series[key])
                label = key if len(runs) == 1 else f"{run.name}: {key}"
                ax.plot(steps, [series[key][s] for s in steps], marker="." if len(steps) < 50 else None, label=label)
                drawn += 1
        if not drawn:
            plt.close(fig)
            continue
        ax.set_title(title)
        ax.set_xlabel("update")
        ax.legend(fontsize="small", ncol=2 if drawn > 6 else 1)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def run(args) -> int:
    out = args.out or args.runs[0] / "plots"
    for path in plot(args.runs, out):
        print(path)
    return 0


__all__ = ["plot", "read", "PANELS"]

"""`ofa-ds plot`: PNGs from metrics.jsonl, runs overlaid."""

import json
import subprocess
import sys

import pretrain_harness as H


def _run(d, steps, scale):
    d.mkdir(parents=True)
    rows = []
    for s in steps:
        row = {
            "step": s,
            "time": float(s),
            "train/loss_v1": scale * 10 / s,
            "train/lr": 1e-4 * s / steps[-1],
            "train/nll/caption": scale * 9 / s,
            "perf/samples_per_s": 3.0,
            "perf/tokens_per_s": 150.0,
            "perf/mfu": 0.3,
            "train/loss_v2": None,
        }
        if s % 4 == 0:
            row["train/loss_v2"] = scale * 20 / s
        rows.append(row)
    rows.append({"step": steps[-1], "time": 99.0, "val/loss_v1": 3.0, "val/nll/caption": 2.5})
    text = "\n".join(json.dumps(r) for r in rows) + "\n" + '{"step": 9, "train/lo'  # a line cut by a kill
    (d / "metrics.jsonl").write_text(text)
    return d


def test_plot_writes_the_panels_of_one_and_of_two_runs(tmp_path):
    a, b = _run(tmp_path / "a", list(range(1, 9)), 1.0), _run(tmp_path / "b", list(range(1, 13)), 1.5)
    done = subprocess.run(
        [sys.executable, "-m", "ofa_ds.cli", "plot", str(a)], env=H.env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "metrics.jsonl:10: not JSON, skipped" in done.stderr
    names = {"loss.png", "tasks.png", "lr.png", "throughput.png", "mfu.png"}
    assert {p.name for p in (a / "plots").iterdir()} == names
    assert all(
        (a / "plots" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (a / "plots" / n).stat().st_size > 5000
        for n in names
    )
    both = tmp_path / "both"
    done = subprocess.run(
        [sys.executable, "-m", "ofa_ds.cli", "plot", str(a), str(b), "--out", str(both)],
        env=H.env(),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and {p.name for p in both.iterdir()} == names
    missing = subprocess.run(
        [sys.executable, "-m", "ofa_ds.cli", "plot", str(tmp_path / "nowhere")],
        env=H.env(),
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "nowhere/metrics.jsonl: no metrics.jsonl" in missing.stderr
    assert "Traceback" not in missing.stderr

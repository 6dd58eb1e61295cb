"""How long a checkpoint takes, against a pre-emption's grace period. JSON out.

    python benchmarks/checkpoint_time.py --work /tmp/ofa_ds_ckpt --out benchmarks/results/checkpoint_time.json

Measured: `ofa-ds pretrain` of each `--measure` preset (one CPU process, fp32, ZeRO-1, a 16-row sample corpus at
32 px, OFA's BPE) for one update with a checkpoint after it; the trainer prints the checkpoint's size and seconds,
which this reads back. The write rate this gives (GB/s on this machine's disk) then turns the committed cluster
configs' per-rank checkpoint bytes into seconds: the slowest rank writes its share of the optimizer state (fp32
master weights and AdamW's two moments, 12 bytes per parameter over the data-parallel ranks) and the whole 16-bit
module of its TP/PP rank (2 bytes per parameter; DeepSpeed writes it from data-parallel rank 0). A shared
filesystem's rate per node is what matters on a cluster: rerun with `--work` on it.

The grace periods to compare with: launch/slurm.sbatch asks Slurm for SIGTERM 300 s before the time limit; the
deepspeed and torchrun launchers SIGKILL ranks 30 s after forwarding a SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import emit  # noqa: E402
from ofa_ds.config import RunConfig  # noqa: E402
from ofa_ds.plan.memory import counts  # noqa: E402

CLUSTER_CONFIGS = (
    "ofa_huge_a100x8",
    "ofa_3b_a100x8",
    "ofa_7b_a100x8",
    "ofa_huge_a100x32",
    "ofa_3b_a100x32",
    "ofa_7b_a100x32",
)
GRACE_S = {"slurm.sbatch --signal=TERM@300": 300, "launcher SIGTERM -> SIGKILL": 30}


def _env() -> dict:
    """This checkout's ofa_ds on one CPU process, wherever the command runs."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    threads = os.environ.get("OMP_NUM_THREADS", "2")
    return {**os.environ, "PYTHONPATH": path, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": threads}


def measure(preset: str, work: Path) -> dict:
    data = work / "arrow"
    if not (data / "manifest.json").is_file():
        for cmd in (
            [
                "make-sample-corpus",
                str(work / "tsv"),
                "--vl-rows",
                "16",
                "--text-rows",
                "4",
                "--image-rows",
                "2",
                "--detection-rows",
                "2",
                "--min-size",
                "32",
                "--max-size",
                "32",
            ],
            ["tsv2arrow", str(work / "tsv"), str(data), "--workers", "1"],
        ):
            subprocess.run([sys.executable, "-m", "ofa_ds.cli", *cmd], check=True, capture_output=True, env=_env())
    ds = {
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
    }
    (work / "ds.json").write_text(json.dumps(ds))
    run = {
        "model": preset,
        "corpus": str(data),
        "deepspeed": str(work / "ds.json"),
        "out_dir": str(work / preset),
        "data": {
            "image_size": 32,
            "extra_image_size": 32,
            "sample_patch_num": 2,
            "num_workers": 0,
            "tokenizer": "ofa_bpe",
        },
        "train": {"steps": 1, "global_batch": 1, "micro_batch": 1, "save_every": 1, "keep_last": 1},
    }
    (work / f"{preset}.yaml").write_text(yaml.safe_dump(run))
    done = subprocess.run(
        [sys.executable, "-m", "ofa_ds.cli", "pretrain", str(work / f"{preset}.yaml")],
        env=_env(),
        capture_output=True,
        text=True,
        cwd=work,
    )
    found = re.search(r"checkpoint \S+ \(([\d.]+) GB in ([\d.]+) s\)", done.stdout + done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{preset}: pretrain failed (rc {done.returncode}):\n{done.stderr[-2000:]}")
    gb, seconds = float(found[1]), float(found[2])
    return {"preset": preset, "checkpoint_gb": gb, "seconds": seconds, "gb_per_s": gb / seconds}


def cluster_estimate(name: str, gb_per_s: float) -> dict:
    cfg = RunConfig.from_dict(yaml.safe_load((ROOT / "configs" / "pretrain" / f"{name}.yaml").read_text()))
    tp, pp = cfg.parallel.tensor, cfg.parallel.pipeline
    gpus = int(re.search(r"x(\d+)$", name)[1])
    dp = gpus // (tp * pp)
    rank_params = counts(cfg.model_config(), tp, pp).params
    gb = (2 * rank_params + 12 * rank_params / dp) / 1e9
    return {
        "config": name,
        "layout": f"TP {tp} x PP {pp} x DP {dp}",
        "slowest_rank_gb": round(gb, 2),
        "seconds_at_measured_rate": round(gb / gb_per_s, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--work", help="scratch directory (default: a temporary one); on the filesystem to measure")
    p.add_argument("--measure", nargs="+", default=["ofa_tiny", "ofa_base"], help="presets to checkpoint for real")
    p.add_argument("--out", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        measured = [measure(preset, work) for preset in args.measure]
    rate = measured[-1]["gb_per_s"]  # the largest checkpoint's rate
    result = {
        "measured": measured,
        "grace_periods_s": GRACE_S,
        "write_rate_gb_per_s": rate,
        "clusters": [cluster_estimate(name, rate) for name in CLUSTER_CONFIGS],
        "command": " ".join(["python", "benchmarks/checkpoint_time.py", *sys.argv[1:]]),
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

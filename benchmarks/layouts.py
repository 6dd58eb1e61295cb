"""Per-rank parameter bytes and step time of the parallel layouts of tests/test_parallel_training.py, on CPU ranks;
and the model-state memory per GPU of the shipped layouts (configs/pretrain/*_a100x*.yaml).

    python benchmarks/layouts.py --work /tmp/layouts [--out benchmarks/results/layouts_cpu.json]
    python benchmarks/layouts.py --configs

--configs counts each GPU's parameters exactly (the model built on the meta device, split by TP as
parallel/tensor.py splits it, its transformer layers cut into stages as DeepSpeed's partition method cuts them, the
tied embedding on the first and last stage) and prices them for bf16 with fp32 gradient accumulation and AdamW:
2 bytes of bf16 weight and 4 of fp32 gradient per parameter, and 4 + 4 + 4 (fp32 master, exp_avg, exp_avg_sq)
divided over the data-parallel ranks (ZeRO-1/2; ZeRO-2 also divides the gradient). Activations, buffers and
communication buckets are not counted: that is the planner's work.

Runs (or reuses, under --work) the tiny-model layouts the tests train: six fp32 updates each, every rank on one
thread. Bytes are what each rank holds once DeepSpeed's engine is built: its tensor-parallel share or pipeline
stage ("share") and what ZeRO leaves resident ("resident"), split into transformer layers, the token embedding,
the ResNet and the rest. Step time is the median of updates 2-6 (`perf/step_s`, wall clock of one update) on this
machine, whose ranks share its cores: a comparison of layouts here, not a GPU figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

LAYOUTS = ["one", "tp2_zero1", "tp2_zero2", "tp2_zero3", "dp2_zero3", "tp2_dp2_zero3", "pp2_zero1", "tp2_pp2_zero1"]


def model_states(path: Path) -> dict:
    """Parameters and model-state GiB per GPU of a shipped layout (the GPU count from its name: ..._a100xN.yaml)."""
    import re

    import torch
    from deepspeed.runtime.utils import partition_balanced

    from ofa_ds.config import RunConfig, load_dict
    from ofa_ds.model.ofa import OFAModel
    from ofa_ds.parallel.pipeline import layer_prefixes
    from ofa_ds.parallel.tensor import shard
    from ofa_ds.train.ds_json import load_ds_config, zero_stage

    run = RunConfig.from_dict(load_dict(path))
    world = int(re.search(r"x(\d+)\.yaml$", path.name).group(1))
    cfg, t, p = run.model_config(), run.parallel.tensor, run.parallel.pipeline
    dp, stage = run.parallel.data_parallel(world), zero_stage(load_ds_config(ROOT / run.deepspeed))
    with torch.device("meta"):
        model = OFAModel(cfg)
        params = {n: shard(n, q, 0, t).numel() for n, q in model.named_parameters()}
    prefixes = layer_prefixes(cfg)
    per_layer = [0] * len(prefixes)
    for name, n in params.items():
        if name.startswith("embed_tokens."):
            per_layer[0] += n
            per_layer[-1] += n if p > 1 else 0
            continue
        idx = max(i for i, pre in enumerate(prefixes) if pre and name.startswith(pre))
        per_layer[idx] += n
    if p == 1:
        stages = [sum(per_layer)]
    else:
        layer_types = [1 if ".layers." in pre else 0 for pre in prefixes]
        bounds = partition_balanced(weights=layer_types, num_parts=p)
        stages = [sum(per_layer[bounds[s] : bounds[s + 1]]) for s in range(p)]
    most = max(stages)
    per_gpu = most * (2 + (4 / dp if stage >= 2 else 4) + 12 / dp)
    return {
        "gpus": world,
        "layout": run.parallel.describe(world),
        "zero_stage": stage,
        "parameters": model.num_parameters(),
        "parameters_per_gpu": most,
        "model_state_gib_per_gpu": round(per_gpu / 2**30, 2),
    }


def main() -> None:
    import pretrain_harness as H
    import test_parallel_training as T

    from ofa_ds.train.env import report

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="directory for the runs (reused when present)")
    ap.add_argument("--out", type=Path, help="write the results here as JSON (default: stdout only)")
    ap.add_argument("--configs", action="store_true", help="model states per GPU of configs/pretrain/*_a100x*.yaml")
    a = ap.parse_args()
    if a.configs:
        for path in sorted((ROOT / "configs" / "pretrain").glob("*_a100x*.yaml")):
            print(path.name, json.dumps(model_states(path)))
        return
    if a.work is None:
        ap.error("--work is required (or --configs)")
    rows = {}
    for name in LAYOUTS:
        d = T.layout_run(a.work, name)
        ranks, parallel, stage, _ = T.LAYOUTS[name]
        per_rank = [json.loads((d / "bytes" / f"rank{r}.json").read_text()) for r in range(ranks)]
        steps = H.metrics(d / "run", "perf/step_s")
        rows[name] = {
            "ranks": ranks,
            "parallel": parallel,
            "zero_stage": stage,
            "bytes_per_rank": per_rank,
            "step_s_median": statistics.median(steps[k] for k in range(2, 7)),
        }
        total = [sum(v for k, v in b.items() if not k.endswith("_resident")) for b in per_rank]
        print(
            f"{name:15s} ranks {ranks}  share MB per rank {[round(t / 2**20, 2) for t in total]}  "
            f"step {rows[name]['step_s_median']:.3f} s",
            flush=True,
        )
    result = {
        "model": {**H.TINY_MODEL, "vocab_size": H.tiny_data(a.work / "tiny_data")["vocab"]},
        "layouts": rows,
        "env": report(),
    }
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

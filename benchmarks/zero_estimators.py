"""The planner's model states of pure data-parallel ZeRO-1/2/3 against DeepSpeed's own estimators, raw. JSON on stdout.

    python benchmarks/zero_estimators.py --out benchmarks/results/zero_estimators.json

Per preset and GPU count (8 per node), fp16 mixed precision without offload (the estimators' setting), every
parameter partitioned (persistence threshold 0, as the estimators assume): the planner's params + grads + optimizer
+ buffers; DeepSpeed's `estimate_zero2_model_states_mem_needs` (ZeRO-1 and -2 share it) and
`estimate_zero3_model_states_mem_needs` with the model's largest layer; `over_estimate`, planner / estimate - 1. And
`over_estimate_with_missing` adds what the stage allocates and the estimate leaves out: ZeRO-1's whole 16-bit
gradients, 2 P (N - 1) / N (the estimator is ZeRO-2's), and ZeRO-3's 16-bit parameter shard, 2 P / N
(`fp16_partitioned_groups_flat`); tests/test_planner.py holds that within 5%.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import emit  # noqa: E402


def compare(name: str, gpus: int) -> list[dict]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from ofa_ds.config import model_preset
    from ofa_ds.plan.memory import counts, model_states

    c = counts(model_preset(name))
    kw = dict(num_gpus_per_node=8, num_nodes=gpus // 8, cpu_offload=False)
    _, zero2 = estimate_zero2_model_states_mem_needs(c.total, **kw)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(c.total, c.largest_module, **kw)
    # what each stage allocates beyond the estimate: ZeRO-1 keeps the 16-bit gradients whole (the stage-1/2
    # estimator is ZeRO-2's), ZeRO-3 keeps a 16-bit parameter shard (fp16_partitioned_groups_flat)
    missing = {1: 2 * c.total * (gpus - 1) / gpus, 2: 0.0, 3: 2 * c.total / gpus}
    rows = []
    for zero, estimate in ((1, zero2), (2, zero2), (3, zero3)):
        m = model_states(c, dp=gpus, zero=zero, precision="fp16", zero_config={"stage3_param_persistence_threshold": 0})
        planned = m["params"] + m["grads"] + m["optimizer"] + m["buffers"]
        rows.append(
            {
                "preset": name,
                "gpus": gpus,
                "zero": zero,
                "planned_bytes": int(planned),
                "estimate_bytes": estimate,
                "over_estimate": round(planned / estimate - 1, 4),
                "over_estimate_with_missing": round(planned / (estimate + missing[zero]) - 1, 4),
            }
        )
    return rows


def main() -> None:
    from ofa_ds.config import PRESETS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", default="8,64,256", help="comma-separated GPU counts (multiples of 8)")
    p.add_argument("--out", help="also write the results to this JSON file")
    a = p.parse_args()
    rows = [row for name in PRESETS for gpus in map(int, a.gpus.split(",")) for row in compare(name, gpus)]
    import deepspeed

    emit(
        {"command": shlex.join(["python", *sys.argv]), "versions": {"deepspeed": deepspeed.__version__}, "rows": rows},
        a.out,
    )


if __name__ == "__main__":
    main()

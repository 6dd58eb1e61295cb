"""The planner (ofa_ds/plan) against DeepSpeed's own model-state estimators, and its command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ofa_ds.config import PRESETS, ConfigError, model_preset
from ofa_ds.model.ofa import OFAModel
from ofa_ds.plan.memory import counts, model_states
from ofa_ds.plan.planner import Batch, Cluster, plan

GPUS = (8, 64, 256)


def _deepspeed_counts(cfg):
    """(total, largest layer) as DeepSpeed's model_to_params counts them (unique parameters; the largest module's
    own parameters), on a meta model (data_ptr, which model_to_params uses to find shared ones, is 0 there)."""
    with torch.device("meta"):
        model = OFAModel(cfg)
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def _states(cfg, gpus, zero):
    # the estimators partition every parameter: DeepSpeed's persistence threshold (small tensors kept whole) at 0
    m = model_states(
        counts(cfg), dp=gpus, zero=zero, precision="fp16", zero_config={"stage3_param_persistence_threshold": 0}
    )
    return m["params"] + m["grads"] + m["optimizer"] + m["buffers"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_model_states_match_deepspeed_estimators(name):
    """Pure data parallel, fp16 mixed precision (the estimators' setting), no offload. ZeRO-2: DeepSpeed's
    2 P + 18 P / N. ZeRO-1 keeps the 16-bit gradients whole: the ZeRO-2 estimate plus 2 P (N - 1) / N. ZeRO-3: the
    estimator's 4 x largest layer + 18 P / N, plus the 16-bit parameter shard 2 P / N that ZeRO-3 keeps
    (fp16_partitioned_groups_flat) and the estimator leaves out."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = model_preset(name)
    total, largest = _deepspeed_counts(cfg)
    assert (counts(cfg).total, counts(cfg).largest_module) == (total, largest)
    for gpus in GPUS:
        kw = dict(num_gpus_per_node=8, num_nodes=gpus // 8, cpu_offload=False)
        _, zero2 = estimate_zero2_model_states_mem_needs(total, **kw)
        _, zero3, _ = estimate_zero3_model_states_mem_needs(total, largest, **kw)
        zero1 = zero2 + 2 * total * (gpus - 1) / gpus
        for zero, estimate in ((1, zero1), (2, zero2), (3, zero3 + 2 * total / gpus)):
            planned = _states(cfg, gpus, zero)
            assert abs(planned / estimate - 1) < 0.05, (name, gpus, zero, planned, estimate)


def test_zero3_difference_is_the_parameter_shard():
    """What the ZeRO-3 comparison adds to the estimator is exactly the 16-bit shard: without it, the planner is
    that much above the estimator (whatever share of the total it is)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cfg = model_preset("ofa_huge")
    total, largest = _deepspeed_counts(cfg)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=8, num_nodes=1, cpu_offload=False
    )
    buffers = counts(cfg).buffer_bytes
    assert _states(cfg, 8, 3) - buffers - zero3 == pytest.approx(2 * total / 8, rel=1e-6)


def test_tensor_and_pipeline_split_parameters():
    """TP=2 halves every split parameter (the vocabulary padded to 256 rows), PP=2 puts about half the layers on
    the fuller stage, plus the tied embedding."""
    cfg = model_preset("ofa_base")
    one, tp2, pp2 = counts(cfg), counts(cfg, tp=2), counts(cfg, pp=2)
    assert one.params == one.total
    assert 0.5 * one.total < tp2.params < 0.6 * one.total  # the ResNet and the norms stay whole
    assert 0.5 * one.total < pp2.params < 0.75 * one.total


def test_plan_orders_fitting_layouts_first():
    layouts = plan(model_preset("ofa_huge"), Cluster(1, 8, 80), Batch(256))
    fitting = [lay for lay in layouts if lay.fits]
    assert fitting and layouts[: len(fitting)] == fitting
    times = [lay.step_time_s for lay in fitting]
    assert times == sorted(times)
    assert all(lay.memory_gib["total"] <= 80e9 / 2**30 for lay in fitting)
    assert all(lay.tp * lay.pp * lay.dp == 8 for lay in layouts)
    assert not any(lay.pp > 1 and lay.zero_stage > 1 for lay in layouts)


def test_bad_cluster_is_refused():
    with pytest.raises(ConfigError, match="gpu_memory_gb"):
        plan(model_preset("ofa_tiny"), Cluster(1, 8, 0), Batch(64))


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "ofa_ds.cli", "plan", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )


def test_cli_json_schema():
    out = _cli(
        "ofa_tiny",
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
        "--gpu-memory-gb",
        "40",
        "--global-batch",
        "64",
        "--json",
        "--top",
        "0",
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["preset"] == "ofa_tiny" and doc["parameters"] == counts(model_preset("ofa_tiny")).total
    keys = {
        "tp",
        "pp",
        "dp",
        "zero_stage",
        "micro_batch",
        "activation_checkpointing",
        "offload",
        "memory_gib",
        "step_time_s",
        "samples_per_s",
        "fits",
    }
    memory = {"params", "grads", "optimizer", "buffers", "activations", "total"}
    for lay in doc["layouts"]:
        assert keys <= set(lay) and memory <= set(lay["memory_gib"])


def test_cli_explains_what_would_fit():
    out = _cli("ofa_7b", "--nodes", "1", "--gpus-per-node", "1", "--gpu-memory-gb", "16", "--global-batch", "8")
    assert out.returncode == 1
    assert "no layout fits 16 GB" in out.stdout and "would hold it" in out.stdout
    bad = _cli("ofa_nano", "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gb", "80", "--global-batch", "8")
    assert bad.returncode == 2 and "neither a preset" in bad.stderr and "Traceback" not in bad.stderr

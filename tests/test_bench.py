"""`ofa-ds bench` on CPU ranks under the deepspeed launcher, and the planner against what those ranks measure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pretrain_harness as H
import pytest

from ofa_ds.config import ModelConfig, model_preset
from ofa_ds.plan.memory import counts, model_states, stream_activations
from ofa_ds.train.flops import StreamShape, stream_shape, train_flops

RESULT_KEYS = {
    "model": str,
    "parameters": int,
    "layout": str,
    "tp": int,
    "pp": int,
    "dp": int,
    "zero_stage": int,
    "precision": str,
    "activation_checkpointing": str,
    "micro_batch": int,
    "global_batch": int,
    "world_size": int,
    "updates": int,
    "step_s": float,
    "step_s_all": list,
    "breakdown_s": dict,
    "samples_per_s": float,
    "vl_rows_per_s": float,
    "tokens_per_s": dict,
    "flops_per_update": float,
    "tflops_per_device": float,
    "peak_tflops": dict,
    "mfu": dict,
    "memory_per_rank": list,
    "hardware": dict,
    "versions": dict,
    "config": dict,
    "ds_config": dict,
    "date": str,
}
RANK_KEYS = {"rank", "peak_gib", "peak_kind", "params_bytes", "optimizer_bytes", "activations_peak_bytes"}


def bench(tmp_path, run, ranks: int, *args) -> dict:
    """Run `ofa-ds bench` (the deepspeed launcher for several ranks, else one process) and load its JSON."""
    out = tmp_path / "results"
    cli = ["--module", "ofa_ds.cli", "bench"] if ranks > 1 else ["-m", "ofa_ds.cli", "bench"]
    port = H.free_port()
    launcher = (
        ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), "--no_local_rank"]
        if ranks > 1
        else [sys.executable]
    )
    cmd = [*launcher, *cli, str(run), "--out", str(out), *args]
    done = subprocess.run(cmd, env=H.env(), cwd=H.ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    if ranks > 1:  # DeepSpeed's CPU all-reduce segments of this run (engine.release_shm_name) are gone
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    files = sorted(out.glob("*.json"))
    assert len(files) == 1 and files[0].with_suffix(".csv").is_file(), files
    return json.loads(files[0].read_text())


def tiny_cfg(data) -> ModelConfig:
    return ModelConfig.from_dict({**model_preset("ofa_tiny").to_dict(), **H.TINY_MODEL, "vocab_size": data["vocab"]})


def assert_planned_bytes(result: dict, cfg: ModelConfig, ds: dict) -> None:
    """The planner's weight and optimizer bytes (fp32: 4 + 12 per parameter held) per rank within 5% of what each
    rank holds once the engine is built."""
    c = counts(cfg, result["tp"], result["pp"])
    planned = model_states(
        c, dp=result["dp"], zero=result["zero_stage"], precision="fp32", zero_config=ds["zero_optimization"]
    )
    for rank in result["memory_per_rank"]:
        for key in ("params", "optimizer"):
            measured = rank[f"{key}_bytes"]
            assert abs(planned[key] / measured - 1) < 0.05, (rank["rank"], key, planned[key], measured)


@pytest.mark.slow
def test_bench_on_two_ranks(tmp_path, tmp_path_factory):
    """ZeRO-3 with every parameter partitioned, the real loader on the generated corpus: the JSON's schema, the
    achieved FLOP/s (the FLOPs function's count of the updates' batches over the measured time), and the planner's
    bytes per rank."""
    data = H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")
    run = H.write_run(tmp_path, data, ds=H.DS_PARTITIONED, train={"global_batch": 4, "micro_batch": 2})
    r = bench(tmp_path, run, 2, "--warmup", "1", "--steps", "2")
    for key, kind in RESULT_KEYS.items():
        assert isinstance(r[key], kind), (key, r[key])
    assert r["layout"] == "TP 1 x PP 1 x DP 2" and r["world_size"] == 2 and r["updates"] == 2
    assert [m["rank"] for m in r["memory_per_rank"]] == [0, 1]
    assert all(RANK_KEYS <= set(m) and m["peak_gib"] > 0 for m in r["memory_per_rank"])
    assert set(r["breakdown_s"]) == {"data_wait", "forward", "backward", "optimizer", "pipeline"}
    assert sum(r["breakdown_s"].values()) <= r["step_s"] * 1.05
    assert r["tflops_per_device"] == pytest.approx(r["flops_per_update"] / r["step_s"] / 2 / 1e12)
    assert r["mfu"]["measured_gemm"] == pytest.approx(r["tflops_per_device"] / r["peak_tflops"]["measured_gemm"])
    # the updates' FLOPs from the same batches, drawn here through the loader (updates 2 and 3, both ranks)
    from ofa_ds.config import DataConfig
    from ofa_ds.data.loader import build_loader
    from ofa_ds.data.shards import Corpus
    from ofa_ds.data.tokenizer import load_tokenizer

    cfg = tiny_cfg(data)
    dcfg = DataConfig.from_dict({**DataConfig().to_dict(), **H.TINY_DATA, "tokenizer": data["tokenizer"]})
    tok = load_tokenizer(data["tokenizer"], vocab_size=cfg.vocab_size)
    per_update = {1: 0, 2: 0}
    for rank in (0, 1):
        batches = iter(
            build_loader(Corpus(data["corpus"]), tok, dcfg, dp_rank=rank, dp_size=2, micro_batch=2, consumed_samples=4)
        )
        for update in (1, 2):
            b = next(batches)
            per_update[update] += train_flops(cfg, [stream_shape(b[s]) for s in ("v1", "v2") if b.get(s) is not None])
    assert r["flops_per_update"] in ({per_update[1], per_update[2], (per_update[1] + per_update[2]) / 2})
    assert_planned_bytes(r, cfg, H.DS_PARTITIONED)


@pytest.mark.slow
def test_planner_bytes_under_tensor_parallel_zero3(tmp_path, tmp_path_factory):
    """TP=2 x DP=2 with ZeRO-3 on 4 ranks: each rank holds half the split parameters, then ZeRO-3 halves it again."""
    data = H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")
    run = H.write_run(
        tmp_path, data, ds=H.DS_FP32_ZERO3, train={"global_batch": 4, "micro_batch": 2}, parallel={"tensor": 2}
    )
    r = bench(tmp_path, run, 4, "--warmup", "0", "--steps", "1")
    assert r["layout"] == "TP 2 x PP 1 x DP 2"
    assert_planned_bytes(r, tiny_cfg(data), H.DS_FP32_ZERO3)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", ["none", "layers"])
def test_planned_activations_match_the_measured_peak(checkpointing, tmp_path):
    """ofa_tiny (the vocabulary of the sample tokenizer) on 64 px synthetic batches, one process, ZeRO-1 with 1M-element
    buckets (DeepSpeed's default 500M-element bucket would be the largest allocation of the backward): the planner's
    activations within 20% of the peak `--memory` measures."""
    ds = {
        **H.DS_FP32_ZERO3,
        "zero_optimization": {"stage": 1, "reduce_bucket_size": 10**6, "allgather_bucket_size": 10**6},
    }
    run = tmp_path / "run.yaml"
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = model_preset("ofa_tiny", vocab_size=9493)
    run.write_text(
        json.dumps(
            {
                "model": "ofa_tiny",
                "model_overrides": {"vocab_size": cfg.vocab_size},
                "data": {"image_size": 64, "extra_image_size": 64, "sample_patch_num": 8, "num_workers": 0},
                "deepspeed": str(tmp_path / "ds.json"),
                "out_dir": str(tmp_path / "run"),
                "train": {"global_batch": 4, "micro_batch": 2, "activation_checkpointing": checkpointing},
            }
        )
    )
    r = bench(
        tmp_path,
        run,
        1,
        "--synthetic",
        "--warmup",
        "1",
        "--steps",
        "1",
        "--memory",
        "--src-len",
        "32",
        "--tgt-len",
        "16",
    )
    measured = r["memory_per_rank"][0]["activations_peak_bytes"]
    # the measured stream: 2 VL rows -> 4 v1 examples on 2 images, 8 patches, 32 source and 16 target tokens
    planned = stream_activations(
        cfg, StreamShape(4, 64, 8, 32, 16, images=2), checkpoint_every=0 if checkpointing == "none" else 1
    )
    # It is the update's first backward: there the tied embedding's (V, D) gradient is allocated as the parameter's
    # gradient itself (model states, kept); in every later backward of an update (other streams, micro-batches) it
    # is a transient block summed into that one, which the planner counts for the peak.
    planned -= cfg.vocab_size * cfg.embed_dim * 4
    assert abs(planned / measured - 1) < 0.2, (planned, measured)


@pytest.mark.slow
def test_sweep_writes_a_result_per_point_and_a_plot(tmp_path, tmp_path_factory):
    data = H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")
    run = H.write_run(tmp_path, data, train={"global_batch": 2, "micro_batch": 1})
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "ofa_ds.cli",
        "bench",
        str(run),
        "--out",
        str(out),
        "--warmup",
        "0",
        "--steps",
        "1",
        "--sweep",
        "train.micro_batch=1,2",
    ]
    done = subprocess.run(cmd, env=H.env(), cwd=H.ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
    assert [r["micro_batch"] for r in results] == [1, 2]
    assert len(list(out.glob("*_sweep_micro_batch_*.png"))) == 1
    bad = subprocess.run([*cmd[:-1], "train.micro_batch"], env=H.env(), cwd=H.ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "expected KEY=V1,V2" in bad.stderr and "Traceback" not in bad.stderr

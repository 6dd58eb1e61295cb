"""Bad input to `ofa-ds pretrain` fails before any process group starts, naming the key, file or limit."""

import argparse
import json
from pathlib import Path

import pretrain_harness as H
import pytest
import torch
import torch.distributed as dist
import yaml

from ofa_ds.config import ConfigError, TrainConfig
from ofa_ds.model.convert import CheckpointError, save_safetensors
from ofa_ds.parallel.groups import ranks_by_host
from ofa_ds.train.ds_json import check_accelerator, ds_config, load_ds_config
from ofa_ds.train.engine import init_state_dict, load_weights, local_rank
from ofa_ds.train.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")


def args(config, *sets, resume=None, change_geometry=False):
    return argparse.Namespace(
        config=Path(config),
        overrides=list(sets),
        out_dir=None,
        init_from=None,
        resume=resume,
        change_geometry=change_geometry,
    )


def expect(error, match, config, *sets, **kw):
    with pytest.raises(error, match=match):
        prepare(args(config, *sets, **kw))
    assert not dist.is_initialized()


def test_a_good_config_passes_every_check(data, tmp_path):
    plan = prepare(args(H.write_run(tmp_path, data)))
    assert plan.ds["gradient_accumulation_steps"] == 8 // 2  # one rank here
    assert plan.model.embed_dim == 64 and plan.tokenizer.vocab_size == data["vocab"]
    assert not dist.is_initialized()


def test_unknown_key_and_wrong_type_are_named(data, tmp_path):
    cfg = H.write_run(tmp_path, data)
    expect(ConfigError, r"config\.train: unknown key\(s\) stepz", cfg, "train.stepz=3")
    expect(ConfigError, r"config\.train\.micro_batch: expected int, got 'two'", cfg, "train.micro_batch=two")
    expect(ConfigError, r"model_overrides: unknown key\(s\) embed_size", cfg, "model_overrides.embed_size=8")
    expect(ConfigError, r"config: unknown key\(s\) optimiser", cfg, "optimiser=adam")
    expect(ConfigError, r"--set 'train.steps': expected KEY=VALUE", cfg, "train.steps")


def test_impossible_batch_geometry_is_named_against_the_world_size(data, tmp_path, monkeypatch):
    cfg = H.write_run(tmp_path, data, train={"global_batch": 6, "micro_batch": 2})
    prepare(args(cfg))  # 6 = 2 x 1 rank x 3
    monkeypatch.setenv("WORLD_SIZE", "2")
    expect(
        ConfigError,
        r"train\.global_batch=6 is not divisible by train\.micro_batch=2 x 2 data-parallel rank\(s\) = 4",
        cfg,
    )


def test_missing_corpus_and_mismatched_tokenizer(data, tmp_path):
    cfg = H.write_run(tmp_path, data)
    expect(ConfigError, r"corpus: .*nowhere does not exist$", cfg, f"corpus={tmp_path / 'nowhere'}")
    expect(
        ConfigError,
        r"corpus: no/such/arrow does not exist \(relative paths resolve from the working directory, ",
        cfg,
        "corpus=no/such/arrow",
    )
    (tmp_path / "empty").mkdir()
    expect(ConfigError, r"corpus: .*empty/manifest\.json: missing", cfg, f"corpus={tmp_path / 'empty'}")
    expect(
        ConfigError,
        r"tokenizer .* has vocab_size %d but the model expects vocab_size 1000" % data["vocab"],
        cfg,
        "model_overrides.vocab_size=1000",
    )
    expect(ConfigError, r"no tokenizer\.json", cfg, f"data.tokenizer={tmp_path}")
    expect(ConfigError, r"init_from: .* does not exist", cfg, f"init_from={tmp_path / 'missing.pt'}")


def test_deepspeed_config_keys_owned_by_ofa_ds_or_missing_are_named(data, tmp_path):
    train = TrainConfig(global_batch=8, micro_batch=2)
    for key in ("train_batch_size", "scheduler"):
        with pytest.raises(ConfigError, match=f"ds.json: '{key}' is set by ofa-ds from train"):
            ds_config({**H.DS_FP32_ZERO3, key: 1}, train, 1, "ds.json")
    no_clip = {k: v for k, v in H.DS_FP32_ZERO3.items() if k != "gradient_clipping"}
    with pytest.raises(ConfigError, match="'gradient_clipping' is required"):
        ds_config(no_clip, train, 1, "ds.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 3},\n "optimizer": }')
    with pytest.raises(ConfigError, match=r"bad\.json: line 2"):
        load_ds_config(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "ds").glob("*.json")), ids=lambda p: p.name)
@pytest.mark.parametrize("host_fp16", [True, False], ids=["cpu_with_fp16", "cpu_without_fp16"])
def test_shipped_deepspeed_configs_are_valid(path, host_fp16, monkeypatch):
    """Whatever the checking machine's CPU: DeepSpeed's CPU accelerator reports fp16 from its oneDNN features."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: host_fp16)

    d = load_ds_config(path)
    assert d["gradient_clipping"] == 5.0  # OFA's; DeepSpeed's default would be 1.0
    assert d["optimizer"]["params"]["betas"] == [0.9, 0.999] and d["optimizer"]["params"]["weight_decay"] == 0.01
    DeepSpeedZeroConfig(**d["zero_optimization"])  # DeepSpeed's own schema (unknown keys are errors)
    merged = ds_config(d, TrainConfig(global_batch=16, micro_batch=2), 8, path.name)
    assert merged["gradient_accumulation_steps"] == 1
    if d.get("bf16", {}).get("enabled"):  # accumulate and reduce in fp32 (configs/ds/README.md)
        assert d["data_types"] == {"grad_accum_dtype": "fp32"} and d["communication_data_type"] == "fp32"


def test_precision_the_machine_lacks_is_refused_at_run_time_only(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    fp16 = load_ds_config(ROOT / "configs" / "ds" / "fp16_zero3.json")
    ds_config(fp16, TrainConfig(global_batch=16, micro_batch=2), 8, "fp16_zero3.json")
    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    with pytest.raises(ConfigError, match="fp16_zero3.json: fp16.enabled but the cpu accelerator has no fp16"):
        check_accelerator(fp16, "fp16_zero3.json")


def test_bf16_without_fp32_gradient_accumulation_is_refused():
    ds = {**H.DS_FP32_ZERO3, "bf16": {"enabled": True}}
    with pytest.raises(
        ConfigError, match=r'ds.json: bf16 needs "data_types": \{"grad_accum_dtype": "fp32"\} \(got None\)'
    ):
        ds_config(ds, TrainConfig(global_batch=8, micro_batch=2), 1, "ds.json")
    ds_config(
        {**ds, "data_types": {"grad_accum_dtype": "fp32"}}, TrainConfig(global_batch=8, micro_batch=2), 1, "ds.json"
    )


@pytest.mark.parametrize("var", ["LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"])
def test_local_rank_from_every_launcher(var, monkeypatch):
    for v in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"):
        monkeypatch.delenv(v, raising=False)
    assert local_rank() == 0
    monkeypatch.setenv(var, "5")
    assert local_rank() == 5


def test_ranks_by_host_groups_each_nodes_ranks():
    assert ranks_by_host(["a", "a", "b", "b"]) == [[0, 1], [2, 3]]
    assert ranks_by_host(["b", "a", "b", "a"]) == [[0, 2], [1, 3]]
    assert ranks_by_host(["x"]) == [[0]]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "pretrain").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_run_configs_parse(path):
    """Every run config parses and passes the layout and DeepSpeed checks; one named for N GPUs (`..._a100xN.yaml`)
    at N ranks."""
    import re

    from ofa_ds.config import RunConfig
    from ofa_ds.train.ds_json import zero_stage

    run = RunConfig.from_dict(yaml.safe_load(path.read_text()))
    sized = re.search(r"x(\d+)\.yaml$", path.name)
    world = int(sized.group(1)) if sized else run.parallel.model_parallel()
    ds = load_ds_config(ROOT / run.deepspeed)
    run.parallel.check(run.model_config(), world, zero_stage(ds))
    ds_config(ds, run.train, run.parallel.data_parallel(world), str(path), run.parallel.pipeline)


def test_the_shipped_layouts_cover_huge_3b_and_7b_on_8_and_32_gpus():
    names = {p.name for p in (ROOT / "configs" / "pretrain").glob("*_a100x*.yaml")}
    assert names == {f"ofa_{m}_a100x{n}.yaml" for m in ("huge", "3b", "7b") for n in (8, 32)}


def test_invalid_layouts_are_named_before_any_process_starts(data, tmp_path, monkeypatch):
    cfg = H.write_run(tmp_path, data)
    monkeypatch.setenv("WORLD_SIZE", "4")
    prepare(args(cfg, "parallel.tensor=2"))  # TP 2 x DP 2, the tiny model's 2 heads split in 2
    expect(ConfigError, r"parallel\.tensor=4 does not divide model heads=2", cfg, "parallel.tensor=4")
    monkeypatch.setenv("WORLD_SIZE", "3")
    expect(
        ConfigError,
        r"world size 3 is not a multiple of parallel\.tensor=2 x parallel\.pipeline=1",
        cfg,
        "parallel.tensor=2",
    )
    monkeypatch.setenv("WORLD_SIZE", "4")
    expect(ConfigError, r"parallel\.pipeline=2 with ZeRO stage 3", cfg, "parallel.pipeline=2")  # the run's JSON: ZeRO-3
    expect(ConfigError, r"parallel\.pipeline=4 stages for 1\+1 transformer layers", cfg, "parallel.pipeline=4")
    expect(ConfigError, r"sequence_parallel needs parallel\.tensor > 1", cfg, "parallel.sequence_parallel=true")
    expect(
        ConfigError,
        r"train\.global_batch=6 is not divisible by train\.micro_batch=2 x 2 data-parallel",
        cfg,
        "parallel.tensor=2",
        "train.global_batch=6",
    )
    expect(ConfigError, r"parallel\.pipeline_partition='layers'; valid", cfg, "parallel.pipeline_partition=layers")


def test_partitioned_pipe_transfers_are_refused_and_turned_off_for_pipelines():
    ds = {"optimizer": {"type": "AdamW"}, "gradient_clipping": 1.0, "zero_optimization": {"stage": 1}}
    with pytest.raises(ConfigError, match="pipe_partitioned"):
        ds_config({**ds, "pipeline": {"pipe_partitioned": True}}, TrainConfig(), 1, "x.json", 2)
    assert ds_config(ds, TrainConfig(), 1, "x.json", 2)["pipeline"] == {
        "pipe_partitioned": False,
        "grad_partitioned": False,
    }


def test_cpu_ranks_share_the_cores_without_omp_num_threads(monkeypatch):
    from ofa_ds.train import engine

    before = torch.get_num_threads()
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 16)
    monkeypatch.setenv("LOCAL_SIZE", "4")
    try:
        assert engine.cpu_threads_per_rank() == 4 and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_init_from_an_ofa_checkpoint_and_an_export(tmp_path):
    from ofa_ds.model.convert import load_any
    from ofa_ds.model.ofa import OFAModel

    fixture = ROOT / "tests" / "assets" / "ofa_small_ref" / "ofa_small_ref_checkpoint.pt"
    cfg, ofa_sd = load_any(fixture)
    cfg.vocab_size = 2100  # a larger tokenizer: rows appended by OFA's rule
    sd = init_state_dict(fixture, cfg)
    model = OFAModel(cfg)
    load_weights(model, sd)
    emb = model.embed_tokens.weight.detach()
    assert emb.shape[0] == 2100 and emb[:2000].equal(ofa_sd["embed_tokens.weight"].float())
    save_safetensors(model.state_dict(), cfg, tmp_path / "m.safetensors")
    again = OFAModel(cfg)
    load_weights(again, init_state_dict(tmp_path / "m.safetensors", cfg))
    assert all(a.equal(b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    cfg.embed_dim, cfg.encoder_layers = 128, 3
    with pytest.raises(
        CheckpointError, match=r"embed_dim: 256 in the checkpoint, 128 in this run\n  encoder_layers: 2"
    ):
        init_state_dict(fixture, cfg)


def test_resume_refuses_a_checkpoint_of_another_model_naming_the_differences(data, tmp_path):
    cfg = H.write_run(tmp_path, data)
    tag = tmp_path / "run" / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    plan = prepare(args(cfg))
    meta = {
        "step": 2,
        "world_size": 1,
        "model": {**plan.model.to_dict(), "ffn_dim": 256, "heads": 4},
        "config": plan.run.to_dict(),
    }
    (tag / "meta.json").write_text(json.dumps(meta))
    (tag.parent / "latest").write_text(tag.name)
    expect(
        ConfigError,
        r"different model config \(checkpoint -> this run\):\n  ffn_dim: 256 -> 128\n  heads: 4 -> 2",
        cfg,
        resume="",
    )
    expect(ConfigError, r"already has checkpoints: pass --resume", cfg)
    meta["model"] = plan.model.to_dict()
    meta["world_size"] = 2
    (tag / "meta.json").write_text(json.dumps(meta))
    expect(
        ConfigError,
        r"written at layout TP 1 x PP 1 x DP 2 \(2 ranks\), this run is TP 1 x PP 1 x DP 1 \(1 "
        r"ranks\).*run `ofa-ds to-universal .*step_00000002` once",
        cfg,
        resume="",
    )
    (tag / "meta.json").unlink()
    expect(ConfigError, r"step_00000002: incomplete checkpoint", cfg, resume=str(tag))


def test_resume_with_another_schedule_or_data_order_is_refused_unless_accepted(data, tmp_path):
    cfg = H.write_run(tmp_path, data)
    tag = tmp_path / "run" / "checkpoints" / "step_00000002"
    tag.mkdir(parents=True)
    plan = prepare(args(cfg))
    meta = {"step": 2, "world_size": 1, "model": plan.model.to_dict(), "config": plan.run.to_dict()}
    (tag / "meta.json").write_text(json.dumps(meta))
    (tag.parent / "latest").write_text(tag.name)
    assert prepare(args(cfg, "train.log_every=5", resume="")).resume == tag  # not geometry: printed, accepted
    expect(
        ConfigError,
        r"another schedule or data order \(checkpoint -> this run\):\n  data\.seed: 7 -> 8\n"
        r"  train\.micro_batch: 2 -> 4\n  train\.steps: 6 -> 9\nresume with the checkpoint's values, "
        r"or pass --change-geometry",
        cfg,
        "train.steps=9",
        "train.micro_batch=4",
        "data.seed=8",
        resume="",
    )
    expect(ConfigError, r"train\.global_batch: 8 -> 16", cfg, "train.global_batch=16", resume="")
    plan = prepare(args(cfg, "train.steps=9", resume="", change_geometry=True))
    assert plan.resume == tag and plan.run.train.steps == 9


def test_env_reports_versions_backend_and_extensions(capsys):
    from ofa_ds.cli import main

    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["versions"]["deepspeed"] == __import__("deepspeed").__version__
    assert report["backend"]["pretrain_uses"] == ("nccl" if torch.cuda.is_available() else "gloo")
    assert {"fused_adam", "cpu_adam", "ofa_ds resnet_cuda", "triton", "ofa_ds pixel_ops", "ofa_ds jpegtran"} <= report[
        "extensions"
    ].keys()

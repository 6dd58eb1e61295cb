"""Tensor- and pipeline-parallel pretraining on CPU ranks (gloo, fp32) trains as the layouts without them.

Six updates from the same seed (the full model is built from train.seed on every rank, then sliced or cut into
stages), gradient clipping active (norms ~12 against a clip of 1.0): per-update losses within 1e-5 and exported
parameters within 1e-5. A layout is compared with the layout of the same data-parallel size, which sees the same
micro-batches: TP=2, PP=2 and TP=2 x PP=2 with one process, TP=2 x DP=2 with DP=2 (which
tests/test_engine_equivalence.py ties to a single process).
"""

import json
import shutil

import pretrain_harness as H
import pytest
import torch

from ofa_ds.cli import main as cli
from ofa_ds.model.convert import load_safetensors

OFF = {"dropout": 0.0, "encoder_drop_path": 0.0, "decoder_drop_path": 0.0}
# Frozen BatchNorm in the runs compared over six updates: with batch statistics of the tiny ResNet's few-pixel maps,
# the order of a sum (TP reduces the encoder's input gradient over ranks, ZeRO and the pipeline reduce in their
# own orders) changes ResNet gradients by percents after a few updates, with equal losses (measured on the plain
# model against TP=2: 1e-6 at the first update, 8% at the third; 2e-5 with frozen BatchNorm). The first update's
# gradients with batch statistics are compared in tests/test_tensor_parallel.py.
FROZEN_BN = {"bn_mode": "frozen"}
LAYOUTS = {  # name: (ranks, parallel section, ZeRO stage, dropout on)
    "one": (1, {}, 1, False),
    "tp2_zero3": (2, {"tensor": 2}, 3, False),
    "tp2_zero1": (2, {"tensor": 2}, 1, False),
    "tp2_zero2": (2, {"tensor": 2}, 2, False),
    "dp2_zero3": (2, {}, 3, False),
    "tp2_dp2_zero3": (4, {"tensor": 2}, 3, False),
    "dp4_zero3": (4, {}, 3, False),
    "one_dropout": (1, {}, 1, True),
    "tp2_zero3_dropout": (2, {"tensor": 2}, 3, True),
    "pp2_zero1": (2, {"pipeline": 2}, 1, False),
    "tp2_pp2_zero1": (4, {"tensor": 2, "pipeline": 2}, 1, False),
    "pp2_zero1_dropout": (2, {"pipeline": 2}, 1, True),
    # lr 1e-3, to see the loss fall in six updates
    "tp2_dp2_zero3_learns": (4, {"tensor": 2}, 3, True),
    "pp2_zero1_learns": (2, {"pipeline": 2}, 1, True),
    "tp2_pp2_zero1_learns": (4, {"tensor": 2, "pipeline": 2}, 1, True),
    # activation checkpointing: every layer recomputed in the backward, dropout on
    "tp2_zero3_dropout_ac": (2, {"tensor": 2}, 3, True),
    "pp2_zero1_dropout_ac": (2, {"pipeline": 2}, 1, True),
    # sequence parallelism (the tiny corpus's sequences are even: the same dropout masks as one process)
    "tp2_sp_zero3": (2, {"tensor": 2, "sequence_parallel": True}, 3, False),
    "tp2_pp2_sp_zero1": (4, {"tensor": 2, "pipeline": 2, "sequence_parallel": True}, 1, False),
    "tp2_sp_zero3_dropout_ac": (2, {"tensor": 2, "sequence_parallel": True}, 3, True),
    "dp2_zero3_dropout": (2, {}, 3, True),
    "dp2_zero3_dropout_ac": (2, {}, 3, True),
}


def ds_json(stage: int, lr: float) -> dict:
    # AdamW's eps 1e-4 instead of OFA's 1e-8: with 1e-8, gradient entries near float-noise level (layouts sum the
    # same terms in another order) take whole +-lr steps whose sign is the noise's. Measured: PP=2's first-update
    # gradients equal the single process's to 3e-7 relative, yet with eps 1e-6 six updates later ResNet weights
    # differed by 1e-4, one lr step.
    params = {**H.DS_FP32_ZERO3["optimizer"]["params"], "lr": lr, "eps": 1e-4}
    opt = {**H.DS_FP32_ZERO3["optimizer"], "params": params}
    return {**H.DS_FP32_ZERO3, "zero_optimization": {"stage": stage}, "gradient_clipping": 1.0, "optimizer": opt}


def write(d, data, name: str):
    ranks, parallel, stage, dropout = LAYOUTS[name]
    model = {
        **H.TINY_MODEL,
        "vocab_size": data["vocab"],
        **({} if dropout else OFF),
        **({} if name.endswith("_learns") else FROZEN_BN),
    }
    lr, warmup = (1e-3, 0.0) if name.endswith("_learns") else (1e-4, 0.01)
    ds = ds_json(stage, lr)
    if name.startswith("dp2_zero3_dropout"):  # every parameter partitioned: recomputes must gather them again
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return H.write_run(
        d,
        data,
        ds=ds,
        parallel=parallel,
        model_overrides=model,
        train={
            "save_every": 2,
            "keep_last": 4,
            "warmup_ratio": warmup,
            "activation_checkpointing": "layers" if name.endswith("_ac") else "none",
        },
    )


def layout_run(base, name: str):
    """The run directory of a finished layout (made once per session), its export in d/export.safetensors."""
    d = base / "layouts" / name
    if not (d / "done").is_file():
        data = H.tiny_data(base / "tiny_data")
        run = write(d, data, name)
        codes, out = H.launch(LAYOUTS[name][0], [str(run)], harness=["--param-bytes", str(d / "bytes")])
        assert codes == [0] * LAYOUTS[name][0], out
        assert f"sequence parallel {'on' if LAYOUTS[name][1].get('sequence_parallel') else 'off'}" in out
        assert cli(["export", str(d / "run"), str(d / "export.safetensors")]) == 0
        (d / "done").write_text(out)
    return d


def assert_same_training(got, want, *, exact: bool = False, steps=range(1, 7)):
    """Losses of `steps` and the exported parameters within 1e-5, or bit-identical."""
    losses, ref = ({k: v for k, v in H.metrics(d / "run").items() if k in steps} for d in (got, want))
    assert losses.keys() == ref.keys() == set(steps)
    if exact:
        assert losses == ref
    else:
        assert all(abs(losses[k] - ref[k]) <= 1e-5 for k in ref), (losses, ref)
    a, b = load_safetensors(got / "export.safetensors")[1], load_safetensors(want / "export.safetensors")[1]
    assert a.keys() == b.keys()
    if exact:
        assert [k for k in b if not torch.equal(a[k], b[k])] == []
        return
    stats = ("running_mean", "running_var", "num_batches_tracked")
    params = [k for k in b if not k.endswith(stats)]
    worst = max(float((a[k] - b[k]).abs().max()) for k in params)
    assert worst <= 1e-5, worst
    # BatchNorm running statistics follow the weights through six updates of activations with variance ~10
    worst_stat = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1.0)) for k in b if k.endswith(stats))
    assert worst_stat <= 1e-4, worst_stat


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["tp2_zero3", "tp2_zero2", "tp2_zero1", "pp2_zero1", "tp2_pp2_zero1", "tp2_sp_zero3", "tp2_pp2_sp_zero1"]
)
def test_model_parallel_layouts_train_as_one_process(name, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    one = layout_run(base, "one")
    assert min(H.metrics(one / "run", "train/grad_norm").values()) > 1.0  # clipping acts at every update
    assert_same_training(layout_run(base, name), one)


@pytest.mark.slow
def test_tp2_dp2_trains_as_dp2(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    run = layout_run(base, "tp2_dp2_zero3")
    assert "TP 2 x PP 1 x DP 2 = 4 rank(s)" in (run / "done").read_text()
    assert_same_training(run, layout_run(base, "dp2_zero3"))


@pytest.mark.slow
def test_tp2_splits_the_layers_and_the_embedding(tmp_path_factory):
    """Measured on the live ranks: each TP rank holds half of TP=1's transformer-layer and embedding bytes."""
    base = tmp_path_factory.getbasetemp()
    one = json.loads((layout_run(base, "one") / "bytes" / "rank0.json").read_text())
    for rank in (0, 1):  # ZeRO-1 leaves every parameter resident
        tp = json.loads((layout_run(base, "tp2_zero1") / "bytes" / f"rank{rank}.json").read_text())
        for part in ("layers", "embedding", "layers_resident", "embedding_resident"):
            assert abs(tp[part] / one[part] - 0.5) <= 0.05 * 0.5, (part, tp[part], one[part])
        assert tp["resnet"] == one["resnet"]  # replicated


@pytest.mark.slow
def test_pp2_splits_the_layers(tmp_path, tmp_path_factory):
    """Measured on the live ranks of a PP=2 run of a 3+2-layer model split by layer type: each stage holds half
    (within 10%) of the plain model's transformer-layer bytes, and the two stages hold all of them."""
    import yaml

    from ofa_ds.config import RunConfig
    from ofa_ds.model.ofa import OFAModel

    base = tmp_path_factory.getbasetemp()
    run = write(tmp_path, H.tiny_data(base / "tiny_data"), "pp2_zero1")
    cfg = yaml.safe_load(run.read_text())
    cfg["model_overrides"].update(encoder_layers=3, decoder_layers=2)
    cfg["parallel"]["pipeline_partition"] = "type:EncoderLayer|DecoderLayer"
    cfg["train"]["steps"] = 1
    run.write_text(yaml.safe_dump(cfg))
    codes, out = H.launch(2, [str(run)], harness=["--param-bytes", str(tmp_path / "bytes")])
    assert codes == [0, 0], out
    model = OFAModel(RunConfig.from_dict(cfg).model_config())
    layers = sum(p.numel() * 4 for n, p in model.named_parameters() if ".layers." in n)
    stages = [json.loads((tmp_path / "bytes" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sum(s["layers"] for s in stages) == layers
    for s in stages:
        assert abs(s["layers"] / layers - 0.5) <= 0.1 * 0.5, (s["layers"], layers)
    assert stages[0]["resnet"] > 0 and "resnet" not in stages[1]  # the ResNet lives on the first stage


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp2_zero3_dropout", "tp2_sp_zero3_dropout_ac"])
def test_tp2_with_dropout_draws_the_same_masks(name, tmp_path_factory):
    """TP=2, and TP=2 with sequence parallelism (each rank's slice of the whole sequence's masks) and every layer
    recomputed in the backward: the masks of one process."""
    base = tmp_path_factory.getbasetemp()
    one, tp = layout_run(base, "one_dropout"), layout_run(base, name)
    assert_same_training(tp, one)  # other masks would move the first loss by ~3e-2 (dropout on vs off: 3.2e-2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp2_zero3_dropout", "pp2_zero1_dropout", "dp2_zero3_dropout"])
def test_activation_checkpointing_recomputes_the_same_masks(name, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    run = layout_run(base, name + "_ac")
    assert "activation checkpointing layers" in (run / "done").read_text()
    assert_same_training(run, layout_run(base, name))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp2_dp2_zero3_learns", "pp2_zero1_learns", "tp2_pp2_zero1_learns"])
def test_layouts_with_dropout_learn(name, tmp_path_factory):
    loss = H.metrics(layout_run(tmp_path_factory.getbasetemp(), name) / "run")
    # updates 1, 3, 5 and 2, 4, 6 have the same streams (under DP=2 the odd ones are v1 only)
    assert loss[5] < loss[1] - 0.1 and loss[6] < loss[2] - 0.1, loss


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, change, other",
    [
        ("tp2_zero3_dropout", ["parallel.tensor=1"], "TP 1 x PP 1 x DP 2"),
        ("pp2_zero1_dropout", ["parallel.pipeline=1", "parallel.tensor=2"], "TP 2 x PP 1 x DP 1"),
    ],
)
def test_resume_after_sigkill_is_bit_identical(name, change, other, tmp_path, tmp_path_factory):
    """OFA's dropout and drop-path on: killed after update 5, resumed from checkpoint 4, the same losses and
    exported weights as the uninterrupted run, bit for bit."""
    base = tmp_path_factory.getbasetemp()
    ref = layout_run(base, name)
    run = write(tmp_path, H.tiny_data(base / "tiny_data"), name)
    codes, out = H.launch(2, [str(run)], harness=["--fault", "kill@5"])
    assert codes == [-9, -9], out
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_00000004"
    # another layout is refused before any process group starts, naming both
    codes, out = H.launch(2, [str(run), "--resume", *[a for c in change for a in ("--set", c)]])
    assert codes == [2, 2] and f"this run is {other}" in out, out
    codes, out = H.launch(2, [str(run), "--resume"])
    assert codes == [0, 0], out
    assert cli(["export", str(tmp_path / "run"), str(tmp_path / "export.safetensors")]) == 0
    assert_same_training(tmp_path, ref, exact=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "source, target, last",
    [
        ("tp2_zero3", "one", 6),  # TP=2 -> TP=1
        ("pp2_zero1", "one", 6),  # PP=2 -> PP=1
        # DP=4 draws v2 examples at other updates (OFA counts rows per rank): update 5 alone matches DP=2's
        ("tp2_dp2_zero3", "dp4_zero3", 5),
    ],
)
def test_resume_at_another_layout(source, target, last, tmp_path, tmp_path_factory):
    """Checkpoint 4 of a layout resumed at another through `ofa-ds to-universal`: the next losses and the weights
    after them as continuing unchanged, within 1e-5. The weights test AdamW's moments too: restarted from zero they
    would move by about lr (1e-4) at the first update."""
    base = tmp_path_factory.getbasetemp()
    data = H.tiny_data(base / "tiny_data")
    src = layout_run(base, source)
    tag = tmp_path / "step_00000004"
    shutil.copytree(src / "run" / "checkpoints" / tag.name, tag)
    ranks = LAYOUTS[target][0]
    run = write(tmp_path / "to", data, target)
    resume = [str(run), "--resume", str(tag), "--set", "train.save_every=1"]
    codes, out = H.launch(ranks, resume)
    assert codes == [2] * ranks and f"run `ofa-ds to-universal {tag}` once" in out, out
    assert cli(["to-universal", str(tag)]) == 0
    codes, out = H.launch(ranks, resume)
    assert codes == [0] * ranks, out
    assert "(universal)" in out
    step = f"run/checkpoints/step_{last:08d}"
    assert cli(["export", str(tmp_path / "to" / step), str(tmp_path / "to" / "export.safetensors")]) == 0
    if last == 6:
        want = src
    else:  # continuing unchanged from the same checkpoint
        want = tmp_path / "same"
        codes, out = H.launch(
            LAYOUTS[source][0], [str(write(want, data, source)), "--resume", str(tag), "--set", "train.save_every=1"]
        )
        assert codes == [0] * LAYOUTS[source][0], out
        assert cli(["export", str(want / step), str(want / "export.safetensors")]) == 0
    assert_same_training(tmp_path / "to", want, steps=range(5, last + 1))


@pytest.mark.slow
def test_validation_under_a_pipeline_equals_one_process(tmp_path, tmp_path_factory):
    """Validation (run before the first update) through the pipeline engine gives one process's sums."""
    data = H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")
    val = {}
    for name, ranks in (("one", 1), ("pp2_zero1", 2)):
        run = write(tmp_path / name, data, name)
        codes, out = H.launch(
            ranks,
            [
                str(run),
                "--set",
                f"val_corpus={data['corpus']}",
                "--set",
                "train.steps=1",
                "--set",
                "train.eval_every=1",
                "--set",
                "train.eval_batches=2",
            ],
        )
        assert codes == [0] * ranks, out
        val[name] = {k: H.metrics(tmp_path / name / "run", k)[0] for k in ("val/loss", "val/nll/caption")}
    assert all(abs(val["pp2_zero1"][k] - v) <= 1e-6 for k, v in val["one"].items()), val

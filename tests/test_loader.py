import itertools

import pytest
import torch
from data_fixtures import small_corpus, vl_row

from ofa_ds.config import ConfigError, DataConfig
from ofa_ds.data.collate import model_inputs
from ofa_ds.data.loader import build_loader
from ofa_ds.data.tasks import TASKS, DataError
from ofa_ds.data.tokenizer import load_tokenizer

CFG = DataConfig(image_size=64, extra_image_size=32, sample_patch_num=9)  # 16 patches per v1 image


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("ofa_bpe")


@pytest.fixture(scope="module")
def corpus():
    return small_corpus()


def take(loader, n):
    return list(itertools.islice(loader, n))


def assert_same(a, b):
    assert (a["v2"] is None) == (b["v2"] is None)
    for s in ("v1", "v2"):
        if a[s] is None:
            continue
        assert a[s].keys() == b[s].keys()
        for k in a[s]:
            assert torch.equal(a[s][k], b[s][k]), (s, k)


def test_stream_format(tok, corpus):
    loader = build_loader(corpus, tok, CFG, dp_rank=0, dp_size=1, micro_batch=8, consumed_samples=0, num_workers=0)
    batch = next(iter(loader))
    v1, v2 = batch["v1"], batch["v2"]
    assert v1["src_tokens"].shape[0] == 16 and v2["src_tokens"].shape[0] == 4  # 2 per row; 2 + 1 + 1 extras
    for s, r in ((v1, 64), (v2, 32)):
        b, length = s["src_tokens"].shape
        t = s["target"].shape[1]
        assert length % 8 == 0 and t % 8 == 0 and s["prev_output_tokens"].shape == (b, t)
        n = s["patch_images"].shape[0]  # distinct images
        assert s["patch_images"].shape == (n, 3, r, r) and s["patch_images"].dtype == torch.uint8
        assert s["image_index"].shape == (b,) and s["image_index"].dtype == torch.long
        assert sorted(set(s["image_index"].tolist())) == list(range(n))
        assert s["patch_holes"].shape == (b, 4) and s["patch_holes"].dtype == torch.long
        for k in ("patch_masks", "code_masks"):
            assert s[k].shape == (b,) and s[k].dtype == torch.bool
        assert s["weights"].dtype == torch.float32 and s["task_ids"].dtype == torch.long
        assert (s["src_tokens"][:, 0] == 0).all()
        # right padding: after a sequence's eos only pad
        for row in s["src_tokens"]:
            end = row.tolist().index(2)
            assert (row[end + 1 :] == 1).all()
        assert (s["prev_output_tokens"][:, 0] == 0).all()
    assert v1["patch_idx"].shape == (16, 9) and "patch_idx" not in v2
    assert v1["patch_masks"].all() and not v1["code_masks"].any()
    # a VL row's two examples share one image, shipped once; both text infilling examples use one zero image
    assert v1["image_index"].tolist() == [i // 2 for i in range(16)] and v1["patch_images"].shape[0] == 8
    assert v2["image_index"].tolist() == [0, 0, 1, 2] and v2["patch_images"].shape[0] == 3
    assert [TASKS[i] for i in v2["task_ids"]] == ["text_infilling", "text_infilling", "image_infilling", "detection"]
    assert v2["patch_masks"].tolist() == [False, False, True, True] and v2["code_masks"].tolist() == [0, 0, 1, 0]
    assert (v2["patch_images"][0] == 0).all() and v2["weights"].tolist() == [2.0] * 4
    assert v2["patch_holes"].tolist() == [[0] * 4, [0] * 4, [8, 8, 24, 24], [0] * 4]  # infilling: the centre 16 x 16
    assert v1["patch_holes"].eq(0).all()
    assert torch.equal(v2["patch_images"][1, :, 0, 0], torch.tensor([0, 100, 50], dtype=torch.uint8))
    assert loader.state_dict() == {"consumed_samples": 8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_inputs_normalise_as_torchvision(tok, corpus, dtype):
    """uint8 pixels -> ToTensor + Normalize(0.5, 0.5) exactly, then the model's dtype; the image infilling hole is
    0, as OFA's collate gives it. The model gets the images of the examples that have one (not the text examples'
    zero image), each (image, hole) once."""
    v2 = next(iter(build_loader(corpus, tok, CFG, dp_rank=0, dp_size=1, micro_batch=8, num_workers=0)))["v2"]
    x = model_inputs(v2, "cpu", dtype)
    assert x.keys() == v2.keys() - {"patch_holes"}
    assert all(torch.equal(x[k], v2[k]) for k in x if k not in ("patch_images", "image_index"))
    # examples: two text infilling (row 0, no image), image infilling (row 1, hole), detection (row 2)
    expected = (v2["patch_images"][1:].float() / 255 - 0.5) / 0.5  # torchvision: to_tensor's div, normalize's sub, div
    expected[0, :, 8:24, 8:24] = 0  # the infilling hole
    assert x["patch_images"].dtype == dtype and torch.equal(x["patch_images"], expected.to(dtype))
    assert x["image_index"].tolist()[2:] == [0, 1]  # the text examples' rows are padding: any row
    assert torch.equal(x["patch_images"][0, :, 0, 0], ((torch.tensor([0.0, 100.0, 50.0]) / 255 - 0.5) / 0.5).to(dtype))
    with pytest.raises(TypeError, match="uint8"):  # already-normalised images would be scaled twice
        model_inputs({**v2, "patch_images": x["patch_images"]}, "cpu", dtype)


def test_model_inputs_one_image_per_distinct_image_and_hole():
    """A v1 stream's VL rows give one image per row; the same image with another hole is another image; a stream
    without any image keeps one image, all 0."""
    pixels = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    hole = [2, 3, 10, 12]
    stream = {
        "src_tokens": torch.ones(5, 8, dtype=torch.long),
        "patch_images": pixels,
        "image_index": torch.tensor([1, 1, 2, 2, 1]),
        "patch_masks": torch.ones(5, dtype=torch.bool),
        "patch_holes": torch.tensor([[0] * 4, [0] * 4, [0] * 4, [0] * 4, hole]),
    }
    x = model_inputs(stream, "cpu", torch.float32)
    normalised = (pixels.float() / 255 - 0.5) / 0.5
    with_hole = normalised[1].clone()
    with_hole[:, 3:12, 2:10] = 0  # rows y0:y1, columns x0:x1
    assert x["image_index"].tolist() == [0, 0, 2, 2, 1]
    assert torch.equal(x["patch_images"], torch.stack([normalised[1], with_hole, normalised[2]]))
    text_only = model_inputs({**stream, "patch_masks": torch.zeros(5, dtype=torch.bool)}, "cpu", torch.float32)
    assert text_only["patch_images"].shape == (1, 3, 16, 16) and text_only["patch_images"].eq(0).all()
    assert text_only["image_index"].tolist() == [0] * 5


def test_v2_is_none_without_extras(tok, corpus):
    loader = build_loader(corpus, tok, CFG, dp_rank=0, dp_size=1, micro_batch=4, consumed_samples=0, num_workers=0)
    assert [b["v2"] is None for b in take(loader, 4)] == [True, False, True, False]


@pytest.mark.slow
def test_same_batches_for_0_1_2_workers(tok, corpus):
    runs = [
        take(build_loader(corpus, tok, CFG, dp_rank=1, dp_size=2, micro_batch=4, consumed_samples=0, num_workers=w), 5)
        for w in (0, 1, 2)
    ]
    for batches in runs[1:]:
        for a, b in zip(runs[0], batches):
            assert_same(a, b)


def test_resume_from_consumed_samples(tok, corpus):
    kw = dict(dp_rank=0, dp_size=2, micro_batch=4, num_workers=0)
    loader = build_loader(corpus, tok, CFG, consumed_samples=0, **kw)
    it = iter(loader)
    first = [next(it) for _ in range(2)]
    state = loader.state_dict()
    assert state == {"consumed_samples": 16}
    rest = [next(it) for _ in range(3)]  # crosses the epoch boundary (24 rows)
    resumed = take(build_loader(corpus, tok, CFG, consumed_samples=state["consumed_samples"], **kw), 3)
    for a, b in zip(rest, resumed):
        assert_same(a, b)
    assert not torch.equal(first[0]["v1"]["src_tokens"][:2], first[1]["v1"]["src_tokens"][:2])
    with pytest.raises(ValueError, match="consumed_samples=12"):
        build_loader(corpus, tok, CFG, consumed_samples=12, **kw)


def test_ranks_differ_and_agree_on_v2(tok, corpus):
    kw = dict(dp_size=2, micro_batch=4, consumed_samples=0, num_workers=0)
    r0, r1 = (take(build_loader(corpus, tok, CFG, dp_rank=r, **kw), 4) for r in (0, 1))
    assert [b["v2"] is None for b in r0] == [b["v2"] is None for b in r1]
    assert not torch.equal(r0[0]["v1"]["patch_images"], r1[0]["v1"]["patch_images"])


def test_bad_row_names_source_row_and_id(tok):
    from data_fixtures import corpus as make_corpus

    bad = make_corpus([vl_row("qa", uid="q-17", question="q")])
    loader = build_loader(bad, tok, CFG, dp_rank=0, dp_size=1, micro_batch=1, consumed_samples=0, num_workers=0)
    with pytest.raises(DataError, match=r"vl row 0 \(id 'q-17'\): DataError: qa row without answers"):
        next(iter(loader))


def test_tokenizer_must_match_config(tok, corpus):
    with pytest.raises(ConfigError, match="num_bins=500"):
        build_loader(corpus, tok, DataConfig(num_bins=500), dp_rank=0, dp_size=1, micro_batch=1)


@pytest.mark.slow
def test_real_corpus_and_tokenizer_cli(tmp_path, tok):
    """make-sample-corpus -> tsv2arrow -> Corpus -> build_loader (0 and 2 workers); train-tokenizer on it."""
    import argparse

    from ofa_ds.data import train_tokenizer
    from ofa_ds.data.sample_corpus import SampleConfig, write_sample_corpus
    from ofa_ds.data.shards import Corpus
    from ofa_ds.data.tsv2arrow import ConvertConfig, convert

    write_sample_corpus(
        SampleConfig(
            out=str(tmp_path / "tsv"), vl_rows=16, text_rows=4, image_rows=2, detection_rows=2, min_size=48, max_size=64
        )
    )
    convert(ConvertConfig(src=str(tmp_path / "tsv"), out=str(tmp_path / "arrow"), workers=1))
    corpus = Corpus(tmp_path / "arrow")
    runs = [
        take(build_loader(corpus, tok, CFG, dp_rank=0, dp_size=1, micro_batch=8, consumed_samples=0, num_workers=w), 2)
        for w in (0, 2)
    ]
    for a, b in zip(*runs):
        assert_same(a, b)
    assert runs[0][0]["v1"]["src_tokens"].shape[0] == 16 and runs[0][0]["v2"]["src_tokens"].shape[0] == 4

    p = argparse.ArgumentParser()
    train_tokenizer.add_arguments(p)
    out = tmp_path / "spm"
    args = p.parse_args([str(out), "--corpus", str(tmp_path / "arrow"), "--vocab-size", "300"])
    assert train_tokenizer.run(args) == 0
    sp = load_tokenizer(out, vocab_size=300 + 1 + 8192 + 1000)
    batch = next(iter(build_loader(corpus, sp, CFG, dp_rank=0, dp_size=1, micro_batch=8, num_workers=0)))
    assert batch["v1"]["src_tokens"].max() < sp.vocab_size


def test_a_worker_error_reaches_the_training_thread(tok):
    from data_fixtures import corpus as make_corpus

    bad = make_corpus([vl_row("caption", caption="fine"), vl_row("qa", uid="q-17", question="q")])
    loader = build_loader(bad, tok, CFG, dp_rank=0, dp_size=1, micro_batch=1, consumed_samples=0, num_workers=1)
    it = iter(loader)
    with pytest.raises(DataError, match=r"vl row 1 \(id 'q-17'\): DataError: qa row without answers"):
        for _ in range(4):  # one of the first two micro-batches holds the bad row
            next(it)


@pytest.mark.slow
def test_processes_with_live_workers_exit_cleanly(tmp_path):
    """A process that leaves its loader mid-stream (held to the end, or dropped) exits 0: a hand-over thread left
    inside torch at interpreter teardown used to abort about one exit in three."""
    import subprocess
    import sys

    from ofa_ds.data.sample_corpus import SampleConfig, write_sample_corpus
    from ofa_ds.data.tsv2arrow import ConvertConfig, convert

    write_sample_corpus(
        SampleConfig(
            out=str(tmp_path / "tsv"), vl_rows=16, text_rows=4, image_rows=2, detection_rows=2, min_size=48, max_size=64
        )
    )
    convert(ConvertConfig(src=str(tmp_path / "tsv"), out=str(tmp_path / "arrow"), workers=1))
    script = f"""
import sys
from ofa_ds.config import DataConfig
from ofa_ds.data.loader import build_loader
from ofa_ds.data.shards import Corpus
from ofa_ds.data.tokenizer import load_tokenizer
cfg = DataConfig(image_size=64, extra_image_size=32, sample_patch_num=9)
it = iter(build_loader(Corpus({str(tmp_path / "arrow")!r}), load_tokenizer("ofa_bpe"), cfg, dp_rank=0, dp_size=1,
                       micro_batch=8, num_workers=2))
for _ in range(int(sys.argv[1])):
    next(it)
if sys.argv[2] == "drop":
    del it
"""
    for k in range(8):
        res = subprocess.run(
            [sys.executable, "-c", script, str(1 + k % 3), ("keep", "drop")[k % 2]],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr[-2000:]

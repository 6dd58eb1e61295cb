"""The synthetic corpus: OFA's layout, deterministic, and its boxes and codes describe its images."""

import argparse
import base64
import io
import json

from PIL import Image

from ofa_ds.data import sample_corpus
from ofa_ds.data.sample_corpus import COLORS, SHAPES, SampleConfig, _codes, write_sample_corpus

FILES = {
    "vision_language_examples.tsv": 8,
    "text_examples.tsv": 2,
    "image_examples.tsv": 3,
    "detection_examples.tsv": 3,
}


def rows(src, name):
    return [line.rstrip("\n").split("\t") for line in open(src / name, encoding="utf-8")]


def decode(b64):
    return Image.open(io.BytesIO(base64.urlsafe_b64decode(b64))).convert("RGB")


def near(pixel, rgb, tol=40):
    return all(abs(a - b) <= tol for a, b in zip(pixel, rgb))


def test_cli_writes_default_counts_in_ofa_layout(tmp_path):
    parser = argparse.ArgumentParser()
    sample_corpus.add_arguments(parser)
    assert sample_corpus.run(parser.parse_args([str(tmp_path)])) == 0
    counts = {name: len(rows(tmp_path, name)) for name in FILES}
    assert counts == {
        "vision_language_examples.tsv": 64,
        "text_examples.tsv": 32,
        "image_examples.tsv": 16,
        "detection_examples.tsv": 16,
    }
    for name, ncols in FILES.items():
        assert {len(r) for r in rows(tmp_path, name)} == {ncols}
    vl = rows(tmp_path, "vision_language_examples.tsv")
    assert [r[7] for r in vl[:3]] == ["caption", "qa", "visual_grounding"]
    assert {r[6] for r in vl} == {"sample", "cc12m"}
    neg = tmp_path / "negative_sample"
    assert len((neg / "all_captions.txt").read_text().splitlines()) == 200
    assert (neg / "object.txt").read_text().splitlines()[:3] == list(SHAPES)
    assert set(json.loads((neg / "type2ans.json").read_text())) == {"color", "how many", "yes/no", "other"}


def test_deterministic_by_seed(tmp_path):
    def files(seed, name):
        out = write_sample_corpus(SampleConfig(str(tmp_path / name), 12, 4, 2, 3, min_size=32, max_size=64, seed=seed))
        return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    assert files(0, "a") == files(0, "b")
    a, c = files(0, "a"), files(1, "c")
    assert all(a[k] != c[k] for k in a if k.suffix == ".tsv")


def test_image_rows_are_256_square_with_the_codes_of_their_centre(tmp_path):
    src = write_sample_corpus(SampleConfig(str(tmp_path), 0, 0, 6, 0))
    for _, image, codes in rows(src, "image_examples.tsv"):
        im = decode(image)
        values = [int(c) for c in codes.split()]
        assert im.size == (256, 256) and len(values) == 256 and all(0 <= v < 8192 for v in values)
        assert values == _codes(im)
    assert len({r[2] for r in rows(src, "image_examples.tsv")}) == 6


def check_boxes(src):
    """Grounding boxes and detection boxes lie on an object of the named colour and shape."""
    for _, image, caption, _, refs, gt, _, task in rows(src, "vision_language_examples.tsv"):
        if task == "visual_grounding":
            im = decode(image)
            _, color, shape = caption.split()
            x0, y0, x1, y1 = map(float, refs.split(","))
            assert 0 <= x0 < x1 <= im.width and 0 <= y0 < y1 <= im.height and gt == shape
            assert near(im.getpixel((int(x0 + x1) // 2, int(y0 + y1) // 2)), COLORS[color])
            assert not near(im.getpixel((int(x0), int(y0))), COLORS[color]) or shape == "square"
    for _, image, boxes in rows(src, "detection_examples.tsv"):
        im = decode(image)
        areas = []
        for box in boxes.split("&&"):
            x0, y0, x1, y1, cat, label = box.split(",", 5)
            x0, y0, x1, y1 = map(float, (x0, y0, x1, y1))
            assert label in SHAPES and cat == str(SHAPES.index(label))
            assert any(near(im.getpixel((int(x0 + x1) // 2, int(y0 + y1) // 2)), rgb) for rgb in COLORS.values())
            areas.append((x1 - x0) * (y1 - y0))
        assert areas == sorted(areas, reverse=True)


def test_boxes_are_on_the_named_objects(tmp_path):
    check_boxes(write_sample_corpus(SampleConfig(str(tmp_path), 60, 0, 0, 12, min_size=64, max_size=160)))


def test_large_corpora_reuse_encoded_scenes(tmp_path):
    src = write_sample_corpus(SampleConfig(str(tmp_path), 600, 50, 0, 40, min_size=48, max_size=64, distinct_images=5))
    vl = rows(src, "vision_language_examples.tsv")
    assert len(vl) == 600 and len({r[1] for r in vl}) == 5
    assert len({tuple(r[2:5]) for r in vl}) > 20  # texts still vary
    check_boxes(src)

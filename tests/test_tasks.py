import io

import numpy as np
import pytest
from data_fixtures import encode_image, negatives, vl_row
from PIL import Image

from ofa_ds.config import DataConfig
from ofa_ds.data import transforms
from ofa_ds.data.tasks import TASKS, DataError, TaskBuilder
from ofa_ds.data.text import pre_caption, pre_question
from ofa_ds.data.tokenizer import load_tokenizer

BOS, PAD, EOS = 0, 1, 2
YES, NO = 4420, 117


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("ofa_bpe")


def builder(tok, **cfg):
    return TaskBuilder(tok, DataConfig(**cfg), negatives())


def rng(seed=0):
    return np.random.default_rng(seed)


def test_pre_caption_and_question():
    assert pre_caption(",.A  Man-riding/a <person>\n", 30) == "a man riding a person"
    assert pre_caption(" ".join(f"w{i}" for i in range(40)), 30) == " ".join(f"w{i}" for i in range(30))
    assert pre_question("?What  is <person>'s well-known/odd hat?", 80) == "what is <person>'s well known odd hat?"


def test_caption_and_itm(tok):
    b = builder(tok, image_size=64)
    caption = "A Man riding a horse-drawn cart on the beach " + "word " * 40
    seen = set()
    for seed in range(40):
        cap, itm = b.vl(vl_row("caption", caption=caption), rng(seed))
        assert (TASKS[cap.task], TASKS[itm.task]) == ("caption", "caption_itm")
        assert cap.source == [BOS, 99, 473, 5, 2274, 6190, 116, EOS]
        tgt = tok.encode(" " + pre_caption(caption, 30))
        assert cap.target == tgt + [EOS] and cap.prev_output == [BOS] + tgt
        assert cap.weight == itm.weight == 1.0 and not cap.code_mask
        assert cap.image.shape == (3, 64, 64) and cap.image.dtype == np.uint8 and itm.image is cap.image
        label = itm.target[0]
        assert itm.target == [label, EOS] and itm.prev_output == [BOS, label]
        shown = tok.decode(itm.source[1:-1])
        assert shown.startswith(' does the image describe " ') and shown.endswith(' "?')
        x = shown[len(' does the image describe " ') : -len(' "?')]
        if label == YES:
            assert x == pre_caption(caption, 80)
        else:
            assert label == NO and x in ("a dog on a sofa", "two cats")
        seen.add(label)
    assert seen == {YES, NO}


def test_caption_negative_swaps_a_ground_truth_object(tok):
    b = TaskBuilder(tok, DataConfig(image_size=64), negatives(captions=["unused"], objects=["dog", "cat", "bird"]))
    swaps = set()
    for seed in range(200):
        _, itm = b.vl(vl_row("caption", caption="a dog and a ball", gt_objects=["dog"]), rng(seed))
        if itm.target[0] == NO:
            swaps.add(tok.decode(itm.source[1:-1]))
    # u > 0.6: object swap (pool minus its last entry; the gt object maps to the last); else a pool caption
    assert swaps == {f' does the image describe " {x} "?' for x in ("a cat and a ball", "a bird and a ball", "unused")}


def test_cc12m_masks_first_two_target_tokens(tok):
    b = builder(tok, image_size=64)
    cap, _ = b.vl(vl_row("caption", caption="a red car parked outside", dataset_name="cc12m"), rng())
    tgt = tok.encode(" a red car parked outside")
    assert cap.target == [PAD, PAD] + tgt[2:] + [EOS]
    assert cap.prev_output == [BOS] + tgt  # decoder input unchanged
    cap, _ = b.vl(vl_row("caption", caption="", dataset_name="cc12m"), rng())  # ' ' -> [1437]
    assert cap.target == [PAD, EOS]


def test_vqa_and_qa_itm(tok):
    b = builder(tok, image_size=64)
    answers = [("2", 0.6), ("3", 0.9), ("2", 1.0), ("two", 1.0)]  # dict semantics: '2' -> 1.0 comes first
    labels = set()
    for seed in range(40):
        vqa, itm = b.vl(vl_row("qa", question="How  many dogs?", answers=answers), rng(seed))
        assert TASKS[vqa.task] == "vqa" and TASKS[itm.task] == "qa_itm"
        assert vqa.source == [BOS] + tok.encode(" how many dogs?") + [EOS]
        assert vqa.target == tok.encode(" 2") + [EOS]
        assert vqa.weight == itm.weight == 1.0
        shown = tok.decode(itm.source[1:-1])
        a = shown[len(' what is the answer to question " how many dogs? ". is " ') : -len(' "?')]
        if itm.target[0] == YES:
            assert a == "2"
        else:  # count +- 1, another 'how many' answer, or an 'other' answer
            assert a in {"1", "3", "pizza", "tennis", "kite"}
        labels.add(itm.target[0])
    assert labels == {YES, NO}
    vqa, _ = b.vl(vl_row("qa", question="q", answers=[("red", 0.3)]), rng())
    assert vqa.weight == pytest.approx(0.3)


def test_qa_without_answers_is_an_error(tok):
    with pytest.raises(DataError, match="without answers"):
        builder(tok, image_size=64).vl(vl_row("qa", question="q"), rng())
    with pytest.raises(DataError, match="task_type 'ocr'"):
        builder(tok, image_size=64).vl(vl_row("ocr"), rng())


def test_bins():
    assert transforms.quantize([0, 256, 384, 512, 1.0], 512, 1000) == [0, 500, 749, 999, 2]


def test_grounding_and_grounded_caption(tok):
    b = builder(tok)  # OFA's 384 crop
    img = encode_image(800, 600, box=(350, 250, 450, 350))
    row = vl_row("visual_grounding", image=img, caption="The Red Square", box=[350.0, 250.0, 450.0, 350.0])
    ground, region = b.vl(row, rng(3))
    image, box = transforms.grounding_image(img, row["box"], 384, rng(3))  # the same draws
    bins = [58457 + k for k in transforms.quantize(box, 512, 1000)]
    assert ground.source == [BOS] + tok.encode(' which region does the text " the red square " describe?') + [EOS]
    assert ground.target == bins + [EOS] and ground.weight == 1.0
    assert region.source == [BOS, 1437, 99, 473, 5, 976, 6190, 116, 976, 35] + bins + [EOS]
    assert region.target == tok.encode(" the red square") + [EOS]
    np.testing.assert_array_equal(ground.image, image)
    # the crop is centred on the box; the box keeps its scaled size; the object is under it
    scale = (box[2] - box[0]) / 100
    assert 384 / 600 <= scale <= 480 / 600
    assert abs((box[0] + box[2]) / 2 - 192) <= 1 and abs((box[1] + box[3]) / 2 - 192) <= 1
    assert image[:, 192, 192].tolist() == [215, 40, 40]
    assert max(bins) - 58457 <= 749  # OFA's box/512 in a 384 crop


def test_grounding_box_at_the_edge_is_clipped_not_dropped():
    img = encode_image(500, 400)
    _, box = transforms.grounding_image(img, [0.0, 0.0, 50.0, 600.0], 384, rng())
    assert box[0] == 0 and box[1] == 0 and box[3] == 384 and box[2] > 0


def test_text_infilling(tok):
    b = builder(tok)
    text = "  The Quick brown fox jumps over the lazy dog. " * 3
    ex = b.text_infilling({"uniq_id": "t", "text": text}, rng())
    words = tok.encode(" " + text.strip().lower())
    assert TASKS[ex.task] == "text_infilling" and ex.weight == 2.0 and ex.image is None and not ex.code_mask
    assert ex.target == words + [EOS] and ex.prev_output == [BOS] + words
    assert ex.source[:8] == [BOS, 99, 16, 5, 1498, 2788, 9, 22] and ex.source[-3:] == [22, 116, EOS]
    assert tok.mask in ex.source
    long = " ".join(f"w{i}" for i in range(400))  # 800 pieces: keep pieces 256..511
    ex = b.text_infilling({"uniq_id": "t", "text": long}, rng())
    assert ex.target == tok.encode(" " + long)[:512][-256:] + [EOS]


def test_image_infilling(tok):
    b = builder(tok)
    row = {"image_id": "i", "image": encode_image(256, 256, bg=(255, 0, 128)), "codes": list(range(256))}
    ex = b.image_infilling(row)
    assert ex.source == [BOS, 99, 16, 5, 2274, 11, 5, 1692, 233, 116, EOS]
    assert ex.target == [50265 + c for c in range(256)] + [EOS] and ex.code_mask and ex.weight == 2.0
    assert ex.hole == (64, 64, 192, 192) and (ex.image[:, 0, 0] == [255, 0, 128]).all()  # zeroed by collate
    small = TaskBuilder(tok, DataConfig(extra_image_size=64), negatives()).image_infilling(row)
    assert small.image.shape == (3, 64, 64) and small.hole == (16, 16, 48, 48)
    with pytest.raises(DataError, match="code 8192"):
        b.image_infilling(dict(row, codes=[8192] * 256))


def test_detection(tok):
    b = builder(tok)
    boxes = [
        {"x0": 100.0, "y0": 80.0, "x1": 300.0, "y1": 260.0, "category_id": "3", "label": "Red Box, big"},
        {"x0": -60.0, "y0": -60.0, "x1": -10.0, "y1": -10.0, "category_id": "4", "label": "gone"},
    ]
    row = {"image_id": "d", "image": encode_image(400, 300, box=(100, 80, 300, 260)), "boxes": boxes}
    for seed in range(6):
        ex = b.detection(row, rng(seed))
        image, kept, keep = transforms.detection_image(
            row["image"], [[o["x0"], o["y0"], o["x1"], o["y1"]] for o in boxes], 256, rng(seed)
        )
        assert keep.tolist() == [0]  # the box outside the image is dropped
        bins = [58457 + k for k in transforms.quantize(kept[0], 512, 1000)]
        assert ex.source == [BOS, 99, 32, 5, 8720, 11, 5, 2274, 116, EOS]
        assert ex.target == bins + tok.encode(" Red Box, big") + [EOS] and ex.weight == 2.0
        assert image.shape == (3, 256, 256) and max(bins) - 58457 <= 500
        x0, y0, x1, y1 = (int(v) for v in kept[0])  # the red box is under its target box
        assert image[:, (y0 + y1) // 2, (x0 + x1) // 2].tolist() == [215, 40, 40]


def test_patch_idx(tok):
    b = builder(tok, image_size=256, sample_patch_num=196)  # 16 x 16 = 256 patches
    cap, itm = b.vl(vl_row("caption", caption="a cat"), rng())
    for ex in (cap, itm):
        assert ex.patch_idx.shape == (196,) and len(set(ex.patch_idx.tolist())) == 196
        assert ex.patch_idx.min() >= 0 and ex.patch_idx.max() < 256
    assert not (cap.patch_idx == itm.patch_idx).all()
    cap, _ = builder(tok, image_size=224).vl(vl_row("caption", caption="a cat"), rng())  # 196 patches: keep all
    assert cap.patch_idx is None


def test_resize_window_equals_resize_then_crop():
    data = encode_image(300, 200, box=(50, 40, 200, 150))
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((432, 288), Image.BICUBIC)
    expected = np.asarray(full.crop((24, 0, 312, 288))).astype(int)
    got = np.asarray(transforms._Source(data).window((432, 288), 24, 0, 288)).astype(int)
    assert np.abs(got - expected).max() <= 1


def _photo_like(w, h, mode="RGB", **save):
    """A noisy gradient (so every DCT block has detail), JPEG-encoded."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1) + rng.integers(0, 40, (h, w, 3))
    img = Image.fromarray(a.clip(0, 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["baseline", "progressive", "gray", "444", "cmyk", "truncated", "png"])
def test_decoding_gives_pillows_pixels(kind):
    """The fast JPEG path decodes to exactly what Pillow gives, at every draft scale; images it does not handle
    (CMYK, damaged, not JPEG) go through Pillow."""
    save = {"progressive": dict(progressive=True), "444": dict(subsampling=0)}.get(kind, {})
    mode = {"gray": "L", "cmyk": "CMYK"}.get(kind, "RGB")
    data = _photo_like(203, 157, mode, **save)
    if kind == "truncated":
        data = data[: len(data) * 2 // 3]
    if kind == "png":
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).save(buf, "PNG")
        data = buf.getvalue()
    # a truncated JPEG has a good header; simplejpeg's error at decode sends it to Pillow
    assert (transforms._turbo_header(data) is not None) == (kind not in ("cmyk", "png"))
    for at_least in (None, (200, 150), (100, 70), (50, 40), (25, 19), (10, 10)):
        img = Image.open(io.BytesIO(data))
        if at_least is not None:
            img.draft("RGB", at_least)
        expected = np.asarray(img.convert("RGB"))
        got, scale = transforms._Source(data)._decode(at_least)
        assert got.dtype == np.uint8 and (got == expected).all(), (kind, at_least)
        assert got.shape == (-(-157 // scale), -(-203 // scale), 3)


def test_rand_augment_ops_keep_size_and_are_seeded():
    img = Image.open(io.BytesIO(encode_image(64, 48, box=(10, 10, 40, 30)))).convert("RGB")
    for op in transforms.RAND_AUGMENT_OPS:
        for src in (img, np.asarray(img)):  # the ops take a Pillow image or an array
            out = op(src, rng())
            assert transforms.to_chw(out).shape == (3, 48, 64)
            assert (np.asarray(out) == np.asarray(op(img, rng()))).all()
    for dx, dy in ((7, 0), (-7, 0), (0, 7), (0, -7)):  # integer shifts = OpenCV's bilinear translation
        shifted = transforms._affine(img, [[1, 0, -dx], [0, 1, -dy]])
        assert (np.asarray(transforms._shift(img, dx, dy)) == np.asarray(shifted)).all()
    a = transforms.rand_augment(img, rng(4))
    b = transforms.rand_augment(img, rng(4))
    assert (np.asarray(a) == np.asarray(b)).all()

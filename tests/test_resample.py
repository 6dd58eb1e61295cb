"""The C bicubic resize (csrc/resample/bicubic.c) against Pillow's `Image.resize(size, BICUBIC, box=...)`: bit for
bit, over random sizes, windows, up- and downscales and both of Pillow's pass orders."""
import io
import platform

import numpy as np
import pytest
from PIL import Image

from ofa_ds.data import transforms

needs_ext = pytest.mark.skipif(transforms._bicubic is None, reason="C extension not built")


def test_extension_is_built_on_linux_x86_64():
    """`pip install` compiles it wherever there is a C compiler; CI must not silently test only the fallback."""
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        assert transforms._bicubic is not None


def _image(rng, h, w, smooth):
    if smooth:  # photo-like: neighbouring pixels close, so rounding ties are frequent
        return np.clip(np.cumsum(rng.integers(-3, 4, (h, w, 3)), 1) + 128, 0, 255).astype(np.uint8)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noise: the most clipping


def _cases(rng, n):
    for t in range(n):
        h, w = (int(v) for v in rng.integers(1, 260, 2))
        ow, oh = (int(v) for v in rng.integers(1, 330, 2))
        x0, x1 = np.sort(rng.uniform(0, w, 2))
        y0, y1 = np.sort(rng.uniform(0, h, 2))
        box = (float(x0), float(y0), float(x1), float(y1))
        if t % 4 == 0:
            box = (0.0, 0.0, float(w), float(h))
        if t % 7 == 0:  # no horizontal pass
            box, ow = (0.0, box[1], float(w), box[3]), w
        if t % 11 == 0:  # no vertical pass
            box, oh = (box[0], 0.0, box[2], float(h)), h
        yield _image(rng, h, w, t % 3 == 0), (ow, oh), box


@needs_ext
def test_bicubic_equals_pillow():
    rng = np.random.default_rng(0)
    for pixels, size, box in _cases(rng, 300):
        expected = np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC, box=box))
        got = transforms.resize_bicubic(pixels, size, box)
        assert got.shape == expected.shape and (got == expected).all(), (pixels.shape, size, box)


@needs_ext
def test_plain_c_loop_equals_pillow():
    """The loop CPUs without AVX2 run (the AVX2 one is what the test above runs on this machine)."""
    rng = np.random.default_rng(1)
    for pixels, (ow, oh), box in _cases(rng, 100):
        expected = np.asarray(Image.fromarray(pixels).resize((ow, oh), Image.BICUBIC, box=box))
        got = np.empty((oh, ow, 3), np.uint8)
        transforms._bicubic.resize(pixels, pixels.shape[1], pixels.shape[0], box, got, ow, oh, False)
        assert (got == expected).all(), (pixels.shape, (ow, oh), box)


@needs_ext
@pytest.mark.parametrize("src, size, box", [
    ((477, 720), (384, 384), (147.3, 25.1, 573.4, 451.2)),  # the caption window of a landscape photo
    ((720, 477), (384, 384), (25.1, 147.3, 451.2, 573.4)),  # portrait: Pillow >= 13 runs the vertical pass first
    ((202, 277), (364, 100), (0, 0, 277, 202)),  # wider, much shorter: vertical first
    ((202, 277), (200, 100), (0, 0, 277, 202)),  # both shrink alike: horizontal first
    ((300, 200), (300, 200), (0, 0, 200, 300)),  # identity (a copy)
    ((1, 1), (5, 3), (0, 0, 1, 1)),
    ((40, 3000), (7, 2), (0, 0, 3000, 40)),  # 400x downscale: wide filters
])
def test_bicubic_equals_pillow_at_edges(src, size, box):
    pixels = _image(np.random.default_rng(1), *src, smooth=False)
    expected = np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC, box=box))
    assert (transforms.resize_bicubic(pixels, size, box) == expected).all()


@needs_ext
def test_bicubic_rejects_bad_buffers_and_boxes():
    pixels = np.zeros((10, 20, 3), np.uint8)
    out = np.empty((5, 5, 3), np.uint8)
    with pytest.raises(ValueError, match="need a 10 x 21 x 3 source.*got 600"):
        transforms._bicubic.resize(pixels, 21, 10, (0, 0, 20, 10), out, 5, 5)
    with pytest.raises(ValueError, match="destination"):
        transforms._bicubic.resize(pixels, 20, 10, (0, 0, 20, 10), out, 6, 5)
    with pytest.raises(ValueError, match="not inside"):
        transforms._bicubic.resize(pixels, 20, 10, (0, 0, 21, 10), out, 5, 5)


@needs_ext
def test_pillow_fallback_gives_the_same_examples(monkeypatch):
    """Without the extension the transforms resize with Pillow: every image comes out the same."""
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (233, 311, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    data = buf.getvalue()

    def images():
        g = np.random.default_rng(3)
        return [transforms.caption_image(data, 96, g), transforms.grounding_image(data, (20, 30, 120, 90), 96, g)[0],
                transforms.detection_image(data, [(20, 30, 120, 90)], 80, g)[0], transforms.infilling_image(data, 64)]

    fast = images()
    monkeypatch.setattr(transforms, "_bicubic", None)
    for x, y in zip(fast, images()):
        assert x.shape == y.shape and (x == y).all()

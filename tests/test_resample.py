"""The C extension of csrc/resample (`_pixel_ops`) against Pillow, bit for bit: the bicubic resize (bicubic.c) against
`Image.resize(size, BICUBIC, box=...)` over random sizes, windows, up- and downscales and both of Pillow's pass
orders; the bilinear affine warp (affine.c) against `Image.transform(size, AFFINE, ..., BILINEAR, fillcolor=...)`
over RandAugment's shears and rotations and random matrices; RandAugment's sharpness (sharpen.c) against
`Image.blend(img.filter(SMOOTH), img, factor)`; the HWC -> CHW planes (planar.c) against numpy."""

import io
import math
import platform

import numpy as np
import pytest
from PIL import Image, ImageFilter

from ofa_ds.data import transforms

needs_ext = pytest.mark.skipif(transforms._pixel_ops is None, reason="C extension not built")


def test_extension_is_built_on_linux_x86_64():
    """`pip install` compiles it wherever there is a C compiler; CI must not silently test only the fallback."""
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        assert transforms._pixel_ops is not None


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
        transforms._pixel_ops.resize(pixels, pixels.shape[1], pixels.shape[0], box, got, ow, oh, False)
        assert (got == expected).all(), (pixels.shape, (ow, oh), box)


@needs_ext
@pytest.mark.parametrize(
    "src, size, box",
    [
        ((477, 720), (384, 384), (147.3, 25.1, 573.4, 451.2)),  # the caption window of a landscape photo
        ((720, 477), (384, 384), (25.1, 147.3, 451.2, 573.4)),  # portrait: Pillow >= 13 runs the vertical pass first
        ((202, 277), (364, 100), (0, 0, 277, 202)),  # wider, much shorter: vertical first
        ((202, 277), (200, 100), (0, 0, 277, 202)),  # both shrink alike: horizontal first
        ((300, 200), (300, 200), (0, 0, 200, 300)),  # identity (a copy)
        ((1, 1), (5, 3), (0, 0, 1, 1)),
        ((40, 3000), (7, 2), (0, 0, 3000, 40)),  # 400x downscale: wide filters
    ],
)
def test_bicubic_equals_pillow_at_edges(src, size, box):
    pixels = _image(np.random.default_rng(1), *src, smooth=False)
    expected = np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC, box=box))
    assert (transforms.resize_bicubic(pixels, size, box) == expected).all()


@needs_ext
def test_bicubic_rejects_bad_buffers_and_boxes():
    pixels = np.zeros((10, 20, 3), np.uint8)
    out = np.empty((5, 5, 3), np.uint8)
    with pytest.raises(ValueError, match="need a 10 x 21 x 3 source.*got 600"):
        transforms._pixel_ops.resize(pixels, 21, 10, (0, 0, 20, 10), out, 5, 5)
    with pytest.raises(ValueError, match="destination"):
        transforms._pixel_ops.resize(pixels, 20, 10, (0, 0, 20, 10), out, 6, 5)
    with pytest.raises(ValueError, match="not inside"):
        transforms._pixel_ops.resize(pixels, 20, 10, (0, 0, 21, 10), out, 5, 5)


def _warps(rng, n):
    for t in range(n):
        h, w = (384, 384) if t % 5 == 0 else (int(v) for v in rng.integers(1, 120, 2))
        kind = t % 4
        if kind == 0:  # RandAugment's shear_x, shear_y and rotate, both signs
            m = [[1, rng.choice([-0.21, 0.21]), 0], [0, 1, 0]]
        elif kind == 1:
            m = [[1, 0, 0], [rng.choice([-0.21, 0.21]), 1, 0]]
        elif kind == 2:
            d = math.radians(rng.choice([-21, 21]))
            a, b = math.cos(d), math.sin(d)
            m = [[a, b, (1 - a) * w / 2 - b * h / 2], [-b, a, b * w / 2 + (1 - a) * h / 2]]
        else:  # anything: scaling, reflection, large offsets
            m = (rng.normal(0, 1, (2, 3)) * [1, 1, 20]).tolist()
        yield _image(rng, h, w, t % 2 == 0), m


@needs_ext
def test_warp_equals_pillow():
    """Both source layouts (an array, Pillow's RGBX memory) and both loops (AVX2, plain C)."""
    rng = np.random.default_rng(4)
    for pixels, m in _warps(rng, 200):
        h, w = pixels.shape[:2]
        inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
        coeffs = tuple(inv.reshape(-1).tolist())
        img = Image.fromarray(pixels)
        expected = np.asarray(
            img.transform((w, h), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=transforms.FILL)
        )
        rgbx = transforms._rgbx(img)
        assert rgbx is not None and rgbx.shape == (h, w, 4)
        for src in (pixels, rgbx):
            for avx2 in (True, False):
                got = np.empty((h, w, 3), np.uint8)
                transforms._pixel_ops.affine(src, w, h, src.shape[2], coeffs, got, transforms.FILL, avx2)
                assert (got == expected).all(), (pixels.shape, m, src.shape, avx2)
        assert (np.asarray(transforms._affine(img, m)) == np.asarray(transforms._affine(pixels, m))).all()


@needs_ext
def test_warp_rejects_bad_buffers():
    pixels = np.zeros((10, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="need a 10 x 21 x 3 or 4 source.*got 600"):
        transforms._pixel_ops.affine(pixels, 21, 10, 3, (1, 0, 0, 0, 1, 0), np.empty((10, 21, 3), np.uint8), (0, 0, 0))
    with pytest.raises(ValueError, match="5 bytes per pixel"):
        transforms._pixel_ops.affine(pixels, 20, 10, 5, (1, 0, 0, 0, 1, 0), np.empty((10, 20, 3), np.uint8), (0, 0, 0))


@needs_ext
def test_sharpen_equals_pillow():
    """Sizes from 1 x 1 (Pillow copies images smaller than the kernel) up; both layouts and both loops."""
    rng = np.random.default_rng(5)
    for t in range(150):
        h, w = (384, 384) if t % 10 == 0 else (int(v) for v in rng.integers(1, 90, 2))
        pixels = _image(rng, h, w, t % 2 == 0)
        img = Image.fromarray(pixels)
        expected = np.asarray(Image.blend(img.filter(ImageFilter.SMOOTH), img, transforms._ENHANCE))
        for src in (pixels, transforms._rgbx(img)):
            for avx2 in (True, False):
                got = np.empty_like(src)
                transforms._pixel_ops.sharpen(src, w, h, src.shape[2], got, transforms._ENHANCE, avx2)
                assert (got[..., :3] == expected).all(), ((h, w), src.shape, avx2)
        assert (np.asarray(transforms._sharpness(img, None)) == expected).all()
    with pytest.raises(ValueError, match="destination of its size"):
        transforms._pixel_ops.sharpen(np.zeros((2, 2, 3), np.uint8), 2, 2, 3, np.zeros(11, np.uint8), 1.5)


@needs_ext
@pytest.mark.parametrize("h, w", [(1, 1), (3, 5), (37, 61), (384, 384)])
def test_planar_into_equals_numpy(h, w):
    """The views to_chw returns: an array's (C loop, 3 bytes a pixel), a Pillow image's RGBX memory (C loop, 4),
    a flipped window (numpy's copy)."""
    pixels = _image(np.random.default_rng(h), h, w, smooth=False)
    views = [transforms.to_chw(pixels), transforms.to_chw(Image.fromarray(pixels)), transforms.to_chw(pixels[:, ::-1])]
    assert transforms._rgbx(Image.fromarray(pixels)) is not None  # the RGBX case is really exercised
    for chw in views:
        dst = np.full((3, h, w), 7, np.uint8)
        transforms.planar_into(dst, chw)
        assert (dst == np.ascontiguousarray(chw)).all()
    with pytest.raises(ValueError, match="3 x 1 x 1 destination.*got 3 and 4 bytes"):
        transforms._pixel_ops.planar(np.zeros((1, 1, 3), np.uint8), 1, 1, 3, np.zeros(4, np.uint8))


@needs_ext
def test_pillow_fallback_gives_the_same_examples(monkeypatch):
    """Without the extensions the transforms resize, warp and sharpen with Pillow: every image comes out the same."""
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, (233, 311, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    data = buf.getvalue()

    def images():
        g = np.random.default_rng(3)
        captions = [transforms.caption_image(data, 96, g) for _ in range(48)]  # RandAugment: each op several times
        return [
            *captions,
            transforms.grounding_image(data, (20, 30, 120, 90), 96, g)[0],
            transforms.detection_image(data, [(20, 30, 120, 90)], 80, g)[0],
            transforms.infilling_image(data, 64),
        ]

    fast = images()
    monkeypatch.setattr(transforms, "_pixel_ops", None)
    for x, y in zip(fast, images(), strict=True):
        assert x.shape == y.shape and (x == y).all()

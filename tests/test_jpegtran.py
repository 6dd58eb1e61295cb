"""Progressive JPEGs are stored as baseline ones at conversion (csrc/jpegtran): the same pixels, in every decoder
and at every DCT scale the loader uses; everything else is stored byte for byte."""

import base64
import io
import os

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from ofa_ds.data import tsv_rows
from ofa_ds.data.shards import Corpus
from ofa_ds.data.tsv2arrow import ConvertConfig, convert

needs_ext = pytest.mark.skipif(tsv_rows._jpegtran is None, reason="C extension not built (no libjpeg headers)")


def test_extension_is_built_where_libjpeg_headers_are():
    if os.path.exists("/usr/include/jpeglib.h"):
        assert tsv_rows._jpegtran is not None


def photo_like(w=211, h=157, mode="RGB", **save) -> bytes:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], -1) + rng.integers(0, 40, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).convert(mode).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def sof(data: bytes) -> int:
    """The frame marker: 0xC0/0xC1 baseline/extended sequential, 0xC2 progressive."""
    i = 2
    while data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        i += 2 + length
    raise AssertionError("no SOF marker")


def pixels(data: bytes, at_least=None) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    if at_least:
        img.draft("RGB", at_least)
    return np.asarray(img.convert("RGB"))


@needs_ext
@pytest.mark.parametrize("kind", ["420", "444", "gray"])
def test_progressive_becomes_baseline_with_the_same_pixels_and_markers(kind):
    exif = Image.Exif()
    exif[0x010F] = "ofa-ds test camera"
    save = dict(progressive=True, exif=exif.tobytes(), comment=b"kept")
    if kind == "444":
        save["subsampling"] = 0
    data = photo_like(mode="L" if kind == "gray" else "RGB", **save)
    out = tsv_rows.baseline_jpeg(data)
    assert sof(data) == 0xC2 and sof(out) in (0xC0, 0xC1)
    for at_least in (None, (100, 70), (50, 40), (25, 19)):  # full size and Pillow's draft scales 1/2, 1/4, 1/8
        assert (pixels(out, at_least) == pixels(data, at_least)).all(), at_least
    assert (simplejpeg.decode_jpeg(out, "RGB") == simplejpeg.decode_jpeg(data, "RGB")).all()
    info = Image.open(io.BytesIO(out)).info
    assert info["comment"] == b"kept" and Image.open(io.BytesIO(out)).getexif()[0x010F] == "ofa-ds test camera"
    assert len(out) < 1.2 * len(data)


@needs_ext
@pytest.mark.parametrize("kind", ["baseline", "png", "cmyk_progressive", "truncated_progressive"])
def test_other_images_are_kept_byte_for_byte(kind):
    if kind == "png":
        buf = io.BytesIO()
        Image.open(io.BytesIO(photo_like())).save(buf, "PNG")
        data = buf.getvalue()
    elif kind == "cmyk_progressive":
        data = photo_like(mode="CMYK", progressive=True)
    elif kind == "truncated_progressive":
        data = photo_like(progressive=True)
        data = data[: len(data) * 2 // 3]
    else:
        data = photo_like()
    assert tsv_rows.baseline_jpeg(data) is data


@needs_ext
def test_conversion_stores_progressive_jpegs_as_baseline(tmp_path):
    data = photo_like(progressive=True)
    src = tmp_path / "tsv"
    src.mkdir()
    line = ["u0", base64.urlsafe_b64encode(data).decode(), "a photo", "", "", "", "coco", "caption"]
    (src / "vision_language_examples.tsv").write_text("\t".join(line) + "\n")
    convert(ConvertConfig(str(src), str(tmp_path / "arrow"), workers=1))
    stored = Corpus(str(tmp_path / "arrow")).vl[0]["image"]
    assert sof(stored) in (0xC0, 0xC1) and (pixels(stored) == pixels(data)).all()

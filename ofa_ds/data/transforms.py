"""Image transforms of OFA pretraining with Pillow and numpy (OFA_SPEC 4.4-4.6, 4.9; utils/transforms.py and
utils/vision_helper.py), each drawing from the per-sample numpy Generator it is given.

Outputs are uint8 (3, R, R) RGB arrays; ToTensor + Normalize(0.5, 0.5) happen where the model runs
(`collate.model_inputs`). Boxes are float32 pixels of the output image, computed in float32 as OFA's torch code
does. What makes the chain cheaper than OFA's without moving any pixel: JPEGs are decoded by libjpeg-turbo's
TurboJPEG API (simplejpeg; Pillow's pixels, faster); resize and crop are one bicubic resize of the kept window
(Pillow's `Image.resize(box=...)`), run by the vectorised C extension `_pixel_ops` (csrc/resample; Pillow's pixels,
6-12x faster, benchmarks/results/pixel_ops.json) when it is built;
RandAugment's shear and rotate run in `_pixel_ops` too (csrc/resample;
Pillow's bilinear `Image.transform` pixels, 3.4x faster) and so does its sharpness (Pillow's SMOOTH
filter and blend, bit for bit) when they are built, and its ops take a Pillow image or
an (H, W, 3) array, so an image becomes a Pillow one only for the ops written with Pillow; and JPEGs are decoded
with DCT scaling by 1/2..1/8 (Pillow's `draft`) when the decoded image stays at least as large as the resize
target. DCT scaling changes pixel values slightly (a different low-pass filter), not positions; it is the one
exception.

For image sizes other than OFA's 384 the v1 resize range scales with it: shorter side in [R, 5R/4], each side
capped at 7R/4 (384 -> 384..480, cap 672).

Departures from OFA's RandAugment (vision_helper.py, written with OpenCV):
- AutoContrast stretches [min, max] of each channel to [0, 255] (PIL's definition). OFA's version negates a
  numpy uint8 minimum, which wraps, so any channel whose minimum is above 0 comes out all 255.
- Sharpness clips the blend to [0, 255]; OFA casts out-of-range floats to uint8 (wrap-around).
- Translations are exact 7-pixel shifts (what bilinear sampling at an integer offset gives). Shear and rotate use
  PIL's bilinear sampling with OpenCV's pixel-index geometry (rotation about (W/2, H/2), shear about the origin);
  pixels at the border blend with the fill colour slightly differently.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import simplejpeg
from PIL import Image, ImageFile, ImageFilter

try:  # csrc/resample, compiled by `pip install`
    from ofa_ds.data import _pixel_ops
except ImportError:  # not compiled (no C compiler at install): Pillow and numpy, the same pixels
    _pixel_ops = None

# As OFA: accept truncated files and images of any size (the corpus is trusted training data).
ImageFile.LOAD_TRUNCATED_IMAGES = True
Image.MAX_IMAGE_PIXELS = None


def to_chw(img: Image.Image | np.ndarray) -> np.ndarray:
    """RGB image or (H, W, 3) array -> uint8 (3, H, W), a view of the interleaved pixels (of Pillow's memory for an
    image: its Arrow export keeps it alive). `planar_into` makes the planes, once, where the batch holds them."""
    if isinstance(img, Image.Image):
        rgbx = _rgbx(img)
        img = np.asarray(img) if rgbx is None else rgbx[..., :3]
    return img.transpose(2, 0, 1)


def planar_into(dst: np.ndarray, chw: np.ndarray) -> None:
    """dst, a C-contiguous uint8 (3, H, W) array, <- chw in one pass: the C loop of csrc/resample/planar.c when chw
    views interleaved RGB or RGBX lines (what to_chw returns), else numpy's copy."""
    hwc = chw.transpose(1, 2, 0)
    h, w, _ = hwc.shape
    bpp = hwc.strides[1]
    if _pixel_ops is not None and bpp in (3, 4) and hwc.strides == (w * bpp, bpp, 1):
        # the whole (H, W, bpp) memory hwc views: for RGBX, the X bytes lie between its pixels
        _pixel_ops.planar(np.lib.stride_tricks.as_strided(hwc, (h, w, bpp), (w * bpp, bpp, 1)), w, h, bpp, dst)
    else:
        np.copyto(dst, chw)


def _rgbx(img: Image.Image) -> np.ndarray | None:
    """Pillow's RGBX memory of an RGB image as a uint8 (H, W, 4) array, without a copy (its Arrow export; one copy
    fewer than np.asarray, which goes through tobytes); None when the export is not available."""
    try:  # .values, not .flatten(): flatten imports pyarrow.compute, 70 ms per process
        rgbx = pa.array(img).values.to_numpy(zero_copy_only=True)
    except (AttributeError, TypeError, ValueError, pa.ArrowException):  # older Pillow; image in several blocks
        return None
    return rgbx.reshape(img.height, img.width, 4)


def _pil(img: Image.Image | np.ndarray) -> Image.Image:
    return img if isinstance(img, Image.Image) else Image.fromarray(img)


def _size(img: Image.Image | np.ndarray) -> tuple[int, int]:
    return img.size if isinstance(img, Image.Image) else (img.shape[1], img.shape[0])


def resize_bicubic(pixels: np.ndarray, size: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """Pillow's `Image.resize(size, BICUBIC, box=box)` of a uint8 (H, W, 3) array, as a (size[1], size[0], 3) one."""
    if _pixel_ops is None:
        return np.asarray(Image.fromarray(pixels).resize(size, Image.BICUBIC, box=box))
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    out = np.empty((size[1], size[0], 3), np.uint8)
    _pixel_ops.resize(pixels, pixels.shape[1], pixels.shape[0], tuple(map(float, box)), out, *size)
    return out


class _Source:
    """An encoded image: size from the header, decoded lazily (and smaller, for JPEGs, when allowed).

    Baseline and progressive YCbCr/grayscale JPEGs are decoded by simplejpeg (libjpeg-turbo's TurboJPEG API, about
    25% faster than Pillow's decoder here, same pixels: tests/test_tasks.py); anything else, and any JPEG that
    simplejpeg reports as damaged, goes through Pillow, whose tolerance of truncated files OFA relies on."""

    def __init__(self, data: bytes):
        self.data, self.img = data, None
        self.jpeg = _turbo_header(data)
        if self.jpeg is None:
            self.img = Image.open(io.BytesIO(data))
            self.size = self.img.size  # (w, h) of the original
        else:
            self.size = self.jpeg

    def window(self, resized: tuple[int, int], left: float, top: float, out: int) -> np.ndarray:
        """The (out, out, 3) window at (left, top) of the image bicubic-resized to `resized` (w, h)."""
        pixels, scale = self._decode(resized)
        sx = self.size[0] / resized[0] / scale  # decoded pixels per resized pixel
        sy = self.size[1] / resized[1] / scale
        box = (left * sx, top * sy, (left + out) * sx, (top + out) * sy)
        return resize_bicubic(pixels, (out, out), box)

    def rgb(self) -> np.ndarray:
        return self._decode(None)[0]

    def _decode(self, at_least: tuple[int, int] | None) -> tuple[np.ndarray, int]:
        """uint8 (H, W, 3) RGB pixels and the DCT scale they were decoded at: the largest of 8, 4, 2, 1 that keeps
        the decoded image at least `at_least` (w, h) in size, as Pillow's `draft` picks it."""
        w, h = self.size
        scale = 1
        if at_least is not None:
            scale = next(s for s in (8, 4, 2, 1) if s <= min(w // at_least[0], h // at_least[1]) or s == 1)
        if self.jpeg is not None:
            try:
                pixels = simplejpeg.decode_jpeg(
                    self.data, "RGB", min_width=-(-w // scale), min_height=-(-h // scale), strict=True
                )
                return pixels, scale
            except ValueError:  # damaged: Pillow decodes what it can, as OFA's reader did
                self.img = Image.open(io.BytesIO(self.data))
        img = self.img
        if img.format != "JPEG" or scale == 1 or img.draft("RGB", at_least) is None:
            scale = 1
        return np.asarray(img.convert("RGB") if img.mode != "RGB" else img), scale


def _turbo_header(data: bytes) -> tuple[int, int] | None:
    """(w, h) of a JPEG that simplejpeg decodes to the RGB Pillow gives, else None."""
    if data[:2] != b"\xff\xd8":
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (w, h) if colorspace in ("YCbCr", "Gray") else None


def resize_shorter(w: int, h: int, size: int, max_size: int) -> tuple[int, int]:
    """OFA's RandomResize target (w, h): shorter side -> size, aspect kept (int()), each side capped."""
    if (w <= h and w == size) or (h <= w and h == size):
        return min(w, max_size), min(h, max_size)
    if w < h:
        ow, oh = size, int(size * h / w)
    else:
        ow, oh = int(size * w / h), size
    return min(ow, max_size), min(oh, max_size)


def _random_resize(src: _Source, r: int, rng: np.random.Generator) -> tuple[int, int]:
    size = int(rng.integers(r, r * 5 // 4 + 1))
    return resize_shorter(*src.size, size, r * 7 // 4)


def caption_image(data: bytes, r: int, rng: np.random.Generator) -> np.ndarray:
    """Captioning / VQA / ITM (OFA_SPEC 4.9): random resize, centre crop r x r, RandAugment."""
    src = _Source(data)
    ow, oh = _random_resize(src, r, rng)
    top, left = int(round((oh - r) / 2.0)), int(round((ow - r) / 2.0))
    return to_chw(rand_augment(src.window((ow, oh), left, top, r), rng))


def grounding_image(data: bytes, box, r: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Visual grounding (OFA_SPEC 4.6): random resize, r x r crop centred on the box (kept inside the image),
    box clipped to the crop (never dropped). Returns the image and the float32 box."""
    src = _Source(data)
    w, h = src.size
    ow, oh = _random_resize(src, r, rng)
    b = np.asarray(box, dtype=np.float32) * np.array([ow / w, oh / h, ow / w, oh / h], dtype=np.float32)
    cx, cy = (float(b[0]) + float(b[2])) / 2, (float(b[1]) + float(b[3])) / 2
    left = max(cx - r / 2 + min(ow - cx - r / 2, 0), 0)
    top = max(cy - r / 2 + min(oh - cy - r / 2, 0), 0)
    img = src.window((ow, oh), round(left), round(top), r)  # PIL's crop rounds a float box
    b = np.clip(b - np.array([left, top, left, top], dtype=np.float32), 0, np.float32(r))
    return to_chw(img), b


def detection_image(data: bytes, boxes, s: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detection (OFA_SPEC 4.5): horizontal flip (p 0.5), large-scale jitter to s x s (scale U[1, 1.5]), boxes
    shifted and clipped, empty ones dropped. Returns the image, the float32 (N, 4) boxes kept and their indices."""
    src = _Source(data)
    w, h = src.size
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    flip = rng.random() < 0.5
    if flip:
        b = b[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], dtype=np.float32) + np.array([w, 0, w, 0], dtype=np.float32)
    jitter = np.float32(rng.random()) * np.float32(0.5) + np.float32(1.0)
    target = np.round(jitter * np.float32(s))
    scale = max(target / np.float32(h), target / np.float32(w))
    sh, sw = (int(v) for v in np.round(np.array([h, w], dtype=np.float32) * scale))
    b = b * np.array([sw / w, sh / h, sw / w, sh / h], dtype=np.float32)
    top, left = (int(v) for v in np.floor(np.array([sh - s, sw - s], dtype=np.float32) * rng.random(2, np.float32)))
    # The flip is applied to the window instead of the whole image: mirror the window's position.
    img = src.window((sw, sh), sw - left - s if flip else left, top, s)
    if flip:
        img = img[:, ::-1]
    b = b - np.array([left, top, left, top], dtype=np.float32)
    b = np.clip(np.minimum(b, np.float32(s)), 0, None)
    keep = np.flatnonzero((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))
    return to_chw(img), b[keep], keep


def infilling_image(data: bytes, s: int) -> np.ndarray:
    """Image infilling (OFA_SPEC 4.4): the s x s image, resized if the row's image has another size. The caller
    blanks the centre (`infilling_hole`) after normalisation."""
    pixels = _Source(data).rgb()
    h, w = pixels.shape[:2]
    if (w, h) != (s, s):
        pixels = resize_bicubic(pixels, (s, s), (0, 0, w, h))
    return to_chw(pixels)


def infilling_hole(s: int) -> tuple[int, int, int, int]:
    """The centre s/2 x s/2 (x0, y0, x1, y1) that image infilling sets to 0 after normalisation."""
    return s // 4, s // 4, 3 * s // 4, 3 * s // 4


def quantize(coords: np.ndarray, max_image_size: int, num_bins: int) -> list[int]:
    """Bin index of each coordinate: round(c / max_image_size * (num_bins - 1)), half to even, in float32."""
    q = np.round(np.asarray(coords, dtype=np.float32) / np.float32(max_image_size) * np.float32(num_bins - 1))
    return q.astype(np.int64).tolist()


# --------------------------------------------------------------------------------------------------------------
# RandAugment (OFA's variant: 2 ops with replacement, each applied with probability 0.5, magnitude 7 of 10)

FILL = (128, 128, 128)
_LEVEL = 7 / 10
_ENHANCE = _LEVEL * 1.8 + 0.1  # 1.36
_SHEAR = _LEVEL * 0.3  # 0.21
_TRANSLATE = round(_LEVEL * 10)  # 7 px: an integer shift
_ROTATE = _LEVEL * 30.0  # 21 degrees


def rand_augment(img: Image.Image | np.ndarray, rng: np.random.Generator) -> Image.Image | np.ndarray:
    """RGB image or (H, W, 3) array -> either: the ops written with Pillow take a Pillow image (converted when
    needed), the C ones (warp, sharpness) read both and return an array."""
    for op in rng.integers(len(RAND_AUGMENT_OPS), size=2):
        if rng.random() > 0.5:
            continue
        img = RAND_AUGMENT_OPS[op](img, rng)
    return img


def _signed(v: float, rng: np.random.Generator) -> float:
    return -v if rng.random() > 0.5 else v


def _identity(img, rng):
    return img


def _auto_contrast(img, rng):
    img = _pil(img)
    hist = np.asarray(img.histogram()).reshape(3, 256)
    lut = []
    for ch in hist:
        nz = np.flatnonzero(ch)
        low, high = int(nz[0]), int(nz[-1])
        if high <= low:
            table = np.arange(256)
        else:
            scale = 255 / (high - low)
            table = np.arange(256) * scale - low * scale
        lut.extend(table.clip(0, 255).astype(np.uint8).tolist())
    return img.point(lut)


def _equalize(img, rng):
    img = _pil(img)
    hist = np.asarray(img.histogram(), dtype=np.int64).reshape(3, 256)
    lut = []
    for ch in hist:
        step = ch[ch != 0][:-1].sum() // 255
        if step == 0:
            lut.extend(range(256))
            continue
        n = np.concatenate([[step // 2], ch[:-1]])
        lut.extend((np.cumsum(n) // step).clip(0, 255).astype(np.uint8).tolist())
    return img.point(lut)


_BRIGHTNESS_LUT = (np.arange(256, dtype=np.float32) * np.float32(_ENHANCE)).clip(0, 255).astype(np.uint8).tolist() * 3


def _brightness(img, rng):
    return _pil(img).point(_BRIGHTNESS_LUT)


def _sharpness(img, rng):
    # OFA: smooth + factor * (img - smooth) with the (1 1 1; 1 5 1; 1 1 1)/13 kernel (PIL's SMOOTH), border
    # pixels unchanged; PIL's 3x3 filter copies the border, and blend truncates like OFA's uint8 cast.
    if _pixel_ops is None:
        img = _pil(img)
        return Image.blend(img.filter(ImageFilter.SMOOTH), img, _ENHANCE)
    src = _pixels(img)
    h, w, bpp = src.shape
    out = np.empty_like(src)
    _pixel_ops.sharpen(src, w, h, bpp, out, _ENHANCE)  # Pillow's pixels (csrc/resample/sharpen.c)
    return out[..., :3]


def _pixels(img: Image.Image | np.ndarray) -> np.ndarray:
    """A C-contiguous (H, W, 3) array, or (H, W, 4) of Pillow's RGBX memory without a copy, for the C ops."""
    src = img if isinstance(img, np.ndarray) else _rgbx(img)
    return np.ascontiguousarray(np.asarray(img) if src is None else src)


def _affine(img: Image.Image | np.ndarray, m) -> Image.Image | np.ndarray:
    """Warp by OpenCV-style forward matrix m (2 x 3, pixel indices) with bilinear sampling."""
    inv = np.linalg.inv(np.vstack([np.asarray(m, dtype=np.float64), [0, 0, 1]]))[:2]
    # OpenCV samples output pixel (x, y) at inv(x, y); PIL at A(x + 1/2, y + 1/2) - 1/2. Conjugate accordingly.
    inv[:, 2] += 0.5 - 0.5 * (inv[:, 0] + inv[:, 1])
    coeffs = tuple(inv.reshape(-1).tolist())
    if _pixel_ops is None:
        img = _pil(img)
        return img.transform(img.size, Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=FILL)
    src = _pixels(img)
    h, w = src.shape[:2]
    out = np.empty((h, w, 3), np.uint8)
    _pixel_ops.affine(src, w, h, src.shape[2], coeffs, out, FILL)  # Pillow's pixels (csrc/resample/affine.c)
    return out


def _shear_x(img, rng):
    return _affine(img, [[1, _signed(_SHEAR, rng), 0], [0, 1, 0]])


def _shear_y(img, rng):
    return _affine(img, [[1, 0, 0], [_signed(_SHEAR, rng), 1, 0]])


def _shift(img: Image.Image, dx: int, dy: int) -> Image.Image:
    """out(x, y) = in(x + dx, y + dy), FILL outside: OpenCV's translation by (-dx, -dy) at integer offsets."""
    img = _pil(img)
    w, h = img.size
    out = Image.new("RGB", img.size, FILL)
    out.paste(img.crop((max(dx, 0), max(dy, 0), w + min(dx, 0), h + min(dy, 0))), (max(-dx, 0), max(-dy, 0)))
    return out


def _translate_x(img, rng):
    return _shift(img, _signed(_TRANSLATE, rng), 0)


def _translate_y(img, rng):
    return _shift(img, 0, _signed(_TRANSLATE, rng))


def _rotate(img, rng):
    deg = _signed(_ROTATE, rng)
    a, b = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    w, h = _size(img)
    cx, cy = w / 2, h / 2
    # cv2.getRotationMatrix2D(centre, deg, 1): counter-clockwise on screen for positive degrees.
    return _affine(img, [[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]])


# OFA's op list, in its order.
RAND_AUGMENT_OPS = (
    _identity,
    _auto_contrast,
    _equalize,
    _brightness,
    _sharpness,
    _shear_x,
    _shear_y,
    _translate_x,
    _translate_y,
    _rotate,
)

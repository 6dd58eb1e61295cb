"""Per-call time of the loader's pixel steps against what they replace (one core, medians of repeats).

    python benchmarks/pixel_ops.py --photo "$(python benchmarks/photos.py /tmp/photos | cut -d' ' -f1)"

- resize: the 384 px caption window of a 720x477 image, `_pixel_ops.resize` vs Pillow's `Image.resize(box=...)`;
  resize_up: a 300x300 image (the generated corpus's sizes) to 384x384.
- decode: a progressive JPEG (--photo, else a generated one) vs the baseline file tsv2arrow stores for it.
- transcode: tsv2arrow's `baseline_jpeg` (transcode + pixel check), the one-off conversion cost per image.
- RandAugment on a 384 px image: translate (7 px shift); warp (21 degree rotation, `_pixel_ops.affine` vs Pillow's
  `Image.transform`); sharpness (`_pixel_ops.sharpen` vs Pillow's SMOOTH filter + blend).
- planar: (H, W, 3) -> (3, H, W) into a batch slot, `_pixel_ops.planar` vs numpy's transposing copy.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ofa_ds.data import transforms, tsv_rows  # noqa: E402
from ofa_ds.train.env import report  # noqa: E402


def ms(fn, repeats: int = 7, calls: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(times)


ROTATE_21 = [[0.934, 0.358, -56.0], [-0.358, 0.934, 81.4]]  # RandAugment's rotation about the centre of 384 px


def without(fn) -> float:
    """ms of fn with transforms' C extension switched off: the Pillow path it replaces."""
    saved, transforms._pixel_ops = transforms._pixel_ops, None
    try:
        return ms(fn)
    finally:
        transforms._pixel_ops = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photo", help="a progressive JPEG photograph")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pixel_ops.json"))
    args = p.parse_args()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (477, 720, 3), dtype=np.uint8)
    box = (147.3, 25.1, 573.4, 451.2)
    img384 = Image.fromarray(pixels[:384, :384])
    hwc384 = np.ascontiguousarray(pixels[:384, :384])
    chw384 = np.empty((3, 384, 384), np.uint8)
    if args.photo:
        progressive = Path(args.photo).read_bytes()
    else:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90, progressive=True)
        progressive = buf.getvalue()
    baseline = tsv_rows.baseline_jpeg(progressive)
    res = {
        "resize_c_ms": ms(lambda: transforms.resize_bicubic(pixels, (384, 384), box)),
        "resize_pillow_ms": ms(lambda: Image.fromarray(pixels).resize((384, 384), Image.BICUBIC, box=box)),
        "resize_up_c_ms": ms(lambda: transforms.resize_bicubic(pixels[:300, :300], (384, 384), (0, 0, 300, 300))),
        "resize_up_pillow_ms": ms(lambda: Image.fromarray(pixels[:300, :300]).resize((384, 384), Image.BICUBIC)),
        "decode_progressive_ms": ms(lambda: simplejpeg.decode_jpeg(progressive, "RGB")),
        "decode_baseline_ms": ms(lambda: simplejpeg.decode_jpeg(baseline, "RGB")),
        "transcode_and_check_ms": ms(lambda: tsv_rows.baseline_jpeg(progressive), calls=5),
        "baseline_bytes_ratio": len(baseline) / len(progressive),
        "translate_ms": ms(lambda: transforms._shift(img384, 7, 0)),
        "warp_c_ms": ms(lambda: transforms._affine(hwc384, ROTATE_21)),
        "warp_pillow_ms": without(lambda: transforms._affine(img384, ROTATE_21)),
        "sharpness_c_ms": ms(lambda: transforms._sharpness(hwc384, None)),
        "sharpness_pillow_ms": without(lambda: transforms._sharpness(img384, None)),
        "planar_c_ms": ms(lambda: transforms.planar_into(chw384, transforms.to_chw(hwc384))),
        "planar_numpy_ms": ms(lambda: np.copyto(chw384, hwc384.transpose(2, 0, 1))),
        "extensions": {"pixel_ops": transforms._pixel_ops is not None, "jpegtran": tsv_rows._jpegtran is not None},
        "photo": args.photo,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "env": report(),  # versions, CPU, extensions
    }
    print(json.dumps(res, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Real photographs for the loader benchmarks, installed from a package registry (no download at run time):
scikit-image's bundled colour photographs, written as progressive JPEGs (quality 90), as photos on the web often are.

    pip install scikit-image
    python benchmarks/photos.py DIR     # writes DIR/astronaut.jpg ... and prints their paths
"""

from __future__ import annotations

import sys
from pathlib import Path

# 512 x 512, 400 x 600, 427 x 640: at least 384 px a side (the v1 image size), as the benchmarks need
PHOTOS = ("astronaut", "coffee", "rocket")


def write_photos(out_dir: str | Path) -> list[Path]:
    import skimage.data
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PHOTOS:
        path = out_dir / f"{name}.jpg"
        Image.fromarray(getattr(skimage.data, name)()).save(path, "JPEG", quality=90, progressive=True)
        paths.append(path)
    return paths


if __name__ == "__main__":
    print(" ".join(str(p) for p in write_photos(sys.argv[1])))

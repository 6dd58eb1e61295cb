"""One line of an OFA pretraining TSV (OFA_SPEC 5.1) -> one row of its Arrow schema, or `Rejected`.

Fields are read as OFA reads them (unify_dataset.py / unify_task.py): qa answers `conf|!+answer` joined by
`&&`; grounding box `x0,y0,x1,y1` (stripped); gt objects `&&`-separated; detection boxes
`x0,y0,x1,y1,category_id,category_name` joined by `&&`, split on the first 5 commas; image codes
whitespace-separated. Where OFA would crash or train on garbage, the line is rejected instead, for one of
these reasons: utf8, column_count, base64, image_undecodable (incl. truncated files), image_too_large
(over max_pixels), image_size (image-infilling image not 256x256), box (not 4 finite numbers in order, or
entirely outside its image), codes, confidence (not a finite number >= 0: it becomes a loss weight), task_type.
Every row gets its checksum (schema.row_crc).

Images are stored as their encoded bytes, with one exception: a progressive JPEG is stored losslessly transcoded
to baseline (the same DCT coefficients, so the same pixels, checked per image), which the loader decodes 2-3x
faster. This needs the `_jpegtran` extension (csrc/jpegtran); without it the bytes are kept as they are.
"""

from __future__ import annotations

import base64
import binascii
import io
import math

import numpy as np
import pyarrow as pa
import simplejpeg
from PIL import Image

from ofa_ds.data.schema import CODE_IMAGE_SIZE, CODEBOOK_SIZE, NUM_CODES, TASK_TYPES, TSV_SOURCES, schema, with_crc

try:
    from ofa_ds.data import _jpegtran  # compiled by `pip install` where libjpeg's headers are present
except ImportError:
    _jpegtran = None

RAW_CHARS = 300  # how much of a rejected line the quarantine file keeps


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def parse_lines(source: str, lines: list[bytes], first_line: int, offset: int, max_pixels: int):
    """Parse consecutive lines starting at 1-based line `first_line` and byte `offset` of the file.

    Returns (batch of good rows, [(line, end offset)] per good row, [rejection dicts], end offset).
    """
    rows, marks, rejects = [], [], []
    for k, line in enumerate(lines):
        offset += len(line)
        try:
            row = parse_line(source, line, max_pixels)
        except Rejected as r:
            raw = line[:RAW_CHARS].decode("utf-8", "replace")
            rejects.append({"line": first_line + k, "reason": r.reason, "detail": r.detail, "raw": raw})
            continue
        if row is not None:
            rows.append(row)
            marks.append((first_line + k, offset))
    return pa.RecordBatch.from_pylist(rows, schema=schema(source)), marks, rejects, offset


def parse_line(source: str, line: bytes, max_pixels: int) -> dict | None:
    """A row dict, None for a line OFA skips (blank line in a negative pool), or raises Rejected."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected("utf8", str(e)) from None
    if source in ("captions", "objects"):  # OFA: row.strip(), blank rows dropped
        text = text.strip()
        return with_crc(source, {"caption" if source == "captions" else "object": text}) if text else None
    # OFA reads in text mode (universal newlines) and drops the trailing "\n".
    text = text.removesuffix("\n").removesuffix("\r")
    fields = text.split("\t")
    if len(fields) != TSV_SOURCES[source][1]:
        raise Rejected("column_count", f"{len(fields)} tab-separated columns, expected {TSV_SOURCES[source][1]}")
    return with_crc(source, _PARSERS[source](fields, max_pixels))


def _vl(f: list[str], max_pixels: int) -> dict:
    uniq_id, image, caption, question, refs, gt_objects, dataset_name, task_type = f
    if task_type not in TASK_TYPES:
        raise Rejected("task_type", f"{task_type!r} is not one of {', '.join(TASK_TYPES)}")
    answers, box = [], None
    data, size = _image(image, max_pixels)
    if task_type == "qa":
        answers = [_answer(item) for item in refs.split("&&")]
    elif task_type == "visual_grounding":
        box = _inside(_box(refs.strip().split(","), "grounding box"), size, "grounding box")
    return {
        "uniq_id": uniq_id,
        "image": data,
        "caption": caption,
        "question": question,
        "answers": answers,
        "box": box,
        "gt_objects": gt_objects.strip().split("&&") if gt_objects.strip() else [],
        "dataset_name": dataset_name,
        "task_type": task_type,
    }


def _text(f: list[str], max_pixels: int) -> dict:
    return {"uniq_id": f[0], "text": f[1]}


def _image_row(f: list[str], max_pixels: int) -> dict:
    image_id, image, codes = f
    parts = codes.strip().split()
    if len(parts) != NUM_CODES:
        raise Rejected("codes", f"{len(parts)} image codes, expected {NUM_CODES}")
    try:
        values = [int(p) for p in parts]
    except ValueError as e:
        raise Rejected("codes", str(e)) from None
    bad = [v for v in values if not 0 <= v < CODEBOOK_SIZE]
    if bad:
        raise Rejected("codes", f"code {bad[0]} outside [0, {CODEBOOK_SIZE - 1}]")
    size = (CODE_IMAGE_SIZE, CODE_IMAGE_SIZE)
    return {"image_id": image_id, "image": _image(image, max_pixels, size)[0], "codes": values}


def _detection(f: list[str], max_pixels: int) -> dict:
    image_id, image, labels = f
    data, size = _image(image, max_pixels)
    boxes = []
    for item in labels.strip().split("&&"):
        parts = item.strip().split(",", 5)
        if len(parts) != 6:
            raise Rejected("box", f"detection box {item[:80]!r} is not x0,y0,x1,y1,category_id,category_name")
        x0, y0, x1, y1 = _inside(_box(parts[:4], "detection box"), size, "detection box")
        boxes.append({"x0": x0, "y0": y0, "x1": x1, "y1": y1, "category_id": parts[4], "label": parts[5]})
    return {"image_id": image_id, "image": data, "boxes": boxes}


_PARSERS = {"vl": _vl, "text": _text, "image": _image_row, "detection": _detection}


def _answer(item: str) -> dict:
    conf, sep, answer = item.partition("|!+")
    if not sep:
        raise Rejected("confidence", f"answer {item[:80]!r} is not conf|!+answer")
    try:
        value = float(conf)
    except ValueError:
        raise Rejected("confidence", f"confidence {conf[:40]!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise Rejected("confidence", f"confidence {conf!r} is not a finite number >= 0 (it weights the loss)")
    return {"answer": answer, "conf": value}


def _box(parts: list[str], what: str) -> list[float]:
    try:
        x0, y0, x1, y1 = (float(p) for p in parts)
    except ValueError:
        raise Rejected("box", f"{what} {','.join(parts)[:80]!r} is not 4 numbers x0,y0,x1,y1") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 < x0 or y1 < y0:
        raise Rejected("box", f"{what} {x0},{y0},{x1},{y1} is not finite with x0 <= x1 and y0 <= y1")
    return [x0, y0, x1, y1]


def _inside(box: list[float], size: tuple[int, int], what: str) -> list[float]:
    """A box that overlaps its w x h image; one entirely outside it would become bins pinned to the border."""
    x0, y0, x1, y1 = box
    w, h = size
    if x0 >= w or y0 >= h or x1 <= 0 or y1 <= 0:
        raise Rejected("box", f"{what} {x0},{y0},{x1},{y1} lies entirely outside its {w}x{h} image")
    return box


def _image(b64: str, max_pixels: int, size: tuple[int, int] | None = None) -> tuple[bytes, tuple[int, int]]:
    """Decode OFA's URL-safe base64 and check that Pillow can decode the image fully: (bytes to store, (w, h))."""
    try:
        data = base64.urlsafe_b64decode(b64)
    except (binascii.Error, ValueError) as e:
        raise Rejected("base64", str(e)) from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise Rejected("image_too_large", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
            if size is not None and (w, h) != size:
                raise Rejected("image_size", f"image is {w}x{h}, expected {size[0]}x{size[1]}")
            im.draft("RGB", (1, 1))  # JPEG: decode at 1/8 scale; every coefficient is still read
            im.load()
    except Rejected:
        raise
    except Exception as e:  # Pillow raises many types for corrupt data
        raise Rejected("image_undecodable", f"{type(e).__name__}: {e}") from None
    return baseline_jpeg(data), (w, h)


def baseline_jpeg(data: bytes) -> bytes:
    """A progressive YCbCr/grayscale JPEG as a baseline one with the same coefficients; anything else, or any
    transcoded file that would not decode to the same pixels, as it is."""
    out = _jpegtran.baseline(data) if _jpegtran is not None else None
    if out is None:
        return data
    try:
        same = np.array_equal(simplejpeg.decode_jpeg(data, "RGB"), simplejpeg.decode_jpeg(out, "RGB", strict=True))
    except ValueError:
        same = False
    return out if same else data

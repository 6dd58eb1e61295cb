"""Arrow schemas of the converted OFA corpus (one per source) and the corpus layout on disk.

A converted corpus is a directory that plain `pyarrow` can read without ofa_ds:

    manifest.json                 written last; see below
    vl/vl-00000.arrow ...         Arrow IPC *file* format, uncompressed, one schema per source
    text/text-00000.arrow ...
    image/..., detection/...
    captions/..., objects/..., type2ans/...   negative-sample pools (OFA's negative_sample/ dir)
    quarantine.jsonl              rejected input lines: {"file", "line", "reason", "detail", "raw"}
    .progress.jsonl               only while a conversion is unfinished (tsv2arrow.py)

    import pyarrow as pa
    table = pa.ipc.open_file(pa.memory_map("vl/vl-00000.arrow")).read_all()

Shards are a pure function of the input rows and the settings (not of chunking, workers or resumption).
Every record batch of a shard holds `batch_rows` rows (from the manifest) except the shard's last one, so
row j of a shard is row `j % batch_rows` of batch `j // batch_rows`. Each schema carries the metadata
`ofa_ds.schema_version` and `ofa_ds.source`. Every source's last column is `row_crc` (uint32): `row_crc()` of
the row's other values, written at conversion and checked by the reader at each read (a changed byte anywhere in
a row's data is caught: CRC-32 detects every error burst up to 32 bits).

Sources and columns (OFA_SPEC 5.1 gives the TSV columns they come from):

  vl         vision_language_examples.tsv, one row per line
    uniq_id       string
    image         large_binary   encoded image file (JPEG/PNG/...), base64 decoded once at conversion;
                                 it decodes fully with Pillow's defaults (truncated files are rejected)
    caption       string         caption, or referring expression for grounding rows
    question      string         question (qa rows; whatever the TSV held otherwise)
    answers       list<struct<answer: string, conf: double>>   qa rows: `conf|!+answer&&...` in TSV
                                 order (duplicates kept); [] for other task types
    box           fixed_size_list<double, 4> (nullable)        grounding rows: x0, y0, x1, y1 in
                                 original-image pixels; null for other task types
    gt_objects    list<string>   `&&`-split ground-truth objects; [] when the column is blank
    dataset_name  string         e.g. "cc12m" (OFA pads the first two caption target tokens for it)
    task_type     string         "caption" | "qa" | "visual_grounding"
  text       text_examples.tsv
    uniq_id string, text string
  image      image_examples.tsv (images are 256x256)
    image_id string, image large_binary, codes fixed_size_list<int16, 256> (VQGAN codes in [0, 8191]
    of the centre 128x128 region, row-major)
  detection  detection_examples.tsv
    image_id string, image large_binary,
    boxes list<struct<x0, y0, x1, y1: double, category_id: string, label: string>> in TSV order
  captions   negative_sample/all_captions.txt: caption string (stripped, blank lines skipped, as OFA)
  objects    negative_sample/object.txt: object string (stripped, blank lines skipped, as OFA)
  type2ans   negative_sample/type2ans.json: answer_type string, answers list<string> (JSON key order)

manifest.json:
  {"schema_version": int, "batch_rows": int,
   "sources": {source: {"rows": int, "shards": [{"file": relative path, "rows": int, "bytes": int,
                                                  "sha256": hex}]}},
   "totals": {"rows": int, "shards": int, "bytes": int},
   "rejected": {"rows": int, "by_reason": {reason: int}},
   "duplicate_ids": {source: int},       rows whose uniq_id / image_id an earlier row of the source has (kept)
   "oversized_text": {source: int},      rows with a text field over MAX_TEXT_CHARS (kept; the loader reads that much)
   "manifest_sha256": hex}               sha256 of this JSON without this key (sorted keys, compact): an edited or
                                         corrupted manifest is refused at open
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import pyarrow as pa

SCHEMA_VERSION = 2  # 2: row_crc, duplicate_ids, oversized_text, manifest_sha256
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"

# TSV sources in conversion order, with their file name and column count in OFA's release layout.
TSV_SOURCES = {
    "vl": ("vision_language_examples.tsv", 8),
    "text": ("text_examples.tsv", 2),
    "image": ("image_examples.tsv", 3),
    "detection": ("detection_examples.tsv", 3),
}
NEGATIVES_DIR = "negative_sample"
# Line-per-row negative pools: source -> (file in NEGATIVES_DIR, column name).
LINE_POOLS = {"captions": ("all_captions.txt", "caption"), "objects": ("object.txt", "object")}
TYPE2ANS_FILE = "type2ans.json"
SOURCES = (*TSV_SOURCES, *LINE_POOLS, "type2ans")

TASK_TYPES = ("caption", "qa", "visual_grounding")
NUM_CODES = 256
CODEBOOK_SIZE = 8192
CODE_IMAGE_SIZE = 256  # the image TSV holds 256x256 images (OFA_SPEC 4.4)
# A text field longer than this is counted at conversion and cut to it by the reader: OFA keeps at most a few
# hundred tokens of any field, and a 10 MB caption would cost half a second of tokenising per sample.
MAX_TEXT_CHARS = 16384
TEXT_FIELDS = {"vl": ("caption", "question"), "text": ("text",)}
ID_FIELDS = {"vl": "uniq_id", "text": "uniq_id", "image": "image_id", "detection": "image_id"}

_ANSWER = pa.struct([("answer", pa.string()), ("conf", pa.float64())])
_BOX = pa.struct(
    [
        ("x0", pa.float64()),
        ("y0", pa.float64()),
        ("x1", pa.float64()),
        ("y1", pa.float64()),
        ("category_id", pa.string()),
        ("label", pa.string()),
    ]
)

_FIELDS = {
    "vl": [
        ("uniq_id", pa.string()),
        ("image", pa.large_binary()),
        ("caption", pa.string()),
        ("question", pa.string()),
        ("answers", pa.list_(_ANSWER)),
        ("box", pa.list_(pa.float64(), 4)),
        ("gt_objects", pa.list_(pa.string())),
        ("dataset_name", pa.string()),
        ("task_type", pa.string()),
    ],
    "text": [("uniq_id", pa.string()), ("text", pa.string())],
    "image": [("image_id", pa.string()), ("image", pa.large_binary()), ("codes", pa.list_(pa.int16(), NUM_CODES))],
    "detection": [("image_id", pa.string()), ("image", pa.large_binary()), ("boxes", pa.list_(_BOX))],
    "captions": [("caption", pa.string())],
    "objects": [("object", pa.string())],
    "type2ans": [("answer_type", pa.string()), ("answers", pa.list_(pa.string()))],
}


ROW_CRC = "row_crc"


def schema(source: str) -> pa.Schema:
    meta = {"ofa_ds.schema_version": str(SCHEMA_VERSION), "ofa_ds.source": source}
    return pa.schema([*_FIELDS[source], (ROW_CRC, pa.uint32())], metadata=meta)


def row_crc(source: str, row: dict) -> int:
    """CRC-32 of a row's values (every column but row_crc) in a canonical byte form: lengths and type tags
    around strings, bytes and lists, so that no two different rows share an encoding."""
    crc = 0
    for name, _ in _FIELDS[source]:
        crc = _crc(row[name], crc)
    return crc


def _crc(v, crc: int) -> int:
    if isinstance(v, (bytes, str)):
        data = v.encode() if isinstance(v, str) else v
        crc = zlib.crc32(b"%c%d:" % (115 if isinstance(v, str) else 98, len(data)), crc)  # s / b
        return zlib.crc32(data, crc)
    if v is None:
        return zlib.crc32(b"n", crc)
    if isinstance(v, float):
        return zlib.crc32(struct.pack("<cd", b"d", v), crc)
    if isinstance(v, int):
        return zlib.crc32(struct.pack("<cq", b"i", v), crc)
    if isinstance(v, dict):
        for key in sorted(v):
            crc = _crc(v[key], crc)
        return zlib.crc32(b"}", crc)
    crc = zlib.crc32(b"l%d:" % len(v), crc)
    if v and all(type(x) is int for x in v):  # image codes: one pack instead of 256 calls
        return zlib.crc32(struct.pack(f"<{len(v)}q", *v), crc)
    for x in v:
        crc = _crc(x, crc)
    return crc


def with_crc(source: str, row: dict) -> dict:
    row[ROW_CRC] = row_crc(source, row)
    return row


def manifest_digest(m: dict) -> str:
    """sha256 of a manifest without its manifest_sha256 key, in a canonical JSON form."""
    body = {k: v for k, v in m.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()

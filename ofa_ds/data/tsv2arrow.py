"""Convert OFA's pretraining TSVs and negative-sample pools into Arrow shards + manifest.json.

    ofa-ds tsv2arrow SRC OUT [--rows-per-shard N] [--batch-rows N] [--max-pixels N] [--workers N]

SRC holds OFA's release layout (schema.TSV_SOURCES file names and negative_sample/); a missing file makes
that source empty. Lines are parsed in parallel (tsv_rows.py), in input order. Rejected lines go to
OUT/quarantine.jsonl. A shard is written under a temporary name and renamed when complete; the append-only
log OUT/.progress.jsonl then records it with the input position after its last row, so an interrupted run
resumes where it stopped (same settings) without losing or duplicating rows. The manifest is written last,
with the counts of kept rows with a repeated id or an oversized text field, and its own sha256.
"""

from __future__ import annotations

import collections
import functools
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageFile
from tqdm import tqdm

from ofa_ds.data.schema import (
    ID_FIELDS,
    LINE_POOLS,
    MANIFEST,
    MAX_TEXT_CHARS,
    NEGATIVES_DIR,
    QUARANTINE,
    SCHEMA_VERSION,
    SOURCES,
    TEXT_FIELDS,
    TSV_SOURCES,
    TYPE2ANS_FILE,
    manifest_digest,
    schema,
    sha256,
    with_crc,
)
from ofa_ds.data.tsv_rows import parse_lines

PROGRESS = ".progress.jsonl"


class ConversionError(Exception):
    pass


@dataclass
class ConvertConfig:
    src: str
    out: str
    rows_per_shard: int = 10_000
    batch_rows: int = 1_000
    max_pixels: int = 89_478_485  # Pillow's decompression-bomb limit
    workers: int = 0  # 0: all cores
    chunk_bytes: int = 4 << 20  # input bytes per parallel task


def convert(cfg: ConvertConfig) -> dict:
    """Convert (or finish converting) cfg.src into cfg.out; returns the manifest."""
    out = Path(cfg.out)
    if (out / MANIFEST).exists():
        raise ConversionError(f"{out / MANIFEST} exists: already converted; delete it or choose another output")
    inputs = _inputs(Path(cfg.src))
    state = _start_state(out, cfg, inputs)
    workers = cfg.workers or len(os.sched_getaffinity(0))
    with multiprocessing.Pool(workers, initializer=_init_worker) as pool, open(out / QUARANTINE, "ab") as q:
        for source in SOURCES:
            if inputs[source] is None or state["sources"][source]["done"]:
                continue
            if source == "type2ans":
                _convert_type2ans(out, inputs[source], state, q, cfg)
            else:
                _convert_lines(pool, workers, out, source, inputs[source], state, q, cfg)
    manifest = _manifest(out, state, cfg)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    (out / PROGRESS).unlink()
    return manifest


def _init_worker() -> None:
    Image.MAX_IMAGE_PIXELS = None  # --max-pixels replaces Pillow's own limit
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a stored image must decode with Pillow's defaults


def _inputs(src: Path) -> dict[str, Path | None]:
    if not src.is_dir():
        raise ConversionError(
            f"{src}: {'not a directory' if src.exists() else 'no such directory'} (the directory "
            f"of OFA's TSVs, e.g. one written by `ofa-ds make-sample-corpus`)"
        )
    paths = {s: src / name for s, (name, _) in TSV_SOURCES.items()}
    paths |= {s: src / NEGATIVES_DIR / name for s, (name, _) in LINE_POOLS.items()}
    paths["type2ans"] = src / NEGATIVES_DIR / TYPE2ANS_FILE
    found = {s: (p if p.is_file() else None) for s, p in paths.items()}
    if not any(found.values()):
        raise ConversionError(f"{src}: none of the input files found ({', '.join(str(p) for p in paths.values())})")
    return found


def _start_state(out: Path, cfg: ConvertConfig, inputs: dict) -> dict:
    """A fresh state, or the one replayed from the progress log of an interrupted run with the same
    settings and inputs."""
    params = {k: v for k, v in asdict(cfg).items() if k in ("rows_per_shard", "batch_rows", "max_pixels")}
    params["inputs"] = {s: [str(p.resolve()), p.stat().st_size] for s, p in inputs.items() if p is not None}
    fresh = {s: {"next_line": 1, "next_offset": 0, "shards": [], "done": False} for s in SOURCES}
    state = {"quarantine_bytes": 0, "sources": fresh}
    log = out / PROGRESS
    if log.exists():
        data = log.read_bytes()
        data = data[: data.rfind(b"\n") + 1]  # drop a line cut short by the interruption
        first, *events = (json.loads(line) for line in data.splitlines())
        if first != {"params": params}:
            raise ConversionError(
                f"{log}: an interrupted conversion with other settings or inputs ({first['params']}); "
                f"resume with the same ones or choose another output"
            )
        for event in events:
            _apply(state, event)
        with open(log, "r+b") as f:
            f.truncate(len(data))
        with open(out / QUARANTINE, "r+b") as q:  # drop rejections written after the last recorded shard
            q.truncate(state["quarantine_bytes"])
    else:
        out.mkdir(parents=True, exist_ok=True)
        (out / QUARANTINE).write_bytes(b"")
        log.write_text(json.dumps({"params": params}) + "\n")
    return state


def _apply(state: dict, event: dict) -> None:
    st = state["sources"][event["source"]]
    if "shard" in event:
        st["shards"].append(event["shard"])
        st["next_line"], st["next_offset"] = event["next"]
    else:
        st["done"] = True
    state["quarantine_bytes"] = event["quarantine_bytes"]


def _record(out: Path, state: dict, event: dict) -> None:
    """Apply a progress event (a shard renamed into place, or a source done) and append it to the log."""
    _apply(state, event)
    _append_progress(out, json.dumps(event) + "\n")


def _append_progress(out: Path, line: str) -> None:
    with open(out / PROGRESS, "a") as f:
        f.write(line)


def _convert_lines(pool, workers: int, out: Path, source: str, path: Path, state: dict, q, cfg: ConvertConfig):
    st = state["sources"][source]
    writer = ShardWriter(out, source, cfg.rows_per_shard, cfg.batch_rows, len(st["shards"]))
    pending: list[dict] = []  # rejections not yet in the quarantine file, in line order
    bar = tqdm(total=path.stat().st_size, initial=st["next_offset"], unit="B", unit_scale=True, desc=source)

    def record(done: list) -> None:
        """Shards renamed into place: their rejections go to the quarantine file, then the state is saved."""
        nonlocal pending
        for shard, (line, offset) in done:
            _quarantine(q, path, [r for r in pending if r["line"] <= line])
            pending = [r for r in pending if r["line"] > line]
            _record(
                out, state, {"source": source, "shard": shard, "next": [line + 1, offset], "quarantine_bytes": q.tell()}
            )

    def absorb(result) -> None:
        batch, marks, rejects, end = result
        pending.extend(rejects)
        bar.update(end - bar.n)
        record(writer.add(batch, marks))

    results = collections.deque()  # in input order; bounded so that reading cannot run far ahead
    for chunk in _chunks(path, st["next_line"], st["next_offset"], cfg.chunk_bytes):
        results.append(pool.apply_async(parse_lines, (source, *chunk, cfg.max_pixels)))
        while results and (len(results) > 2 * workers or results[0].ready()):
            absorb(results.popleft().get())
    while results:
        absorb(results.popleft().get())
    record(writer.close())
    _quarantine(q, path, pending)
    _record(out, state, {"source": source, "done": True, "quarantine_bytes": q.tell()})
    bar.close()


def _quarantine(q, path: Path, rejects: list[dict]) -> None:
    for r in rejects:
        q.write((json.dumps({"file": str(path), **r}, ensure_ascii=False) + "\n").encode())
    q.flush()


def _chunks(path: Path, line: int, offset: int, chunk_bytes: int):
    """(lines, first line number, byte offset) of about chunk_bytes each, from `offset` on."""
    with open(path, "rb") as f:
        f.seek(offset)
        lines, size = [], 0
        for raw in f:
            lines.append(raw)
            size += len(raw)
            if size >= chunk_bytes:
                yield lines, line, offset
                line, offset, lines, size = line + len(lines), offset + size, [], 0
        if lines:
            yield lines, line, offset


def _convert_type2ans(out: Path, path: Path, state: dict, q, cfg: ConvertConfig) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "other" not in data:
        raise ConversionError(f"{path}: expected a JSON object {{answer_type: [answers]}} with an 'other' key")
    for k, v in data.items():
        if not (isinstance(v, list) and all(isinstance(a, str) for a in v)):
            raise ConversionError(f"{path}: key {k!r} must map to a list of strings")
    rows = [{"answer_type": k, "answers": v} for k, v in data.items()]
    writer = ShardWriter(out, "type2ans", cfg.rows_per_shard, cfg.batch_rows, 0)
    batch = pa.RecordBatch.from_pylist([with_crc("type2ans", r) for r in rows], schema=schema("type2ans"))
    for shard, _ in writer.add(batch, [(1, 0)] * len(rows)) + writer.close():
        _record(out, state, {"source": "type2ans", "shard": shard, "next": [1, 0], "quarantine_bytes": q.tell()})
    _record(out, state, {"source": "type2ans", "done": True, "quarantine_bytes": q.tell()})


class ShardWriter:
    """Cuts a stream of record batches into shards of rows_per_shard rows, each written as record batches of
    batch_rows rows (the last one of a shard may be shorter), so the output does not depend on how the
    input was chunked. add() and close() return the shards completed, with the (line, offset) mark of
    their last row."""

    def __init__(self, out: Path, source: str, rows_per_shard: int, batch_rows: int, index: int):
        self.dir, self.source, self.index = out / source, source, index
        self.rows_per_shard, self.batch_rows = rows_per_shard, batch_rows
        self.dir.mkdir(parents=True, exist_ok=True)
        self.buf: list[pa.RecordBatch] = []
        self.marks: list[tuple[int, int]] = []  # one per buffered row
        self.file = None  # (tmp path, sink, ipc writer) of the shard being written
        self.rows = 0  # rows in the shard being written
        self.last_mark = None

    def add(self, batch: pa.RecordBatch, marks: list) -> list:
        if batch.num_rows:
            self.buf.append(batch)
            self.marks += marks
        done = []
        while len(self.marks) >= self._want():
            done += self._write(self._want())
        return done

    def close(self) -> list:
        done = self._write(len(self.marks)) if self.marks else []
        return done + ([self._finish()] if self.file else [])

    def _want(self) -> int:
        return min(self.batch_rows, self.rows_per_shard - self.rows)

    def _write(self, n: int) -> list:
        parts, need = [], n
        while need:
            b = self.buf[0]
            take = min(need, b.num_rows)
            parts.append(b.slice(0, take))
            self.buf[0:1] = [b.slice(take)] if take < b.num_rows else []
            need -= take
        if self.file is None:
            tmp = self.dir / f"{self._name()}.tmp"
            sink = pa.OSFile(str(tmp), "wb")
            self.file = (tmp, sink, pa.ipc.new_file(sink, schema(self.source)))
        self.file[2].write_batch(pa.concat_batches(parts))
        self.rows += n
        self.last_mark = self.marks[n - 1]
        del self.marks[:n]
        return [self._finish()] if self.rows == self.rows_per_shard else []

    def _finish(self):
        tmp, sink, writer = self.file
        writer.close()
        sink.close()
        final = self.dir / self._name()
        os.replace(tmp, final)
        shard = {
            "file": f"{self.source}/{final.name}",
            "rows": self.rows,
            "bytes": final.stat().st_size,
            "sha256": sha256(final),
        }
        self.file, self.rows, self.index = None, 0, self.index + 1
        return shard, self.last_mark

    def _name(self) -> str:
        return f"{self.source}-{self.index:05d}.arrow"


def _kept_but_odd(out: Path, sources: dict) -> dict:
    """Rows kept that a user should know of: ids an earlier row of the source already has, and text fields over
    MAX_TEXT_CHARS. Read from the shards' id and text columns (memory-mapped: no image bytes are touched)."""
    duplicates, oversized = {}, {}
    for source, id_field in ID_FIELDS.items():
        tables = [pa.ipc.open_file(pa.memory_map(str(out / sh["file"]))).read_all() for sh in sources[source]["shards"]]
        if not tables:
            continue
        table = pa.concat_tables(tables)
        duplicates[source] = table.num_rows - len(pc.unique(table.column(id_field)))
        if source in TEXT_FIELDS:
            lengths = [pc.utf8_length(table.column(f)) for f in TEXT_FIELDS[source]]
            longest = functools.reduce(pc.max_element_wise, lengths)
            oversized[source] = int(pc.sum(pc.greater(longest, MAX_TEXT_CHARS)).as_py() or 0)
    return {"duplicate_ids": duplicates, "oversized_text": oversized}


def _manifest(out: Path, state: dict, cfg: ConvertConfig) -> dict:
    sources = {}
    for s in SOURCES:
        shards = state["sources"][s]["shards"]
        sources[s] = {"rows": sum(x["rows"] for x in shards), "shards": shards}
    shards = [x for v in sources.values() for x in v["shards"]]
    with open(out / QUARANTINE, encoding="utf-8") as f:
        reasons = collections.Counter(json.loads(line)["reason"] for line in f)
    return {
        "schema_version": SCHEMA_VERSION,
        "batch_rows": cfg.batch_rows,
        "sources": sources,
        "totals": {
            "rows": sum(x["rows"] for x in shards),
            "shards": len(shards),
            "bytes": sum(x["bytes"] for x in shards),
        },
        "rejected": {"rows": sum(reasons.values()), "by_reason": dict(sorted(reasons.items()))},
        **_kept_but_odd(out, sources),
    }


def add_arguments(p) -> None:
    d = ConvertConfig("", "")
    p.add_argument("src", help="directory in OFA's layout: *_examples.tsv and negative_sample/")
    p.add_argument("out", help="output directory (an interrupted conversion into it is resumed)")
    p.add_argument(
        "--rows-per-shard", type=int, default=d.rows_per_shard, help="rows per shard file (default: %(default)s)"
    )
    p.add_argument(
        "--batch-rows", type=int, default=d.batch_rows, help="rows per Arrow record batch (default: %(default)s)"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=d.max_pixels,
        help="reject larger images, width x height (default: %(default)s, Pillow's bomb limit)",
    )
    p.add_argument("--workers", type=int, default=d.workers, help="parsing processes (default: 0, all cores)")


def run(args) -> int:
    cfg = ConvertConfig(args.src, args.out, args.rows_per_shard, args.batch_rows, args.max_pixels, args.workers)
    if min(cfg.rows_per_shard, cfg.batch_rows, cfg.max_pixels) < 1 or cfg.workers < 0:
        print(
            "ofa-ds tsv2arrow: --rows-per-shard, --batch-rows and --max-pixels must be >= 1, --workers >= 0",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    try:
        m = convert(cfg)
    except ConversionError as e:  # bad input: one line, exit 2 (as cli.main's other user errors)
        print(f"ofa-ds tsv2arrow: {e}", file=sys.stderr)
        return 2
    secs = time.perf_counter() - t0
    for s, v in m["sources"].items():
        print(f"{s:>10}: {v['rows']:>10} rows in {len(v['shards'])} shards")
    rej = m["rejected"]
    print(f"  rejected: {rej['rows']} rows -> {Path(cfg.out) / QUARANTINE}")
    for reason, n in rej["by_reason"].items():
        print(f"    {reason}: {n}")
    for key, what in (
        ("duplicate_ids", "kept with an id an earlier row has"),
        ("oversized_text", f"kept with a text field over {MAX_TEXT_CHARS} chars (read cut to it)"),
    ):
        counts = {s: n for s, n in m[key].items() if n}
        if counts:
            print(f"  {what}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    t = m["totals"]
    print(
        f"{t['rows']} rows, {t['bytes'] / 1e6:.1f} MB in {t['shards']} shards, {secs:.2f} s "
        f"({(t['rows'] + rej['rows']) / secs:.0f} rows/s) -> {Path(cfg.out) / MANIFEST}"
    )
    return 0

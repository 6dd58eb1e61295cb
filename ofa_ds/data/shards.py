"""Memory-mapped reader of a converted corpus (layout and schemas: schema.py).

    corpus = Corpus("data/ofa_arrow")
    corpus.vl[i]        # dict row, O(1): bisect over cumulative shard rows, then batch i // batch_rows
    corpus.negatives.captions[j], corpus.negatives.type2ans["how many"]

Opening reads manifest.json (checked against its own sha256) and each shard's footer only (size, Arrow
validity, schema, row count); no row data is touched and nothing is copied into memory, so start-up and resident
memory do not grow with the data. A record batch is validated in full (offsets, lengths, UTF-8) the first time a
process reads from it, and each row read is checked against its row_crc, so a changed byte in a shard is a
CorpusError naming the file and row at the first read of the rows it touches, never a crash or a changed sample.
Text fields are cut to schema.MAX_TEXT_CHARS. `verify()` checks every shard's sha256 (reads all data). A reader
opened before `fork` (DataLoader workers) re-opens its shards lazily in the child; pickling drops the open
shards.
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import itertools
import json
import mmap
import os
from pathlib import Path

import pyarrow as pa

from ofa_ds.data.schema import (
    MANIFEST,
    MAX_TEXT_CHARS,
    ROW_CRC,
    SCHEMA_VERSION,
    SOURCES,
    TEXT_FIELDS,
    TSV_SOURCES,
    manifest_digest,
    row_crc,
    schema,
    sha256,
)


class CorpusError(Exception):
    pass


class Corpus:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        try:
            self.manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise CorpusError(f"{path}: missing (convert the TSVs with `ofa-ds tsv2arrow` first)") from None
        except ValueError as e:
            raise CorpusError(f"{path}: not valid JSON ({e})") from None
        check_manifest(self.manifest, path)
        batch_rows, sources = self.manifest["batch_rows"], self.manifest["sources"]
        self.tables = {s: Table(self.root, s, sources.get(s, {}).get("shards", []), batch_rows) for s in SOURCES}
        self.vl, self.text, self.image, self.detection = (self.tables[s] for s in TSV_SOURCES)
        self.negatives = Negatives(self.tables)

    def verify(self) -> None:
        """Full check: every shard's sha256 against the manifest (reads all data)."""
        for t in self.tables.values():
            for path, entry in zip(t.paths, t.entries):
                if sha256(path) != entry["sha256"]:
                    raise CorpusError(f"{path}: sha256 differs from {self.root / MANIFEST}: the shard was altered")


def check_manifest(m, path: Path) -> None:
    """The manifest's structure and content, before any shard is opened: one error naming the key."""
    if not isinstance(m, dict):
        raise CorpusError(f"{path}: expected a JSON object, got {type(m).__name__}")
    version = m.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CorpusError(f"{path}: schema version {version}, this ofa_ds reads {SCHEMA_VERSION}; re-convert")
    if not _count(m.get("batch_rows"), positive=True):
        raise CorpusError(f"{path}: batch_rows must be a positive integer, got {m.get('batch_rows')!r}")
    sources = m.get("sources")
    if not isinstance(sources, dict):
        raise CorpusError(f"{path}: sources must be an object of source -> shards, got {sources!r:.80}")
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise CorpusError(f"{path}: unknown source(s) {', '.join(unknown)}; valid: {', '.join(SOURCES)}")
    seen: dict[str, str] = {}
    for source, entry in sources.items():
        where = f"{path}: sources.{source}"
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list):
            raise CorpusError(f"{where}.shards must be a list")
        for i, shard in enumerate(shards):
            at = f"{where}.shards[{i}]"
            if not isinstance(shard, dict):
                raise CorpusError(f"{at} must be an object")
            file = shard.get("file")
            if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts:
                raise CorpusError(f"{at}.file must be a path inside the corpus directory, got {file!r}")
            for key in ("rows", "bytes"):
                if not _count(shard.get(key)):
                    raise CorpusError(f"{at}.{key} must be a non-negative integer, got {shard.get(key)!r}")
            digest = shard.get("sha256")
            if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
                raise CorpusError(f"{at}.sha256 must be 64 lowercase hex digits, got {digest!r:.80}")
            if file in seen:
                raise CorpusError(f"{at}: {file} is listed twice (also in {seen[file]}): its rows would count twice")
            seen[file] = at
        listed = entry.get("rows", sum(sh["rows"] for sh in shards))
        if listed != sum(sh["rows"] for sh in shards):
            raise CorpusError(f"{where}.rows is {listed!r}, its shards hold {sum(sh['rows'] for sh in shards)}")
    if m.get("manifest_sha256") != manifest_digest(m):
        raise CorpusError(
            f"{path}: its content does not match its manifest_sha256: the manifest was edited or "
            "corrupted (a shard's sha256, size or row count may be wrong); re-convert the corpus"
        )


def _count(v, positive: bool = False) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (v > 0 if positive else v >= 0)


class Table:
    """One source's shards as a sequence of row dicts."""

    def __init__(self, root: Path, source: str, entries: list[dict], batch_rows: int):
        self.source, self.entries, self.batch_rows = source, entries, batch_rows
        self.paths = [root / e["file"] for e in entries]
        self.starts = list(itertools.accumulate((e["rows"] for e in entries), initial=0))  # (shards + 1,)
        self._readers: dict[int, pa.ipc.RecordBatchFileReader] = {}
        self._valid: set[tuple[int, int]] = set()  # (shard, batch) validated in full by this process
        self._text = TEXT_FIELDS.get(source, ())
        self._pid = os.getpid()
        for k in range(len(entries)):
            self._reader(k)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.source} row {i} out of range for {n} rows")
        i %= n
        k = bisect.bisect_right(self.starts, i) - 1
        j = i - self.starts[k]
        where = f"{self.paths[k]}: row {j} ({self.source} row {i})"
        batch = self._batch(k, j // self.batch_rows, where)
        try:
            row = batch.slice(j % self.batch_rows, 1).to_pylist()[0]
        except Exception as e:  # noqa: BLE001 - untrusted bytes: whatever Arrow or Python raise, name the row
            raise CorpusError(f"{where}: unreadable ({type(e).__name__}: {e})") from None
        if row.pop(ROW_CRC) != row_crc(self.source, row):
            raise CorpusError(f"{where}: its data does not match its checksum: the shard was altered or corrupted")
        for name in self._text:
            row[name] = row[name][:MAX_TEXT_CHARS]
        return row

    def _batch(self, k: int, b: int, where: str) -> pa.RecordBatch:
        try:
            batch = self._reader(k).get_batch(b)
            if (k, b) not in self._valid:
                batch.validate(full=True)
                self._valid.add((k, b))
        except (pa.ArrowException, OSError) as e:
            raise CorpusError(f"{where}: record batch {b} is corrupt ({e})") from None
        return batch

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_readers": {}, "_valid": set()}

    def _reader(self, k: int) -> pa.ipc.RecordBatchFileReader:
        if self._pid != os.getpid():  # forked: do not share Arrow objects with the parent
            self._readers, self._valid, self._pid = {}, set(), os.getpid()
        if k not in self._readers:
            self._readers[k] = self._open(k)
        return self._readers[k]

    def _open(self, k: int) -> pa.ipc.RecordBatchFileReader:
        path, entry = self.paths[k], self.entries[k]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CorpusError(f"{path}: missing (listed in the manifest)") from None
        if size != entry["bytes"]:
            raise CorpusError(f"{path}: {size} bytes, the manifest says {entry['bytes']}: truncated or altered")
        try:
            reader = pa.ipc.open_file(_map(path, size))
            same_schema = reader.schema.equals(schema(self.source), check_metadata=True)
            rows, b = entry["rows"], self.batch_rows
            nb = reader.num_record_batches
            layout = nb == -(-rows // b) and (nb == 0 or reader.get_batch(nb - 1).num_rows == rows - (nb - 1) * b)
        except (pa.ArrowException, OSError) as e:
            raise CorpusError(f"{path}: not a valid Arrow IPC file ({e}): altered or corrupt") from None
        if not same_schema:
            raise CorpusError(f"{path}: schema differs from ofa_ds's {self.source!r} schema v{SCHEMA_VERSION}")
        if not layout:
            raise CorpusError(f"{path}: does not hold the {rows} rows in batches of {b} the manifest lists")
        return reader


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class _Mapping:
    """A read-only mapping of a whole file for random access. Unlike pa.memory_map it holds no file
    descriptor (a corpus may have more shards than the descriptor limit) and does not madvise(WILLNEED)
    each range read (which pages in the whole file at open, or a whole record batch per row); and
    MADV_RANDOM stops the kernel from reading megabytes around each page fault."""

    def __init__(self, path: Path, size: int):
        with open(path, "rb") as f:
            self.addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        if self.addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap failed: {os.strerror(ctypes.get_errno())}", str(path))
        self.size, self._munmap = size, _libc.munmap  # still reachable in __del__ at interpreter exit
        _libc.madvise(self.addr, size, mmap.MADV_RANDOM)

    def __del__(self):
        self._munmap(self.addr, self.size)


def _map(path: Path, size: int) -> pa.Buffer:
    m = _Mapping(path, size)
    return pa.foreign_buffer(m.addr, size, base=m)


class Negatives:
    """OFA's negative-sample pools: caption and object sequences and the type2ans dict."""

    def __init__(self, tables: dict[str, Table]):
        self.captions, self.objects = Column(tables["captions"], "caption"), Column(tables["objects"], "object")
        self._type2ans = tables["type2ans"]

    @functools.cached_property
    def type2ans(self) -> dict[str, list[str]]:
        return {r["answer_type"]: r["answers"] for r in self._type2ans}


class Column:
    """One string column of a table as a sequence."""

    def __init__(self, table: Table, name: str):
        self.table, self.name = table, name

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> str:
        return self.table[i][self.name]

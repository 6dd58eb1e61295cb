"""Corpus reader: O(1) rows equal to the shards' content, errors at open naming the file, lazy data access."""

import ctypes
import json
import mmap
import multiprocessing
import os
import pickle
import random
import shutil

import numpy as np
import pyarrow as pa
import pytest

from ofa_ds.data.sample_corpus import SampleConfig, write_sample_corpus
from ofa_ds.data.schema import MANIFEST, MAX_TEXT_CHARS, SCHEMA_VERSION, manifest_digest, schema
from ofa_ds.data.shards import Corpus, CorpusError
from ofa_ds.data.tsv2arrow import ConvertConfig, convert


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    src = write_sample_corpus(
        SampleConfig(
            str(tmp / "tsv"), vl_rows=50, text_rows=20, image_rows=6, detection_rows=6, min_size=32, max_size=48
        )
    )
    convert(ConvertConfig(str(src), str(tmp / "arrow"), rows_per_shard=7, batch_rows=3, workers=2))
    return tmp / "arrow"


@pytest.fixture
def copy(corpus_dir, tmp_path):
    """A private copy of the converted corpus to damage."""
    return shutil.copytree(corpus_dir, tmp_path / "arrow")


def read_plain(root, source):
    """All rows of a source through plain pyarrow, no ofa_ds code (without the row_crc the reader checks)."""
    m = json.loads((root / MANIFEST).read_text())
    rows = []
    for shard in m["sources"][source]["shards"]:
        table = pa.ipc.open_file(pa.memory_map(str(root / shard["file"]))).read_all()
        rows += table.drop_columns("row_crc").to_pylist()
    return rows


def test_random_access_equals_plain_pyarrow(corpus_dir):
    corpus = Corpus(corpus_dir)
    for source, table in corpus.tables.items():
        rows = read_plain(corpus_dir, source)
        assert len(table) == len(rows)
        ids = list(range(len(rows)))
        random.Random(0).shuffle(ids)
        assert [table[i] for i in ids] == [rows[i] for i in ids]
    assert corpus.vl[-1] == corpus.vl[len(corpus.vl) - 1]
    with pytest.raises(IndexError, match="vl row 50 out of range for 50 rows"):
        corpus.vl[50]
    neg = corpus.negatives
    assert list(neg.captions) == [r["caption"] for r in read_plain(corpus_dir, "captions")]
    assert list(neg.objects) == [r["object"] for r in read_plain(corpus_dir, "objects")]
    assert neg.type2ans == json.loads((corpus_dir.parent / "tsv/negative_sample/type2ans.json").read_text())


def test_plain_pyarrow_sees_schema_and_batch_layout(corpus_dir):
    m = json.loads((corpus_dir / MANIFEST).read_text())
    assert m["schema_version"] == SCHEMA_VERSION and m["batch_rows"] == 3
    for shard in m["sources"]["vl"]["shards"]:
        reader = pa.ipc.open_file(pa.memory_map(str(corpus_dir / shard["file"])))
        assert reader.schema.equals(schema("vl"), check_metadata=True)
        assert reader.schema.metadata[b"ofa_ds.schema_version"] == str(SCHEMA_VERSION).encode()
        sizes = [reader.get_batch(b).num_rows for b in range(reader.num_record_batches)]
        assert sum(sizes) == shard["rows"] and all(s == 3 for s in sizes[:-1]) and 0 < sizes[-1] <= 3
        assert shard["bytes"] == os.path.getsize(corpus_dir / shard["file"])


def test_absent_source_is_empty(tmp_path):
    src = write_sample_corpus(SampleConfig(str(tmp_path / "tsv"), 3, 2, 1, 1, min_size=32, max_size=32))
    (src / "detection_examples.tsv").unlink()
    convert(ConvertConfig(str(src), str(tmp_path / "arrow"), workers=1))
    corpus = Corpus(tmp_path / "arrow")
    assert len(corpus.detection) == 0 and len(corpus.vl) == 3
    with pytest.raises(IndexError):
        corpus.detection[0]


def first_shard(root, source="vl"):
    m = json.loads((root / MANIFEST).read_text())
    return root / m["sources"][source]["shards"][0]["file"]


def test_truncated_shard_fails_at_open(copy):
    path = first_shard(copy)
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(CorpusError, match=f"{path}: .* truncated or altered"):
        Corpus(copy)


def test_altered_footer_fails_at_open(copy):
    path = first_shard(copy)
    data = bytearray(path.read_bytes())
    data[-6:] = b"XXXXXX"  # Arrow's trailing magic
    path.write_bytes(data)
    with pytest.raises(CorpusError, match=f"{path}: not a valid Arrow IPC file"):
        Corpus(copy)


def test_altered_data_passes_open_and_fails_verify(copy):
    path = first_shard(copy)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside an image's bytes: only the checksum can tell
    path.write_bytes(data)
    corpus = Corpus(copy)  # opening does not read row data
    with pytest.raises(CorpusError, match=f"{path}: sha256 differs"):
        corpus.verify()


def test_verify_accepts_intact_corpus(corpus_dir):
    Corpus(corpus_dir).verify()


def edit_manifest(root, edit):
    """An edited manifest with a matching manifest_sha256 (what the checks after it must catch)."""
    m = json.loads((root / MANIFEST).read_text())
    edit(m)
    m["manifest_sha256"] = manifest_digest(m)
    (root / MANIFEST).write_text(json.dumps(m))


def test_manifest_row_count_mismatch_fails_at_open(copy):
    def six_rows(m):  # the shard's count, and its source's total with it (checked by check_manifest)
        m["sources"]["text"]["rows"] += 6 - m["sources"]["text"]["shards"][1]["rows"]
        m["sources"]["text"]["shards"][1]["rows"] = 6

    edit_manifest(copy, six_rows)
    with pytest.raises(CorpusError, match="text-00001.arrow: does not hold the 6 rows in batches of 3"):
        Corpus(copy)


def test_shard_swapped_for_another_fails_at_open(copy):
    m = json.loads((copy / MANIFEST).read_text())
    a, b = (copy / s["file"] for s in m["sources"]["vl"]["shards"][:2])
    shutil.copy(b, a)
    with pytest.raises(CorpusError, match=f"{a}: .*truncated or altered"):
        Corpus(copy)


def test_schema_version_mismatch_fails_at_open(copy):
    edit_manifest(copy, lambda m: m.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(CorpusError, match=f"manifest.json: schema version {SCHEMA_VERSION + 1}, this ofa_ds reads"):
        Corpus(copy)


def test_missing_files_fail_at_open(copy):
    path = first_shard(copy, "image")
    path.unlink()
    with pytest.raises(CorpusError, match=f"{path}: missing"):
        Corpus(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(CorpusError, match="manifest.json: missing"):
        Corpus(copy)


def resident_fraction(path) -> float:
    """Fraction of the file's pages in the page cache (mincore)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    view = np.frombuffer(mm, dtype=np.uint8)
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    assert ctypes.CDLL(None).mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vec) == 0
    del view
    mm.close()
    return sum(v & 1 for v in vec) / len(vec)


def test_open_touches_footers_only(tmp_path):
    """Opening reads a few KB per shard; the rows' pages are only read when rows are accessed."""
    (tmp_path / "tsv").mkdir()
    text = random.Random(0).choices("abcdefgh ", k=100_000)
    (tmp_path / "tsv" / "text_examples.tsv").write_text("".join(f"t{i}\t{''.join(text)}\n" for i in range(160)))
    convert(ConvertConfig(str(tmp_path / "tsv"), str(tmp_path / "arrow"), rows_per_shard=80, batch_rows=8, workers=1))
    shards = sorted((tmp_path / "arrow" / "text").glob("*.arrow"))
    for path in shards:  # drop the shards from the page cache
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    if max(resident_fraction(p) for p in shards) > 0.01:
        pytest.skip("this file system keeps the pages cached (e.g. tmpfs)")
    corpus = Corpus(tmp_path / "arrow")
    assert max(resident_fraction(p) for p in shards) < 0.05  # 8 MB shards; footer + readahead only
    assert corpus.text[3]["uniq_id"] == "t3"
    assert resident_fraction(shards[1]) < 0.05
    # (the reader cuts text at MAX_TEXT_CHARS, after checking the whole row against its checksum)
    assert all(corpus.text[i]["text"] == "".join(text)[:MAX_TEXT_CHARS] for i in range(len(corpus.text)))
    assert min(resident_fraction(p) for p in shards) > 0.95


def read_rows(ids):
    return [_FORKED.vl[i] for i in ids]


def test_rows_after_fork_and_pickle(corpus_dir):
    global _FORKED
    _FORKED = corpus = Corpus(corpus_dir)
    corpus.vl[0]  # readers exist in the parent before the fork
    ids = list(range(len(corpus.vl)))
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(read_rows, [ids[::2], ids[1::2]]) == [read_rows(ids[::2]), read_rows(ids[1::2])]
    clone = pickle.loads(pickle.dumps(corpus))
    assert [clone.vl[i] for i in ids] == read_rows(ids)
    assert clone.negatives.type2ans == corpus.negatives.type2ans

"""Nothing on disk crashes a run or changes a sample unnoticed: a seeded sweep of single-byte flips over a VL shard
(benchmarks/corruption_sweep.py) ends every flip in a CorpusError naming the file (and the row, at read) or in rows
read back unchanged; a run whose shard was altered stops with one line naming the file and row."""

import importlib.util
import json
import shutil
import subprocess
import sys

import pretrain_harness as H

ROOT = H.ROOT


def _sweep_module():
    spec = importlib.util.spec_from_file_location("corruption_sweep", ROOT / "benchmarks" / "corruption_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_byte_flip_sweep_never_crashes_nor_changes_a_row(tmp_path):
    sweep = _sweep_module()
    corpus = sweep.build(tmp_path / "work")
    result = sweep.sweep(corpus, flips=150, seed=0)
    out = result["outcomes"]
    assert out["crash"] == out["unnamed_error"] == out["undetected_change"] == 0, result["failures"]
    assert out["detected_at_read"] > 100 and out["detected_at_open"] > 0  # the flips did change things
    assert sum(out.values()) == 150


def test_an_altered_row_stops_the_run_with_one_line(tmp_path, tmp_path_factory):
    data = H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")
    root = tmp_path / "arrow"
    shutil.copytree(data["corpus"], root)
    m = json.loads((root / "manifest.json").read_text())
    shard = root / m["sources"]["vl"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x20  # inside a row's image bytes: the file still opens
    shard.write_bytes(raw)
    run = H.write_run(tmp_path, {**data, "corpus": str(root)})
    done = subprocess.run(
        [sys.executable, "-m", "ofa_ds.cli", "pretrain", str(run)],
        env=H.env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = [x for x in done.stderr.splitlines() if x.startswith("ofa-ds pretrain:")]
    assert len(line) == 1 and f"{shard}: row " in line[0] and "does not match its checksum" in line[0], line

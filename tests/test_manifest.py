"""A corpus manifest is checked at open: each corruption gets one error naming the key, never a traceback."""

import json
import shutil
import subprocess
import sys

import pretrain_harness as H
import pytest

from ofa_ds.data.schema import manifest_digest
from ofa_ds.data.shards import Corpus, CorpusError


def _vl(m):
    return m["sources"]["vl"]["shards"][0]


CORRUPTIONS = {
    "a list": (lambda m: [m], "expected a JSON object, got list"),
    "no batch_rows": (lambda m: m.pop("batch_rows"), "batch_rows must be a positive integer, got None"),
    "no sources": (lambda m: m.pop("sources"), "sources must be an object"),
    "no file": (lambda m: _vl(m).pop("file"), r"sources.vl.shards\[0\].file must be a path"),
    "file outside": (lambda m: _vl(m).update(file="../../etc/passwd"), r"shards\[0\].file must be a path inside"),
    "rows as a string": (lambda m: _vl(m).update(rows="64"), r"sources.vl.shards\[0\].rows must be a non-negative"),
    "bad sha256": (lambda m: _vl(m).update(sha256="abc"), r"shards\[0\].sha256 must be 64 lowercase hex"),
    "shard twice": (lambda m: m["sources"]["vl"]["shards"].append(dict(_vl(m))), "is listed twice"),
    "unknown source": (lambda m: m["sources"].update(videos={"shards": []}), "unknown source"),
    "rows mismatch": (lambda m: m["sources"]["vl"].update(rows=65), r"sources.vl.rows is 65, its shards hold 64"),
    # well-formed but wrong: only the manifest's own checksum tells
    "wrong sha256": (lambda m: _vl(m).update(sha256="0" * 64), "does not match its manifest_sha256"),
    "no manifest_sha256": (lambda m: m.pop("manifest_sha256"), "does not match its manifest_sha256"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_manifest_corruptions_are_named(name, tmp_path, tmp_path_factory):
    data = H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")
    root = tmp_path / "arrow"
    shutil.copytree(data["corpus"], root)
    m = json.loads((root / "manifest.json").read_text())
    change, message = CORRUPTIONS[name]
    replaced = change(m)
    (root / "manifest.json").write_text(json.dumps(replaced if isinstance(replaced, list) else m))
    with pytest.raises(CorpusError, match=message):
        Corpus(root)


def test_a_corpus_without_vl_rows_fails_before_the_process_group(tmp_path, tmp_path_factory):
    data = H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")
    root = tmp_path / "arrow"
    shutil.copytree(data["corpus"], root)
    m = json.loads((root / "manifest.json").read_text())
    m["sources"]["vl"] = {"rows": 0, "shards": []}
    m["manifest_sha256"] = manifest_digest(m)
    (root / "manifest.json").write_text(json.dumps(m))
    run = H.write_run(tmp_path, {**data, "corpus": str(root)})
    done = subprocess.run(
        [sys.executable, "-m", "ofa_ds.cli", "pretrain", str(run)],
        env=H.env(),
        cwd=H.ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "has no VL rows" in done.stderr and "Traceback" not in done.stderr

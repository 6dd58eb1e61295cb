"""Single-byte flips in a VL shard: what does reading the corpus do? JSON out.

    python benchmarks/corruption_sweep.py --work /tmp/ofa_ds_sweep --flips 200 \
        --out benchmarks/results/corruption_sweep.json

A small sample corpus (24 VL rows of 64 px images, batches of 4 rows) is converted once. For each of `--flips`
seeded positions, drawn uniformly over the first VL shard's bytes, that byte is XOR-ed with a seeded non-zero
value, and a forked child opens the corpus and reads every VL row through `Corpus`, comparing each with the
original row (read with plain pyarrow before any flip). The flip's outcome is the worst of its rows':
- `crash`: the child died of a signal (a segfault: no message, rc 139 under a launcher);
- `unnamed_error`: an exception other than CorpusError (a traceback naming no file or row);
- `undetected_change`: a row came back different from the original without an error;
- `detected_at_open` / `detected_at_read`: a CorpusError at open, or at the read of the rows the flip touched
  (every other row read back equal);
- `no_effect`: every row equal, no error (e.g. a flip in padding bytes no reader looks at).
The requirement (issue 15): zero crashes, zero unnamed errors, zero undetected changes.

It also measures the integrity checks' cost per row on the intact corpus: a row read with its checks
(`Table[i]`: the record batch validated once per process, the row checksum) against the same read without them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import emit  # noqa: E402
from ofa_ds.data.sample_corpus import SampleConfig, write_sample_corpus  # noqa: E402
from ofa_ds.data.schema import MANIFEST  # noqa: E402
from ofa_ds.data.shards import Corpus, CorpusError  # noqa: E402
from ofa_ds.data.tsv2arrow import ConvertConfig, convert  # noqa: E402

ROW_CRC = "row_crc"  # by name: the sweep also runs against readers from before checksums (schema v1)
OUTCOMES = ("crash", "unnamed_error", "undetected_change", "detected_at_open", "detected_at_read", "no_effect")
_CODES = {name: 10 + i for i, name in enumerate(OUTCOMES)}


def build(work: Path) -> Path:
    corpus = work / "arrow"
    if not (corpus / MANIFEST).is_file():
        src = write_sample_corpus(
            SampleConfig(
                str(work / "tsv"),
                vl_rows=24,
                text_rows=4,
                image_rows=2,
                detection_rows=2,
                min_size=64,
                max_size=64,
                distinct_images=24,
            )
        )
        convert(ConvertConfig(str(src), str(corpus), rows_per_shard=24, batch_rows=4, workers=1))
    return corpus


def vl_shard(corpus: Path) -> Path:
    return corpus / json.loads((corpus / MANIFEST).read_text())["sources"]["vl"]["shards"][0]["file"]


def plain_rows(path: Path) -> list[dict]:
    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    return table.drop_columns([ROW_CRC]).to_pylist() if ROW_CRC in table.column_names else table.to_pylist()


def _child(corpus: Path, want: list[dict]) -> str:
    """The outcome of opening the corpus and reading every VL row."""
    try:
        vl = Corpus(corpus).vl
    except CorpusError:
        return "detected_at_open"
    except Exception:  # noqa: BLE001 - what the sweep counts
        return "unnamed_error"
    outcome = "no_effect"
    for i, row in enumerate(want):
        try:
            got = vl[i]
        except CorpusError:
            outcome = "detected_at_read"
            continue
        except Exception:  # noqa: BLE001
            return "unnamed_error"
        if got != row:
            return "undetected_change"
    return outcome


def run_flip(corpus: Path, shard: Path, original: bytes, position: int, xor: int, want: list[dict]) -> str:
    data = bytearray(original)
    data[position] ^= xor
    shard.write_bytes(data)
    try:
        pid = os.fork()
        if pid == 0:  # the child reports through its exit status only
            code = 1
            try:
                code = _CODES[_child(corpus, want)]
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        shard.write_bytes(original)
    if os.WIFSIGNALED(status):
        return "crash"
    code = os.WEXITSTATUS(status)
    return next((name for name, c in _CODES.items() if c == code), "unnamed_error")


def sweep(corpus: Path, flips: int, seed: int) -> dict:
    shard = vl_shard(corpus)
    original = shard.read_bytes()
    want = plain_rows(shard)
    rng = random.Random(seed)
    counts = dict.fromkeys(OUTCOMES, 0)
    bad = []
    for _ in range(flips):
        position, xor = rng.randrange(len(original)), rng.randrange(1, 256)
        outcome = run_flip(corpus, shard, original, position, xor, want)
        counts[outcome] += 1
        if outcome in ("crash", "unnamed_error", "undetected_change"):
            bad.append({"position": position, "xor": xor, "outcome": outcome})
    return {
        "shard_bytes": len(original),
        "rows": len(want),
        "flips": flips,
        "seed": seed,
        "outcomes": counts,
        "failures": bad,
    }


def check_cost(corpus: Path, repeats: int = 50) -> dict:
    """Seconds per VL row read with the integrity checks (each record batch validated on its first read, as in a
    fresh process, and every row's checksum) and without (the same row slicing and conversion alone)."""
    vl = Corpus(corpus).vl
    rows = len(vl)
    t0 = time.perf_counter()
    for _ in range(repeats):
        getattr(vl, "_valid", set()).clear()
        for i in range(rows):
            vl[i]
    checked = (time.perf_counter() - t0) / (repeats * rows)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for i in range(rows):
            reader = vl._reader(0)
            reader.get_batch(i // vl.batch_rows).slice(i % vl.batch_rows, 1).to_pylist()
    plain = (time.perf_counter() - t0) / (repeats * rows)
    return {"row_read_checked_s": checked, "row_read_unchecked_s": plain, "checks_per_row_s": checked - plain}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/ofa_ds_sweep", help="the small corpus is built here once")
    p.add_argument("--flips", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON results file")
    args = p.parse_args(argv)
    work = Path(args.work)
    corpus = build(work)
    copy = work / "flipped"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(corpus, copy)
    result = {
        "sweep": sweep(copy, args.flips, args.seed),
        "cost": check_cost(corpus),
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "machine": platform.processor() or platform.machine(),
        "command": " ".join(["python", "benchmarks/corruption_sweep.py", *sys.argv[1:]]),
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

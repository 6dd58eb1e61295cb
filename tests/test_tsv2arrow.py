"""OFA TSVs -> Arrow shards: exact round trip, quarantine of every kind of bad line, resumption."""

import argparse
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ofa_ds.data import tsv2arrow
from ofa_ds.data.sample_corpus import SampleConfig, write_sample_corpus
from ofa_ds.data.schema import MANIFEST, QUARANTINE
from ofa_ds.data.shards import Corpus
from ofa_ds.data.tsv2arrow import ConversionError, ConvertConfig, convert

ROOT = Path(__file__).resolve().parents[1]


def encoded(w, h, fmt="JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def write_tsv(path: Path, lines: list) -> None:
    """Lines are lists of columns (joined by tabs) or raw bytes."""
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else ("\t".join(line) + "\n").encode())


def all_rows(corpus: Corpus) -> dict:
    return {s: [t[i] for i in range(len(t))] for s, t in corpus.tables.items()}


# ------------------------------------------------------------------------------------------------
# exact round trip of a generated corpus


def reference_rows(src: Path) -> dict:
    """The sample corpus read by the letter of OFA_SPEC 5.1 (all its lines are well formed)."""

    def tsv(name):
        return [line.rstrip("\n").split("\t") for line in open(src / name, encoding="utf-8")]

    def image(s):
        return base64.urlsafe_b64decode(s)

    vl = []
    for uid, img, cap, q, refs, gt, ds, task in tsv("vision_language_examples.tsv"):
        pairs = [x.split("|!+") for x in refs.split("&&")] if task == "qa" else []
        vl.append(
            {
                "uniq_id": uid,
                "image": image(img),
                "caption": cap,
                "question": q,
                "answers": [{"answer": a, "conf": float(c)} for c, a in pairs],
                "box": [float(v) for v in refs.split(",")] if task == "visual_grounding" else None,
                "gt_objects": gt.split("&&") if gt else [],
                "dataset_name": ds,
                "task_type": task,
            }
        )
    det = []
    for iid, img, boxes in tsv("detection_examples.tsv"):
        parsed = [b.split(",", 5) for b in boxes.split("&&")]
        det.append(
            {
                "image_id": iid,
                "image": image(img),
                "boxes": [
                    {"x0": float(a), "y0": float(b), "x1": float(c), "y1": float(d), "category_id": e, "label": f}
                    for a, b, c, d, e, f in parsed
                ],
            }
        )
    neg = src / "negative_sample"
    return {
        "vl": vl,
        "text": [{"uniq_id": u, "text": t} for u, t in tsv("text_examples.tsv")],
        "image": [
            {"image_id": i, "image": image(im), "codes": [int(c) for c in codes.split()]}
            for i, im, codes in tsv("image_examples.tsv")
        ],
        "detection": det,
        "captions": [{"caption": x.strip()} for x in open(neg / "all_captions.txt") if x.strip()],
        "objects": [{"object": x.strip()} for x in open(neg / "object.txt") if x.strip()],
        "type2ans": [{"answer_type": k, "answers": v} for k, v in json.load(open(neg / "type2ans.json")).items()],
    }


def test_round_trip_of_every_row(tmp_path):
    src = write_sample_corpus(
        SampleConfig(
            str(tmp_path / "tsv"), vl_rows=30, text_rows=7, image_rows=5, detection_rows=6, min_size=40, max_size=64
        )
    )
    m = convert(
        ConvertConfig(str(src), str(tmp_path / "arrow"), rows_per_shard=8, batch_rows=3, workers=2, chunk_bytes=5000)
    )
    expected = reference_rows(src)
    assert all_rows(Corpus(tmp_path / "arrow")) == expected
    assert {s: v["rows"] for s, v in m["sources"].items()} == {s: len(v) for s, v in expected.items()}
    assert m["rejected"] == {"rows": 0, "by_reason": {}}
    assert [s["rows"] for s in m["sources"]["vl"]["shards"]] == [8, 8, 8, 6]
    assert m["totals"]["rows"] == sum(len(v) for v in expected.values())
    assert (tmp_path / "arrow" / QUARANTINE).read_text() == ""
    assert not (tmp_path / "arrow" / tsv2arrow.PROGRESS).exists()


# ------------------------------------------------------------------------------------------------
# quarantine: one line of every kind of defect, every good line kept


SMALL = encoded(32, 24)
CODES = " ".join(str(c) for c in [0, 8191] * 128)


def defect_corpus(src: Path):
    """(expected good rows per source, expected quarantine [(file, line, reason)])."""
    (src / "negative_sample").mkdir(parents=True)
    truncated = encoded(64, 48)[:300]
    vl_lines = [
        ["c1", b64(SMALL), "a red thing", "", "ignored", "thing&&red", "coco", "caption"],
        ["c2", b64(SMALL), "seven", "columns", "", "", "caption"],  # 2 column_count
        b"c3\t\xff\xfe\tbad utf-8\t\t\t\tcoco\tcaption\n",  # 3 utf8
        ["q1", b64(SMALL), "cap", "what colour?", "0.6|!+red&&1|!+crimson&&0.6|!+red", "", "vqa", "qa"],
        ["c4", "abc", "bad base64", "", "", "", "coco", "caption"],  # 5 base64
        ["c5", b64(b"not an image"), "garbage", "", "", "", "coco", "caption"],  # 6 image_undecodable
        ["c6", b64(truncated), "truncated jpeg", "", "", "", "coco", "caption"],  # 7 image_undecodable
        ["c7", b64(encoded(300, 300)), "too big", "", "", "", "coco", "caption"],  # 8 image_too_large
        ["g1", b64(SMALL), "the red thing", "", " 1.5,2,30.25,20 ", "thing", "refcoco", "visual_grounding"],
        ["g2", b64(SMALL), "three numbers", "", "1,2,3", "", "refcoco", "visual_grounding"],  # 10 box
        ["g3", b64(SMALL), "inverted", "", "5,5,1,1", "", "refcoco", "visual_grounding"],  # 11 box
        ["q2", b64(SMALL), "", "no separator?", "yes", "", "vqa", "qa"],  # 12 confidence
        ["q3", b64(SMALL), "", "not a number?", "high|!+yes", "", "vqa", "qa"],  # 13 confidence
        ["q4", b64(SMALL), "", "nan?", "nan|!+yes", "", "vqa", "qa"],  # 14 confidence
        ["c8", b64(SMALL), "typo", "", "", "", "coco", "captioning"],  # 15 task_type
        b"c9\t" + b64(encoded(20, 20, "PNG")).encode() + b"\tcrlf line\t\t\t \t\tcaption\r\n",
        ["q5", b64(SMALL), "", "negative?", "1|!+yes&&-5|!+no", "", "vqa", "qa"],  # 17 confidence (a loss weight)
        ["g4", b64(SMALL), "off the 32x24 image", "", "40,1,50,9", "", "refcoco", "visual_grounding"],  # 18 box
        ["c1", b64(SMALL), "the same id again", "", "", "", "coco", "caption"],  # kept, counted as a duplicate id
        ["c10", b64(SMALL), "x" * 20000, "", "", "", "coco", "caption"],  # kept, counted, read cut to 16384 chars
    ]
    write_tsv(src / "vision_language_examples.tsv", vl_lines)
    img256 = b64(encoded(256, 256, "PNG"))
    write_tsv(
        src / "image_examples.tsv",
        [
            ["i1", img256, CODES],
            ["i2", img256, " ".join(["5"] * 255)],  # 2 codes
            ["i3", img256, CODES.replace("8191", "8192", 1)],  # 3 codes
            ["i4", img256, CODES.replace("0", "x", 1)],  # 4 codes
            ["i5", b64(encoded(128, 128)), CODES],  # 5 image_size
        ],
    )
    write_tsv(
        src / "detection_examples.tsv",
        [
            ["d1", b64(SMALL), "1,2,10,12,/m/01,person&& 0,0,5.5,6,7,hot dog, with mustard "],
            ["d2", b64(SMALL), "1,2,10"],  # 2 box
            ["d3", b64(SMALL), "1,2,a,12,3,x"],  # 3 box
            ["d4", b64(SMALL), "1,2,10,12,/m/01,person&&0,30,8,40,7,below the image"],  # 4 box
        ],
    )
    write_tsv(src / "text_examples.tsv", [["t1", "text with | and && and |!+"], ["t2", "a", "b"]])
    (src / "negative_sample" / "all_captions.txt").write_text("first\n\n  second  \n")
    (src / "negative_sample" / "object.txt").write_text("cat\ndog\n")
    (src / "negative_sample" / "type2ans.json").write_text('{"how many": ["1", "2"], "other": ["a", "b"]}')
    vl_img = base64.urlsafe_b64decode(b64(SMALL))
    good = {
        "vl": [
            {
                "uniq_id": "c1",
                "image": vl_img,
                "caption": "a red thing",
                "question": "",
                "answers": [],
                "box": None,
                "gt_objects": ["thing", "red"],
                "dataset_name": "coco",
                "task_type": "caption",
            },
            {
                "uniq_id": "q1",
                "image": vl_img,
                "caption": "cap",
                "question": "what colour?",
                "answers": [
                    {"answer": "red", "conf": 0.6},
                    {"answer": "crimson", "conf": 1.0},
                    {"answer": "red", "conf": 0.6},
                ],
                "box": None,
                "gt_objects": [],
                "dataset_name": "vqa",
                "task_type": "qa",
            },
            {
                "uniq_id": "g1",
                "image": vl_img,
                "caption": "the red thing",
                "question": "",
                "answers": [],
                "box": [1.5, 2.0, 30.25, 20.0],
                "gt_objects": ["thing"],
                "dataset_name": "refcoco",
                "task_type": "visual_grounding",
            },
            {
                "uniq_id": "c9",
                "image": encoded(20, 20, "PNG"),
                "caption": "crlf line",
                "question": "",
                "answers": [],
                "box": None,
                "gt_objects": [],
                "dataset_name": "",
                "task_type": "caption",
            },
            {
                "uniq_id": "c1",
                "image": vl_img,
                "caption": "the same id again",
                "question": "",
                "answers": [],
                "box": None,
                "gt_objects": [],
                "dataset_name": "coco",
                "task_type": "caption",
            },
            {
                "uniq_id": "c10",
                "image": vl_img,
                "caption": "x" * 16384,
                "question": "",
                "answers": [],
                "box": None,
                "gt_objects": [],
                "dataset_name": "coco",
                "task_type": "caption",
            },
        ],
        "text": [{"uniq_id": "t1", "text": "text with | and && and |!+"}],
        "image": [{"image_id": "i1", "image": encoded(256, 256, "PNG"), "codes": [0, 8191] * 128}],
        "detection": [
            {
                "image_id": "d1",
                "image": vl_img,
                "boxes": [
                    {"x0": 1.0, "y0": 2.0, "x1": 10.0, "y1": 12.0, "category_id": "/m/01", "label": "person"},
                    {"x0": 0.0, "y0": 0.0, "x1": 5.5, "y1": 6.0, "category_id": "7", "label": "hot dog, with mustard"},
                ],
            }
        ],
        "captions": [{"caption": "first"}, {"caption": "second"}],
        "objects": [{"object": "cat"}, {"object": "dog"}],
        "type2ans": [
            {"answer_type": "how many", "answers": ["1", "2"]},
            {"answer_type": "other", "answers": ["a", "b"]},
        ],
    }
    vl, im, det, txt = (
        "vision_language_examples.tsv",
        "image_examples.tsv",
        "detection_examples.tsv",
        "text_examples.tsv",
    )
    rejected = [
        (vl, 2, "column_count"),
        (vl, 3, "utf8"),
        (vl, 5, "base64"),
        (vl, 6, "image_undecodable"),
        (vl, 7, "image_undecodable"),
        (vl, 8, "image_too_large"),
        (vl, 10, "box"),
        (vl, 11, "box"),
        (vl, 12, "confidence"),
        (vl, 13, "confidence"),
        (vl, 14, "confidence"),
        (vl, 15, "task_type"),
        (vl, 17, "confidence"),
        (vl, 18, "box"),
        (txt, 2, "column_count"),
        (im, 2, "codes"),
        (im, 3, "codes"),
        (im, 4, "codes"),
        (im, 5, "image_size"),
        (det, 2, "box"),
        (det, 3, "box"),
        (det, 4, "box"),
    ]
    return good, rejected


def test_quarantine_holds_each_bad_line_and_every_good_row_is_kept(tmp_path, capsys):
    good, rejected = defect_corpus(tmp_path / "tsv")
    args = [str(tmp_path / "tsv"), str(tmp_path / "arrow"), "--max-pixels", "70000", "--workers", "2"]
    parser = argparse.ArgumentParser()
    tsv2arrow.add_arguments(parser)
    assert tsv2arrow.run(parser.parse_args(args)) == 0
    assert all_rows(Corpus(tmp_path / "arrow")) == good
    lines = [json.loads(x) for x in (tmp_path / "arrow" / QUARANTINE).read_text().splitlines()]
    assert [(Path(q["file"]).name, q["line"], q["reason"]) for q in lines] == rejected
    assert all(q["detail"] and q["raw"] for q in lines)
    assert lines[0]["raw"].startswith("c2\t") and len(lines[5]["raw"]) == 300  # raw line, truncated
    assert "lies entirely outside its 32x24 image" in lines[-1]["detail"]
    assert "-5" in lines[12]["detail"] and ">= 0" in lines[12]["detail"]
    m = json.loads((tmp_path / "arrow" / MANIFEST).read_text())
    assert m["rejected"] == {
        "rows": 22,
        "by_reason": {
            "base64": 1,
            "box": 6,
            "codes": 3,
            "column_count": 2,
            "confidence": 4,
            "image_size": 1,
            "image_too_large": 1,
            "image_undecodable": 2,
            "task_type": 1,
            "utf8": 1,
        },
    }
    assert m["duplicate_ids"] == {"vl": 1, "text": 0, "image": 0, "detection": 0}
    assert m["oversized_text"] == {"vl": 1, "text": 0}
    out = capsys.readouterr().out
    assert "rejected: 22 rows" in out and "    box: 6\n" in out and "    confidence: 4\n" in out


def test_bad_type2ans_and_existing_manifest_are_clear_errors(tmp_path):
    src = write_sample_corpus(SampleConfig(str(tmp_path / "tsv"), 2, 1, 1, 1, min_size=32, max_size=32))
    convert(ConvertConfig(str(src), str(tmp_path / "arrow"), workers=1))
    with pytest.raises(ConversionError, match="manifest.json exists"):
        convert(ConvertConfig(str(src), str(tmp_path / "arrow"), workers=1))
    (src / "negative_sample" / "type2ans.json").write_text('{"color": ["red"]}')
    with pytest.raises(ConversionError, match="type2ans.json: expected a JSON object .* 'other'"):
        convert(ConvertConfig(str(src), str(tmp_path / "arrow2"), workers=1))
    with pytest.raises(ConversionError, match="nowhere: no such directory"):
        convert(ConvertConfig(str(tmp_path / "nowhere"), str(tmp_path / "arrow3"), workers=1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="none of the input files"):
        convert(ConvertConfig(str(tmp_path / "empty"), str(tmp_path / "arrow4"), workers=1))


# ------------------------------------------------------------------------------------------------
# resumption


def mixed_corpus(src: Path) -> Path:
    """A generated corpus with bad lines spread through the VL file."""
    write_sample_corpus(
        SampleConfig(str(src), vl_rows=40, text_rows=9, image_rows=5, detection_rows=5, min_size=32, max_size=48)
    )
    path = src / "vision_language_examples.tsv"
    lines = path.read_bytes().splitlines(keepends=True)
    for k in (0, 7, 8, 30, len(lines)):
        lines.insert(k, f"bad-{k}\tonly two columns\n".encode())
    path.write_bytes(b"".join(lines))
    return src


def outputs(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stops", [[1], [4], [9], [2, 2]])
def test_interrupted_then_resumed_equals_one_conversion(tmp_path, monkeypatch, stops):
    """Each stop interrupts a run at its n-th progress record, cutting that log line short."""
    src = mixed_corpus(tmp_path / "tsv")
    convert(ConvertConfig(str(src), str(tmp_path / "once"), rows_per_shard=6, batch_rows=4, workers=2))
    cfg = ConvertConfig(
        str(src), str(tmp_path / "resumed"), rows_per_shard=6, batch_rows=4, workers=2, chunk_bytes=3000
    )  # other chunking: the output must not depend on it
    real_append = tsv2arrow._append_progress
    for stop in stops:
        calls = []

        def crash_while_recording(out, line):  # the shard is already renamed into place
            calls.append(line)
            real_append(out, line if len(calls) < stop else line[: len(line) // 2])
            if len(calls) == stop:
                raise KeyboardInterrupt

        monkeypatch.setattr(tsv2arrow, "_append_progress", crash_while_recording)
        with pytest.raises(KeyboardInterrupt):
            convert(cfg)
        assert not (tmp_path / "resumed" / MANIFEST).exists()
    monkeypatch.setattr(tsv2arrow, "_append_progress", real_append)
    convert(cfg)
    assert outputs(tmp_path / "resumed") == outputs(tmp_path / "once")  # shards, quarantine, manifest


def test_resume_refuses_other_settings(tmp_path, monkeypatch):
    src = mixed_corpus(tmp_path / "tsv")
    monkeypatch.setattr(tsv2arrow, "_append_progress", lambda out, line: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        convert(ConvertConfig(str(src), str(tmp_path / "out"), rows_per_shard=6, workers=1))
    with pytest.raises(ConversionError, match="interrupted conversion with other settings"):
        convert(ConvertConfig(str(src), str(tmp_path / "out"), rows_per_shard=7, workers=1))


@pytest.mark.slow
def test_killed_process_resumes(tmp_path):
    """SIGKILL a real conversion once shards exist; the resumed output equals a single conversion."""
    src = write_sample_corpus(
        SampleConfig(
            str(tmp_path / "tsv"),
            vl_rows=3000,
            text_rows=500,
            image_rows=50,
            detection_rows=50,
            min_size=24,
            max_size=32,
            distinct_images=32,
        )
    )
    args = [
        sys.executable,
        str(ROOT / "data_tools" / "tsv2arrow.py"),
        str(src),
        str(tmp_path / "killed"),
        "--rows-per-shard",
        "40",
        "--batch-rows",
        "16",
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "killed" / tsv2arrow.PROGRESS
    deadline = time.time() + 60
    while time.time() < deadline and (not log.exists() or log.read_text().count('"shard"') < 3):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / MANIFEST).exists(), "finished before it could be killed"
    assert subprocess.run(args, capture_output=True).returncode == 0
    subprocess.run([*args[:3], str(tmp_path / "once"), *args[4:]], check=True, capture_output=True)
    assert outputs(tmp_path / "killed") == outputs(tmp_path / "once")

"""`bash benchmarks/gpu_check.sh` without a GPU: its CPU parts pass, its GPU parts are reported skipped, and its JSON
has the schema a GPU run writes. Also the driver's own promise: a part that fails, crashes or hangs is recorded and
the next part still runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_PARTS = ["env", "attention_check", "engine"]
GPU_PARTS = ["resnet_extension", "gpu_tests", "attention_bench", "resnet_bench", "engine_large"]
ORDER = [
    "env",
    "resnet_extension",
    "attention_check",
    "engine",
    "gpu_tests",
    "attention_bench",
    "resnet_bench",
    "engine_large",
]
TOP = {
    "schema": str,
    "started": str,
    "seconds": float,
    "budget_s": float,
    "cuda": bool,
    "device": str,
    "torch": str,
    "host": str,
    "out_dir": str,
    "parts": dict,
    "summary": dict,
    "notes": list,
}
PART = {"status": str, "gpu_only": bool, "seconds": float, "limit_s": float, "figures": dict}
STATUSES = {"ok", "failed", "skipped"}


def check_schema(report: dict) -> None:
    """What any run's JSON holds, GPU or not."""
    for key, kind in TOP.items():
        assert isinstance(report[key], kind), (key, report.get(key))
    assert report["schema"] == "ofa-ds gpu_check 1"
    assert list(report["parts"]) == ORDER
    for name, part in report["parts"].items():
        for key, kind in PART.items():
            assert isinstance(part[key], kind), (name, key, part.get(key))
        assert part["status"] in STATUSES, (name, part["status"])
        if part["status"] == "skipped":
            assert isinstance(part["reason"], str) and part["reason"], name
        if part["status"] == "failed":
            assert isinstance(part["error"], str) and part["error"], name
        assert part["gpu_only"] == (name in GPU_PARTS), name
    assert set(report["summary"]) == STATUSES
    assert sorted(n for s in STATUSES for n in report["summary"][s]) == sorted(ORDER)
    for status in STATUSES:
        assert all(report["parts"][n]["status"] == status for n in report["summary"][status])


@pytest.mark.slow
def test_gpu_check_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU path, also on a machine with a GPU
    start = time.monotonic()
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_check.sh"), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert str(out / "gpu_check.json") in done.stdout and "versions:" in done.stdout  # the environment is printed
    report = json.loads((out / "gpu_check.json").read_text())
    check_schema(report)
    assert report["cuda"] is False and report["device"] == "cpu" and report["seconds"] <= seconds
    parts = report["parts"]
    for name in GPU_PARTS:
        assert parts[name]["status"] == "skipped" and "needs CUDA" in parts[name]["reason"], (name, parts[name])
    for name in CPU_PARTS:
        assert parts[name]["status"] == "ok", (name, parts[name])
        for log in parts[name]["logs"]:
            assert (out / log).is_file()

    env_fig = parts["env"]["figures"]
    assert {"versions", "accelerator", "backend", "extensions", "gpu"} <= set(env_fig)
    assert env_fig["versions"]["torch"] and "flash_attn" in env_fig["gpu"]

    att = parts["attention_check"]["figures"]
    assert att["device"] == "cpu" and att["interpreter"] is True and len(att["cases"]) == 9
    # every dtype x head dim pair once, and every attention kind (padded encoder, causal decoders)
    assert {(c["dtype"], c["head_dim"]) for c in att["cases"]} == {
        (f"torch.{t}", d) for t in ("float32", "float16", "bfloat16") for d in (64, 80, 128)
    }
    assert {c["kind"] for c in att["cases"]} == {"encoder", "decoder_text", "decoder_code"}
    for case in att["cases"]:
        assert set(case["rel_err"]) == {"out", "dq", "dk", "dv", "d_text_table", "d_image_table"}
        assert case["within_bound"] and max(case["rel_err"].values()) <= case["bound"]
    assert att["flex_score_mod"]["status"] == "ok"

    eng = parts["engine"]["figures"]
    assert set(eng["runs"]) == {"triton", "sdpa"}
    for backend, run in eng["runs"].items():
        assert run["attn_backend"] == backend and run["kernels"]["attention"] == backend
        assert run["precision"] == "fp32" and len(run["losses"]) == run["updates"] == 3
        assert run["tokens_per_s"]["source"] > 0 and run["peak_memory_gib"] > 0 and run["mfu"]["measured_gemm"] > 0
    check = eng["loss_check"]
    assert check["within"] and check["max_abs_diff"] <= 1e-4
    assert check["sdpa_first_last"][1] < check["sdpa_first_last"][0]  # the repeated batch is being learned


STAND_IN = """
import json, sys, time
name, result = sys.argv[sys.argv.index("--part") + 1], sys.argv[sys.argv.index("--result") + 1]
if name == "crashes":
    sys.exit(3)
if name == "hangs":
    print('{"row": 1}', flush=True)
    time.sleep(60)
with open(result, "w") as f:
    json.dump({"status": "ok", "figures": {"summary": "fine"}}, f)
"""


@pytest.mark.slow
def test_a_crashing_or_hanging_part_does_not_stop_the_rest(tmp_path, monkeypatch, capsys):
    """The driver on stand-in parts (a script in place of gpu_check.py's part runner): one exits without a result,
    one hangs past its limit (killed, its printed rows kept), and the parts after them still run."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_check

    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    monkeypatch.setattr(gpu_check, "__file__", str(script))
    monkeypatch.setattr(
        gpu_check,
        "PARTS",
        [gpu_check.Part(name, None, False, limit) for name, limit in (("crashes", 30), ("hangs", 3), ("passes", 30))],
    )
    start = time.monotonic()
    assert gpu_check.main([str(tmp_path / "out"), "--budget", "100"]) == 1
    assert time.monotonic() - start < 30
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    parts = report["parts"]
    assert list(parts) == ["crashes", "hangs", "passes"]
    assert parts["crashes"]["status"] == "failed" and "exited 3 without a result" in parts["crashes"]["error"]
    assert parts["hangs"]["status"] == "failed" and "timed out after 3 s" in parts["hangs"]["error"]
    assert parts["hangs"]["figures"]["partial_rows"] == [{"row": 1}]
    assert parts["passes"]["status"] == "ok" and parts["passes"]["figures"] == {"summary": "fine"}
    assert report["summary"] == {"ok": ["passes"], "failed": ["crashes", "hangs"], "skipped": []}
    assert "[3/3] passes" in capsys.readouterr().out

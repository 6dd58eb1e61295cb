"""Every `ofa-ds` subcommand turns a user's bad input into one line naming it and a non-zero exit, never a
traceback."""

import subprocess
import sys

import pretrain_harness as H
import pytest

CASES = {
    "convert": (["convert", "/nonexistent/ofa.pt", "out.safetensors"], "/nonexistent/ofa.pt"),
    "tsv2arrow": (["tsv2arrow", "/nonexistent/tsv", "out"], "/nonexistent/tsv: no such directory"),
    "make-sample-corpus": (["make-sample-corpus", "/proc/no/such/dir"], "/proc/no: No such file or directory"),
    "train-tokenizer": (
        ["train-tokenizer", "tok", "--corpus", "/nonexistent/arrow", "--vocab-size", "300"],
        "/nonexistent/arrow/manifest.json: missing",
    ),
    "pretrain": (["pretrain", "/nonexistent/run.yaml"], "/nonexistent/run.yaml: cannot be read"),
    "export": (["export", "/nonexistent/run", "out.safetensors"], "/nonexistent/run: no checkpoint"),
    "to-universal": (["to-universal", "/nonexistent/run"], "/nonexistent/run: no checkpoint"),
    "bench": (["bench", "/nonexistent/run.yaml"], "/nonexistent/run.yaml: cannot be read"),
    "plan": (
        ["plan", "ofa_nano", "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gb", "80", "--global-batch", "8"],
        "ofa_nano: neither a preset",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line(name, tmp_path):
    args, names = CASES[name]
    env = {k: v for k, v in H.env().items() if k != "DS_ACCELERATOR"}  # as a user's shell: DeepSpeed not told
    done = subprocess.run(
        [sys.executable, "-m", "ofa_ds.cli", *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
    assert done.returncode == 2, done.stderr  # a user error, as argparse's
    lines = [line for line in done.stderr.splitlines() if line.strip()]  # third-party warnings included
    assert len(lines) == 1 and names in lines[0], done.stderr


def test_too_large_a_vocabulary_says_the_limit(tmp_path, tmp_path_factory):
    data = H.tiny_data(tmp_path_factory.getbasetemp() / "tiny_data")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ofa_ds.cli",
            "train-tokenizer",
            str(tmp_path / "tok"),
            "--corpus",
            data["corpus"],
            "--vocab-size",
            "32000",
        ],
        env=H.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "Vocabulary size too high (32000). Please set it to a value <=" in done.stderr


def test_version():
    from ofa_ds import __version__

    done = subprocess.run([sys.executable, "-m", "ofa_ds.cli", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"ofa-ds {__version__}"


@pytest.mark.parametrize("script", ["single_node.sh", "multi_node.sh"])
def test_launch_scripts_without_arguments_print_their_usage(script):
    done = subprocess.run(["bash", str(H.ROOT / "launch" / script)], capture_output=True, text=True)
    assert done.returncode == 2 and f"launch/{script} " in done.stderr
    assert not any(line.startswith(("#", "set ")) for line in done.stderr.splitlines()), done.stderr


def test_every_option_of_every_subcommand_says_what_it_does():
    import argparse

    from ofa_ds.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bare = [
        (name, a.option_strings or a.dest)
        for name, p in sub.choices.items()
        for a in p._actions
        if a.help != argparse.SUPPRESS and not (a.help or "").strip()
    ]
    assert bare == [], f"options without help text: {bare}"

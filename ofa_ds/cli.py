"""`ofa-ds` command line: one subcommand per job, each implemented in its own module.

Every module named here provides `add_arguments(parser)` and `run(args) -> int | None`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("ofa_ds.model.convert_cli", "convert an OFA fairseq checkpoint to ofa_ds / safetensors and back"),
    "tsv2arrow": ("ofa_ds.data.tsv2arrow", "convert OFA pretraining TSVs into memory-mapped Arrow shards + manifest"),
    "make-sample-corpus": ("ofa_ds.data.sample_corpus", "write a small synthetic corpus in OFA's TSV layout"),
    "train-tokenizer": (
        "ofa_ds.data.train_tokenizer",
        "train a sentencepiece tokenizer (OFA's vocab layout) on corpus text",
    ),
    "pretrain": (
        "ofa_ds.train.pretrain",
        "pretrain OFA with DeepSpeed (run under deepspeed/torchrun, or alone for one process)",
    ),
    "export": (
        "ofa_ds.train.export",
        "export a (ZeRO) checkpoint to consolidated safetensors and/or an OFA checkpoint",
    ),
    "plot": ("ofa_ds.train.plot", "PNGs of runs' losses, lr, throughput and MFU from their metrics.jsonl"),
    "to-universal": (
        "ofa_ds.train.universal",
        "write a checkpoint's layout-free form, to resume it at another parallel layout",
    ),
    "bench": ("ofa_ds.train.bench", "throughput of the real training step of a run config (run under deepspeed)"),
    "plan": ("ofa_ds.plan.planner", "the parallel layouts that fit a model on a cluster, with memory and step time"),
    "env": ("ofa_ds.train.env", "report versions, accelerator, distributed backend and compiled extensions"),
}


def build_parser() -> argparse.ArgumentParser:
    from ofa_ds import __version__

    parser = argparse.ArgumentParser(
        prog="ofa-ds",
        description="OFA pretraining on DeepSpeed: convert data, "
        "pretrain, benchmark, plan a cluster, export. `ofa-ds COMMAND -h` for each.",
    )
    parser.add_argument("--version", action="version", version=f"ofa-ds {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        # what DeepSpeed would pick, without its "Setting accelerator to CPU" warning on every command
        os.environ["DS_ACCELERATOR"] = "cpu"
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args) or 0
    except user_errors() as e:  # bad input: one line, no traceback
        print(f"ofa-ds {args.command}: {_one_line(e)}", file=sys.stderr)
        return 2


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user's input raises (configs, checkpoints, corpora, paths), as opposed to a bug."""
    from ofa_ds.config import ConfigError
    from ofa_ds.data.shards import CorpusError
    from ofa_ds.model.convert import CheckpointError

    return (
        ConfigError,
        CheckpointError,
        CorpusError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    )


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror}"
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())

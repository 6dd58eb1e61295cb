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
    "train-tokenizer": ("data_tools.train_tokenizer", "train a sentencepiece tokenizer (OFA's vocab layout) on corpus text"),
    "pretrain": ("ofa_ds.train.pretrain", "pretrain OFA with DeepSpeed (run under deepspeed/torchrun, or alone for one process)"),
    "export": ("ofa_ds.train.export", "export a (ZeRO) checkpoint to consolidated safetensors and/or an OFA checkpoint"),
    "to-universal": ("ofa_ds.train.universal", "write a checkpoint's layout-free form, to resume it at another parallel layout"),
    "bench": ("benchmarks.throughput", "throughput of the real training step of a run config (run under deepspeed)"),
    "plan": ("ofa_ds.plan.planner", "the parallel layouts that fit a model on a cluster, with memory and step time"),
    "env": ("ofa_ds.train.env", "report versions, accelerator, distributed backend and compiled extensions"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ofa-ds", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    args = parser.parse_args(argv)
    return importlib.import_module(args._module).run(args) or 0


if __name__ == "__main__":
    sys.exit(main())

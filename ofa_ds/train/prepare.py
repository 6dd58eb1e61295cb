"""What `ofa-ds pretrain` (and `ofa-ds bench`) check and resolve before any process group starts: the command line,
the run config with its overrides, the DeepSpeed JSON against the batch geometry and the world size, the corpora and
the tokenizer against the model, and a checkpoint to resume against all of them. Bad input fails here, on every rank
alike, as one ConfigError line."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ofa_ds.config import ConfigError, ModelConfig, RunConfig, load_dict, parse_yaml


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="run config (YAML or JSON), e.g. configs/pretrain/quickstart.yaml")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="override a run-config key (dotted, value in YAML), e.g. train.steps=100, "
        "model_overrides.dropout=0.0; repeatable",
    )
    p.add_argument("--out-dir", help="same as --set out_dir=...")
    p.add_argument(
        "--init-from", help="OFA checkpoint (.pt) or ofa_ds export (.safetensors); same as --set init_from=..."
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="",
        metavar="CHECKPOINT",
        help="continue from CHECKPOINT (a run directory, its checkpoints/ or one step_* directory); "
        "without a value, from OUT_DIR if it has a checkpoint, else start fresh",
    )
    p.add_argument(
        "--change-geometry",
        action="store_true",
        help="with --resume: accept a changed " + ", ".join(GEOMETRY) + ". The lr schedule is re-drawn "
        "over the new train.steps from the current step; a new batch size changes the rows per update "
        "from the next update on (the rows already consumed stay consumed); a new data.seed reshuffles "
        "the rows, so rows already seen may come again and unseen ones be skipped",
    )
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by `deepspeed` without --no_local_rank


# Run-config keys that fix the schedule and the order of the data: a resume that changes them is refused unless
# --change-geometry accepts the change.
GEOMETRY = ("train.steps", "train.global_batch", "train.micro_batch", "data.seed")


def load_run_config(path: Path, overrides: list[str]) -> RunConfig:
    d = load_dict(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        node = d
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {k} is not a section")
        node[leaf] = parse_yaml(value, f"--set {key}")
    return RunConfig.from_dict(d)


# ---------------------------------------------------------------------------------------------------- checks


@dataclass
class Plan:
    """Everything decided before the process group starts."""

    run: RunConfig
    model: ModelConfig
    ds: dict
    out_dir: Path
    corpus: object
    val_corpus: object | None
    tokenizer: object
    resume: Path | None  # tag directory
    relayout: bool = False  # resume from its universal form (another layout or world size)


def prepare(args, data: bool = True) -> Plan:
    """The run's plan, checked; without `data` (the benchmark's synthetic batches) no corpus or tokenizer."""
    from ofa_ds.data.shards import Corpus, CorpusError
    from ofa_ds.data.tokenizer import load_tokenizer
    from ofa_ds.model.convert import CheckpointError
    from ofa_ds.train import checkpoint, safe_load, universal
    from ofa_ds.train.ds_json import check_accelerator, ds_config, load_ds_config, zero_stage
    from ofa_ds.train.engine import world_size

    overrides = list(args.overrides)
    overrides += [f"out_dir={args.out_dir}"] if args.out_dir else []
    overrides += [f"init_from={args.init_from}"] if args.init_from else []
    run = load_run_config(args.config, overrides)
    for key in ("deepspeed", "corpus", "val_corpus", "init_from"):
        path = getattr(run, key)
        if path and (data or key in ("deepspeed", "init_from")) and not Path(path).exists():
            relative = not Path(path).is_absolute()
            where = f" (relative paths resolve from the working directory, {Path.cwd()})" if relative else ""
            raise ConfigError(f"{key}: {path} does not exist{where}")
    model = run.model_config()
    ws = world_size()
    ds = load_ds_config(run.deepspeed)
    run.parallel.check(model, ws, zero_stage(ds))
    ds = ds_config(ds, run.train, run.parallel.data_parallel(ws), run.deepspeed, run.parallel.pipeline)
    check_accelerator(ds, run.deepspeed)
    corpora = []
    for key in ("corpus", "val_corpus"):
        path = getattr(run, key) if data else None
        try:
            corpora.append(None if path is None else Corpus(path))
        except CorpusError as e:
            raise ConfigError(f"{key}: {e}") from None
        if corpora[-1] is not None and len(corpora[-1].vl) == 0:
            raise ConfigError(f"{key}: {path} has no VL rows; every batch is drawn from them")
    tokenizer = None
    if data:
        tokenizer = load_tokenizer(
            run.data.tokenizer, num_codes=run.data.num_codes, num_bins=run.data.num_bins, vocab_size=model.vocab_size
        )
    if run.init_from and not Path(run.init_from).is_file():
        raise ConfigError(f"init_from: {run.init_from} is not a file")

    out_dir = Path(run.out_dir)
    resume, relayout = None, False
    if args.resume is not None:
        if args.resume or checkpoint.complete_tags(out_dir / "checkpoints"):
            resume = checkpoint.find(args.resume or out_dir)
            try:
                safe_load.check(resume)  # on every rank, before anything is loaded
            except CheckpointError as e:
                raise ConfigError(str(e)) from None
            diffs, relayout = checkpoint.check_resumable(
                checkpoint.read_meta(resume),
                run.to_dict(),
                model.to_dict(),
                ws,
                resume,
                run.parallel.describe(ws),
                universal.exists(resume),
            )
            geometry = [d for d in diffs if d.split(":")[0] in GEOMETRY]
            if geometry and not args.change_geometry:
                raise ConfigError(
                    f"{resume} was written with another schedule or data order (checkpoint -> this run):"
                    "\n  " + "\n  ".join(geometry) + "\nresume with the checkpoint's values, or pass "
                    "--change-geometry to continue with the new ones (see --help)"
                )
            if diffs and int(os.environ.get("RANK", "0")) == 0:
                print(f"resuming {resume} with a changed run config:\n  " + "\n  ".join(diffs), file=sys.stderr)
    elif checkpoint.complete_tags(out_dir / "checkpoints"):
        raise ConfigError(f"out_dir {out_dir} already has checkpoints: pass --resume to continue, or another out_dir")
    return Plan(run, model, ds, out_dir, corpora[0], corpora[1], tokenizer, resume, relayout)

"""Resumable checkpoints in DeepSpeed's format, written so that a crash never leaves a broken `latest`.

    OUT/checkpoints/step_00000400/   DeepSpeed's files (model states, ZeRO shards with the optimizer and fp32
                                     master weights, lr scheduler), rng_rank00000.pt ... (one per rank),
                                     and meta.json, written last: a tag directory without it is incomplete
    OUT/checkpoints/latest           the newest complete tag; replaced atomically after meta.json

meta.json is also the client state handed to DeepSpeed: step, consumed samples (the sampler position), world
size, the run configuration and its hashes. It is read before any process group starts, so a checkpoint
from a different model or world size is refused at once. Only rank 0 touches `latest` and prunes; every
path is on a filesystem shared by all nodes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ofa_ds.config import ConfigError

LATEST = "latest"
META = "meta.json"
PREFIX = "step_"


def tag_of(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def config_hash(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """This process's RNG states as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python": list(random.getstate()[1]),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
    }


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    random.setstate((3, tuple(s["python"]), None))
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def _rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / f"rng_rank{rank:05d}.pt"


# ---------------------------------------------------------------------------------------------------- files


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def complete_tags(ckpt_dir: Path) -> list[Path]:
    """Complete tag directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.glob(PREFIX + "*") if (p / META).is_file())


def read_meta(tag_dir: Path) -> dict:
    return json.loads((tag_dir / META).read_text())


def find(path: str | Path) -> Path:
    """The tag directory to resume from: `path` is a run directory, its checkpoints/ or one tag directory."""
    path = Path(path)
    for d in (path, path / "checkpoints"):
        if (d / LATEST).is_file():
            tag_dir = d / (d / LATEST).read_text().strip()
            break
    else:
        tag_dir = path
    if not (tag_dir / META).is_file():
        if tag_dir.is_dir() and tag_dir.name.startswith(PREFIX):
            raise ConfigError(f"{tag_dir}: incomplete checkpoint (no {META}; the save was interrupted)")
        raise ConfigError(
            f"{path}: no checkpoint (expected a run directory, its checkpoints/ or a {PREFIX}* directory)"
        )
    return tag_dir


def check_resumable(
    meta: dict, run: dict, model: dict, world_size: int, where: Path, layout: str, universal: bool
) -> tuple[list[str], bool]:
    """Refuse a checkpoint of another model, or of another world size or parallel layout that has no universal
    form (ofa-ds to-universal); return the other run-config differences and whether to resume from the universal
    form."""
    diffs = config_diffs(meta["model"], model)
    if diffs:
        raise ConfigError(
            f"{where} was trained with a different model config (checkpoint -> this run):\n  " + "\n  ".join(diffs)
        )
    written = meta.get("parallel", f"TP 1 x PP 1 x DP {meta['world_size']}")
    relayout = meta["world_size"] != world_size or written != layout
    if relayout and not universal:
        raise ConfigError(
            f"{where} was written at layout {written} ({meta['world_size']} ranks), this run is "
            f"{layout} ({world_size} ranks); its shards are split for that layout: run `ofa-ds "
            f"to-universal {where}` once, then resume (weights and optimizer states carried)"
        )
    return config_diffs(meta["config"], run), relayout


def config_diffs(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diffs(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


# ---------------------------------------------------------------------------------------------------- save / load


def save(engine, ckpt_dir: Path, meta: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the tag directory, complete once this returns."""
    rank = dist.get_rank()
    tag = tag_of(meta["step"])
    tag_dir = ckpt_dir / tag
    if rank == 0 and tag_dir.exists():  # left over from a save that crashed; `latest` never points to it
        shutil.rmtree(tag_dir)
    dist.barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"ofa_ds": meta}, save_latest=False)
    torch.save(rng_state(), _rng_file(tag_dir, rank))
    dist.barrier()
    if rank == 0:
        for f in tag_dir.iterdir():
            _fsync(f)
        _write_atomic(tag_dir / META, json.dumps(meta, indent=1))
        _write_atomic(ckpt_dir / LATEST, tag)
        prune(ckpt_dir, keep_last)
    dist.barrier()
    return tag_dir


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Delete complete checkpoints beyond the newest `keep_last`, and incomplete ones older than `latest`."""
    latest = (ckpt_dir / LATEST).read_text().strip()
    complete = complete_tags(ckpt_dir)
    for p in complete[:-keep_last]:
        if p.name != latest:
            shutil.rmtree(p)
    for p in ckpt_dir.glob(PREFIX + "*"):
        if p.is_dir() and not (p / META).is_file() and p.name < latest:
            shutil.rmtree(p)


def load(engine, tag_dir: Path) -> dict:
    """Collective: load DeepSpeed state and this rank's RNG; returns the saved meta (client state)."""
    path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    if path is None:
        raise ConfigError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    from ofa_ds.train import safe_load

    set_rng_state(safe_load.load(_rng_file(tag_dir, dist.get_rank())))
    return client["ofa_ds"]


__all__ = [
    "tag_of",
    "config_hash",
    "rng_state",
    "set_rng_state",
    "complete_tags",
    "read_meta",
    "find",
    "check_resumable",
    "config_diffs",
    "save",
    "prune",
    "load",
]

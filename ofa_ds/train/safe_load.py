"""Checkpoint files are read without running code from them.

DeepSpeed reads its checkpoints with `torch.load(weights_only=False)`: a pickle placed in any of a run's `.pt` files
would run on `--resume` and on `ofa-ds export`. Here every such read is `torch.load(weights_only=True)` with an
allowlist of the few non-tensor types DeepSpeed pickles into its files:

- `check(tag_dir)`: before anything loads (before the process group starts on --resume), every `.pt` file of a
  checkpoint directory is inspected (its pickle only, not its tensors) and one naming anything else is refused;
- `SafeCheckpointEngine`: DeepSpeed's pluggable checkpoint engine, whose loads are the safe load;
- `safe_torch_load()`: DeepSpeed's zero_to_fp32 (export) calls torch.load itself; within this block it gets the safe
  load.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import zipfile
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from ofa_ds.model.convert import CheckpointError

_TORCH_LOAD = torch.load  # the real one, also while safe_torch_load() has replaced torch.load


def allowed() -> list[type]:
    """The types DeepSpeed 0.19.8 pickles into checkpoints besides tensors and plain containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _names() -> set[str]:
    return {f"{t.__module__}.{t.__qualname__}" for t in allowed()}


def load(path, map_location=None, **kwargs):
    """torch.load(weights_only=True) with DeepSpeed's types allowed; a file that would import anything else, or that
    is not a readable torch file, is a CheckpointError naming it."""
    _zip_or_refuse(path)
    try:
        with torch.serialization.safe_globals(allowed()):
            return _TORCH_LOAD(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global|Unsupported operand|Trying to call reduce).*?(?=\.|$)", str(e), re.M)
        what = found.group(0) if found else str(e).splitlines()[0]
        raise CheckpointError(
            f"{path}: refused: it asks to import or call what a checkpoint never holds ({what}); nothing in it was run"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint file ({str(e).splitlines()[0]})") from None


def _zip_or_refuse(path) -> None:
    """torch.save's format since torch 1.6 (what DeepSpeed writes); anything else would be read as a bare pickle."""
    if not isinstance(path, (str, Path)):
        return  # an open file: torch.load decides
    try:
        ok = zipfile.is_zipfile(path)
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable checkpoint file ({e.strerror})") from None
    if not ok:
        raise CheckpointError(
            f"{path}: not a readable checkpoint file (not torch.save's zip format: truncated, "
            f"overwritten or not a checkpoint)"
        )


def check(tag_dir: Path) -> None:
    """Refuse a checkpoint directory any of whose .pt files names a global outside the allowlist."""
    ok = _names()
    for path in sorted(Path(tag_dir).glob("*.pt")):
        _zip_or_refuse(path)
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception as e:  # noqa: BLE001 - any failure to read the pickle is a refusal naming the file
            raise CheckpointError(f"{path}: not a readable checkpoint file ({str(e).splitlines()[0]})") from None
        bad = sorted(set(names) - ok)
        if bad:
            raise CheckpointError(
                f"{path}: refused: it names {', '.join(bad)}, which loading it would import and "
                f"may run; a checkpoint holds tensors and DeepSpeed's own plain types"
            )


class SafeCheckpointEngine(TorchCheckpointEngine):
    def load(self, path: str, map_location=None):
        return load(path, map_location=map_location)


@contextlib.contextmanager
def safe_torch_load():
    """Within the block, torch.load is `load` (whatever weights_only its caller asks for)."""
    original = torch.load

    def patched(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
        return load(f, map_location=map_location, **kwargs)

    torch.load = patched
    try:
        yield
    finally:
        torch.load = original


__all__ = ["allowed", "load", "check", "SafeCheckpointEngine", "safe_torch_load"]

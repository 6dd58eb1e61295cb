"""Benchmark scripts, run from a checkout (`python benchmarks/NAME.py`, not installed); committed results are
under benchmarks/results/."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result, out: str | Path | None = None) -> None:
    """Print a result as JSON and, given out, write the same text there (what benchmarks/results/ holds)."""
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")

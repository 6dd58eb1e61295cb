"""Throughput of the real training step of a run config: `python benchmarks/throughput.py CONFIG [options]`
(= `ofa-ds bench`; the code is ofa_ds/train/bench.py, which documents the options and what is reported)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ofa_ds.train import bench  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=bench.__doc__.splitlines()[0])
    bench.add_arguments(parser)
    sys.exit(bench.run(parser.parse_args()))

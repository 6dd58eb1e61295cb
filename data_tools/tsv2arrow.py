"""Convert OFA pretraining TSVs into Arrow shards: `python data_tools/tsv2arrow.py SRC OUT` (= `ofa-ds tsv2arrow`)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ofa_ds.data import tsv2arrow  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=tsv2arrow.__doc__.splitlines()[0])
    tsv2arrow.add_arguments(parser)
    sys.exit(tsv2arrow.run(parser.parse_args()))

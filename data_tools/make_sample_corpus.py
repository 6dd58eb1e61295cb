"""Write a synthetic corpus in OFA's TSV layout: `python data_tools/make_sample_corpus.py OUT`
(= `ofa-ds make-sample-corpus`)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ofa_ds.data import sample_corpus  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=sample_corpus.__doc__.splitlines()[0])
    sample_corpus.add_arguments(parser)
    sys.exit(sample_corpus.run(parser.parse_args()))

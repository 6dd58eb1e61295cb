"""Train a sentencepiece tokenizer on corpus text: `python data_tools/train_tokenizer.py OUT --corpus ARROW`
(= `ofa-ds train-tokenizer`; the code is ofa_ds/data/train_tokenizer.py)."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ofa_ds.data import train_tokenizer  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=train_tokenizer.__doc__.splitlines()[0])
    train_tokenizer.add_arguments(parser)
    sys.exit(train_tokenizer.run(parser.parse_args()))

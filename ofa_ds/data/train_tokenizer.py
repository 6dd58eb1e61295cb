"""Train a sentencepiece tokenizer with OFA's vocabulary layout on corpus text.

    ofa-ds train-tokenizer OUT --corpus data/ofa_arrow --vocab-size 32000
    ofa-ds train-tokenizer OUT --text a.txt b.txt --vocab-size 32000

Texts from a converted corpus: VL captions, questions and answers, text rows, detection labels and the
negative caption pool, read column-wise from the memory-mapped shards (images are never touched). Text files
give one text per line. At most --max-sentences texts are used, spread evenly over the input. OUT then works as
`DataConfig.tokenizer`; the printed vocab_size is what `ModelConfig.vocab_size` must be.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

# source -> text columns (list<struct> columns are flattened below)
_CORPUS_TEXT = {
    "vl": ("caption", "question", "answers"),
    "text": ("text",),
    "detection": ("boxes",),
    "captions": ("caption",),
}


def corpus_texts(root: str | Path):
    """Every text of a converted corpus, column by column."""
    import pyarrow as pa

    from ofa_ds.data.shards import Corpus

    corpus = Corpus(root)
    for source, columns in _CORPUS_TEXT.items():
        for path in corpus.tables[source].paths:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            for k in range(reader.num_record_batches):
                batch = reader.get_batch(k)
                for name in columns:
                    col = batch.column(name)
                    if name == "answers":
                        col = col.flatten().field("answer")
                    elif name == "boxes":
                        col = col.flatten().field("label")
                    yield from (t for t in col.to_pylist() if t)


def file_texts(paths):
    for p in paths:
        with open(p, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line.strip():
                    yield line


def count(texts) -> int:
    return sum(1 for _ in texts)


def add_arguments(p) -> None:
    p.add_argument("out", help="output directory (spm.model + tokenizer.json)")
    p.add_argument("--corpus", help="converted corpus root (manifest.json)")
    p.add_argument("--text", nargs="+", default=[], help="text files, one text per line")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=32000,
        help="sentencepiece pieces, including the 4 specials (default: %(default)s)",
    )
    p.add_argument(
        "--model-type",
        choices=("unigram", "bpe"),
        default="unigram",
        help="sentencepiece algorithm (default: %(default)s)",
    )
    p.add_argument(
        "--max-sentences",
        type=int,
        default=2_000_000,
        help="texts sampled from the corpus for training (default: %(default)s)",
    )
    p.add_argument(
        "--num-codes",
        type=int,
        default=8192,
        help="image-code tokens after the text pieces (default: %(default)s, OFA's VQGAN)",
    )
    p.add_argument(
        "--num-bins", type=int, default=1000, help="location-bin tokens after the codes (default: %(default)s, OFA's)"
    )


def run(args) -> int:
    from ofa_ds.data.tokenizer import train_sentencepiece

    if not args.corpus and not args.text:
        raise SystemExit("train-tokenizer: give --corpus and/or --text")

    def texts():
        return itertools.chain(corpus_texts(args.corpus) if args.corpus else (), file_texts(args.text))

    total = count(texts())
    if total == 0:
        raise SystemExit("train-tokenizer: the inputs hold no text")
    stride = max(1, math.ceil(total / args.max_sentences))
    tok = train_sentencepiece(
        itertools.islice(texts(), 0, None, stride),
        args.vocab_size,
        args.out,
        num_codes=args.num_codes,
        num_bins=args.num_bins,
        model_type=args.model_type,
        max_sentences=args.max_sentences,
    )
    print(json.dumps({"out": str(args.out), "texts": total, "used": -(-total // stride), **tok.layout()}))
    return 0

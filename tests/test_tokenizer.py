import json
import random

import numpy as np
import pytest

from ofa_ds.config import ConfigError
from ofa_ds.data.tokenizer import load_tokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def bpe():
    return load_tokenizer("ofa_bpe")


# OFA_SPEC 3 and 4.2: every fixed prompt of OFA pretraining, as fairseq ids.
OFA_IDS = {
    " what does the image describe?": [99, 473, 5, 2274, 6190, 116],
    ' what is the complete text of " "?': [99, 16, 5, 1498, 2788, 9, 22, 22, 116],
    ' what is the complete text of "': [99, 16, 5, 1498, 2788, 9, 22],
    ' "?': [22, 116],
    "  what does the region describe? region:": [1437, 99, 473, 5, 976, 6190, 116, 976, 35],
    " what is the image in the middle part?": [99, 16, 5, 2274, 11, 5, 1692, 233, 116],
    " what are the objects in the image?": [99, 32, 5, 8720, 11, 5, 2274, 116],
    " yes": [4420],
    " no": [117],
    "?": [116],
    ' "': [22],
}


@pytest.mark.parametrize("text", list(OFA_IDS))
def test_ofa_bpe_reproduces_ofa_ids(bpe, text):
    assert bpe.encode(text) == OFA_IDS[text]


def test_ofa_bpe_layout(bpe):
    assert (bpe.bos, bpe.pad, bpe.eos, bpe.unk) == (0, 1, 2, 3)
    assert (bpe.vocab_size, bpe.mask, bpe.code_id(0), bpe.bin_id(0)) == (59457, 50264, 50265, 58457)
    assert (bpe.code_id(8191), bpe.bin_id(999)) == (58456, 59456)
    for bad in (lambda: bpe.code_id(8192), lambda: bpe.bin_id(-1), lambda: bpe.bin_id(1000)):
        with pytest.raises(ValueError):
            bad()
    text = bpe.decode([0, 99, 50264, 50265 + 7, 58457 + 3, 50261, 2])
    assert text == "<s> what<mask><code_7><bin_3>madeupword0000</s>"


def test_ofa_bpe_word_starts(bpe):
    ids = bpe.encode(" xylophonist things")  # ' x' 'yl' 'ophon' 'ist' ' things'
    assert len(ids) == 5
    starts = bpe.is_word_start(np.array(ids)).tolist()
    assert starts == [True] + [False] * (len(ids) - 2) + [True]
    assert not bpe.is_word_start(bpe.encode("?")[0])
    # specials, madeupwords, codes and bins start words; <mask> does not (fairseq decodes it without a space)
    assert bpe.is_word_start(np.array([0, 1, 2, 3, 50261, 50265, 58457])).all()
    assert not bpe.is_word_start(bpe.mask)


@pytest.mark.parametrize(
    "text",
    [
        " a man riding a horse.",
        "  two  spaces\tand\nlines ",
        " héllo wörld 😀 ünïcode",
        "no leading space",
        " 1234 + 5 = 1239",
        "",
    ],
)
def test_round_trips(bpe, text, sp_tokenizer):
    assert bpe.decode(bpe.encode(text)) == text
    assert sp_tokenizer.decode(sp_tokenizer.encode(text)) == text


def test_save_load_and_vocab_check(bpe, tmp_path):
    bpe.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok", vocab_size=59457)
    assert again.encode(" a cat on a mat") == bpe.encode(" a cat on a mat")
    with pytest.raises(ConfigError, match="vocab_size 59457 but the model expects vocab_size 60000"):
        load_tokenizer("ofa_bpe", vocab_size=60000)
    with pytest.raises(ConfigError, match="num_codes"):
        load_tokenizer(tmp_path / "tok", num_codes=4096)
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


TEXTS = [
    " ".join(
        random.Random(i).choice("a red blue circle square above below the there is one two shape picture".split())
        for _ in range(3 + i % 9)
    )
    + "."
    for i in range(400)
]


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    return train_sentencepiece(TEXTS, 280, tmp_path_factory.mktemp("spm"))


def test_sentencepiece_layout_and_reload(sp_tokenizer):
    tok = sp_tokenizer
    out = tok.model_file.parent
    layout = json.loads((out / "tokenizer.json").read_text())
    assert layout["num_text"] == 276 and layout["mask"] == 280 and layout["code_0"] == 281
    assert layout["bin_0"] == 281 + 8192 and layout["vocab_size"] == 280 + 1 + 8192 + 1000
    again = load_tokenizer(out, vocab_size=9473)
    text = " there is one red circle above the square."
    assert again.encode(text) == tok.encode(text)
    ids = tok.encode(text)
    assert all(4 <= i < tok.mask for i in ids)
    assert tok.is_word_start(ids[0])  # '▁...' piece
    # a layout file that disagrees with the model is an error naming the key
    bad = dict(layout, mask=281)
    (out / "tokenizer.json").write_text(json.dumps(bad))
    try:
        with pytest.raises(ConfigError, match="mask is 281"):
            load_tokenizer(out)
    finally:
        (out / "tokenizer.json").write_text(json.dumps(layout))


def test_sentencepiece_vocab_too_large_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size=5000"):
        train_sentencepiece(TEXTS[:20], 5000, tmp_path)


def _messy_text(seed: int, words: int) -> str:
    """Words, numbers, punctuation, contractions, non-ASCII and runs of spaces, tabs and newlines."""
    rng = random.Random(seed)
    vocab = [
        "the",
        "shape",
        "Circle",
        "1984",
        "3.5",
        "don't",
        "it's",
        "naïve",
        "東京",
        "x2",
        "--",
        "(a)",
        "e.g.",
        "well,",
        "'quoted'",
        "ö",
        "#tag",
        "π",
        "end.",
    ]
    seps = [" "] * 12 + ["  ", "\n", "\t", " \n ", "   ", ""]
    return "".join(rng.choice(vocab) + rng.choice(seps) for _ in range(words))


@pytest.mark.parametrize("backend", ["bpe", "sp"])
def test_encode_head_equals_the_head_of_the_whole_encoding(backend, bpe, sp_tokenizer, monkeypatch):
    tok = bpe if backend == "bpe" else sp_tokenizer
    for seed in range(30):
        text = " " + _messy_text(seed, 60 + 40 * seed)
        whole = tok.encode(text)
        for n in (1, 7, 50, 512):
            assert tok.encode_head(text, n) == whole[:n], (seed, n)
    unbroken = " " + "ab" * 5000  # no word boundary: the whole text is encoded
    assert tok.encode_head(unbroken, 10) == tok.encode(unbroken)[:10]
    encoded = []
    monkeypatch.setattr(tok, "encode", lambda t, f=tok.encode: encoded.append(len(t)) or f(t))
    book = " " + _messy_text(0, 200_000)  # about 1 MB
    assert len(tok.encode_head(book, 512)) == 512 and max(encoded) < len(book) // 100

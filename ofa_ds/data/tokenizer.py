"""Text tokenizer over OFA's vocabulary layout (OFA_SPEC 3).

    0 <s> (bos)  1 <pad>  2 </s> (eos)  3 <unk>  | text pieces | <mask> | num_codes <code_i> | num_bins <bin_k>

Two backends fill the text-piece range behind one interface:

- `OFABPETokenizer`: OFA's GPT-2 byte-level BPE plus its fairseq dictionary, so released OFA checkpoints can be
  continued. fairseq id = 4 + the line of dict.txt holding the GPT-2 id (so fairseq id != GPT-2 id); the three
  `madeupword` lines are text-range symbols that no text encodes to. V = 59457, <mask> 50264, <code_0> 50265,
  <bin_0> 58457.
- `SentencePieceTokenizer`: a model trained on the corpus by `train_sentencepiece` (`ofa-ds train-tokenizer`).
  It is trained with bos/pad/eos/unk at ids 0-3, so its piece ids are the text ids directly. Like GPT-2 BPE it
  keeps whitespace as written (no dummy prefix, no whitespace folding): OFA's prompts start with a space.

`encode` returns text ids only (no bos/eos); codes and bins are separate symbols (`code_id`, `bin_id`).
`load_tokenizer("ofa_bpe")` or `load_tokenizer(directory)` opens either; a saved directory holds the backend's
files and `tokenizer.json`, which records the layout and is checked on load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ofa_ds.config import ConfigError

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
LAYOUT_FILE = "tokenizer.json"
OFA_BPE_DIR = Path(__file__).resolve().parents[1] / "assets" / "ofa_bpe"
OFA_BPE_FILES = ("encoder.json", "vocab.bpe", "dict.txt")
SPM_FILE = "spm.model"


class Tokenizer:
    """The layout shared by both backends; subclasses encode and decode the text pieces."""

    bos, pad, eos, unk = 0, 1, 2, 3
    kind = ""

    def __init__(self, num_text: int, num_codes: int, num_bins: int, text_word_start: np.ndarray):
        self.num_text = num_text  # text pieces occupy ids 4 .. 4 + num_text - 1
        self.num_codes = num_codes
        self.num_bins = num_bins
        self.mask = 4 + num_text
        self.code_0 = self.mask + 1
        self.bin_0 = self.code_0 + num_codes
        self.vocab_size = self.bin_0 + num_bins
        # OFA's whole-word rule (OFA_SPEC 4.3 step 2, unify_dataset.get_whole_word_mask): specials, codes and
        # bins start a word; <mask> does not (fairseq's GPT2BPE decodes it literally, without a leading space).
        self._word_start = np.ones(self.vocab_size, dtype=bool)
        self._word_start[4 : self.mask] = text_word_start
        self._word_start[self.mask] = False

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_head(self, text: str, n: int) -> list[int]:
        """`encode(text)[:n]` without encoding all of a long text (a Pile book is megabytes; text infilling keeps
        512 tokens). Encodes growing prefixes, each cut at a space between two letters or digits: both backends
        end a word there (GPT-2's pre-tokenisation and sentencepiece's whitespace split), so every piece of a prefix
        is a piece of the whole text."""
        chars = 8 * n  # about 4 characters per piece in English
        while chars < len(text):
            cut = _word_boundary(text, chars)
            if cut is None:
                break
            ids = self.encode(text[:cut])
            if len(ids) >= n:
                return ids[:n]
            chars *= 4
        return self.encode(text)[:n]

    def _decode_text(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _save_files(self, out_dir: Path) -> dict:
        raise NotImplementedError

    def code_id(self, i: int) -> int:
        if not 0 <= i < self.num_codes:
            raise ValueError(f"image code {i} outside [0, {self.num_codes})")
        return self.code_0 + i

    def bin_id(self, k: int) -> int:
        if not 0 <= k < self.num_bins:
            raise ValueError(f"bin {k} outside [0, {self.num_bins})")
        return self.bin_0 + k

    def is_word_start(self, ids):
        """Whether a token id (or each id of an integer array) starts a word, for span masking."""
        return self._word_start[ids]

    def symbol(self, i: int) -> str:
        """The name of a non-text id: `<s>`, `<mask>`, `<code_5>`, `<bin_17>` ..."""
        if 0 <= i < 4:
            return SPECIALS[i]
        if i == self.mask:
            return "<mask>"
        if self.code_0 <= i < self.bin_0:
            return f"<code_{i - self.code_0}>"
        if self.bin_0 <= i < self.vocab_size:
            return f"<bin_{i - self.bin_0}>"
        raise ValueError(f"token id {i} is a text piece or outside the vocabulary (size {self.vocab_size})")

    def decode(self, ids) -> str:
        """Text for runs of text ids; every other id is written as its symbol (`<s>`, `<bin_3>`, ...)."""
        out, run = [], []
        for i in map(int, ids):
            if self._is_text(i):
                run.append(i)
                continue
            if run:
                out.append(self._decode_text(run))
                run = []
            out.append(self.symbol(i))
        if run:
            out.append(self._decode_text(run))
        return "".join(out)

    def _is_text(self, i: int) -> bool:
        return 4 <= i < self.mask

    def layout(self) -> dict:
        return {
            "type": self.kind,
            "num_text": self.num_text,
            "num_codes": self.num_codes,
            "num_bins": self.num_bins,
            "mask": self.mask,
            "code_0": self.code_0,
            "bin_0": self.bin_0,
            "vocab_size": self.vocab_size,
        }

    def save(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = self._save_files(out_dir)
        (out_dir / LAYOUT_FILE).write_text(json.dumps({**self.layout(), "files": files}, indent=2) + "\n")


class OFABPETokenizer(Tokenizer):
    kind = "ofa_bpe"

    def __init__(self, bpe_dir: str | Path = OFA_BPE_DIR, num_codes: int = 8192, num_bins: int = 1000):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        self.dir = Path(bpe_dir)
        for name in OFA_BPE_FILES:
            if not (self.dir / name).is_file():
                raise ConfigError(f"OFA BPE tokenizer: {self.dir / name} not found")
        bpe = HFTokenizer(models.BPE.from_file(str(self.dir / "encoder.json"), str(self.dir / "vocab.bpe")))
        # GPT-2's pre-tokenisation regex, no prefix space: ' what' and 'what' encode differently, as in OFA.
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        bpe.decoder = decoders.ByteLevel()
        self._bpe = bpe

        symbols = _read_fairseq_dict(self.dir / "dict.txt")
        n_gpt2 = bpe.get_vocab_size()
        gpt2 = np.array([int(s) if s.isdigit() else -1 for s in symbols], dtype=np.int64)  # -1: madeupword
        if gpt2.max() >= n_gpt2:
            k = int(gpt2.argmax())
            raise ConfigError(f"{self.dir / 'dict.txt'} line {k + 1}: GPT-2 id {gpt2[k]} >= {n_gpt2}")
        known = gpt2 >= 0
        self._gpt2_to_id = np.full(n_gpt2, self.unk, dtype=np.int64)
        self._gpt2_to_id[gpt2[known]] = np.flatnonzero(known) + 4
        self._id_to_gpt2 = np.concatenate([np.full(4, -1), gpt2])
        self._madeup = {4 + int(k): symbols[k] for k in np.flatnonzero(~known)}
        # A piece starts a word iff its first byte is a space (GPT-2 writes a leading space as 'Ġ').
        gpt2_starts = np.zeros(n_gpt2, dtype=bool)
        gpt2_starts[[g for piece, g in bpe.get_vocab().items() if piece[0] == "Ġ"]] = True
        text_starts = np.ones(len(symbols), dtype=bool)  # madeupwords count as word starts (OFA)
        text_starts[known] = gpt2_starts[gpt2[known]]
        super().__init__(len(symbols), num_codes, num_bins, text_starts)

    def encode(self, text: str) -> list[int]:
        return self._gpt2_to_id[self._bpe.encode(text, add_special_tokens=False).ids].tolist()

    def _is_text(self, i: int) -> bool:
        return super()._is_text(i) and i not in self._madeup

    def symbol(self, i: int) -> str:
        return self._madeup.get(i) or super().symbol(i)

    def _decode_text(self, ids: list[int]) -> str:
        return self._bpe.decode(self._id_to_gpt2[ids].tolist())

    def _save_files(self, out_dir: Path) -> dict:
        for name in OFA_BPE_FILES:
            if (out_dir / name).resolve() != (self.dir / name).resolve():
                shutil.copyfile(self.dir / name, out_dir / name)
        return {"encoder": "encoder.json", "merges": "vocab.bpe", "dict": "dict.txt"}


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model_file: str | Path, num_codes: int = 8192, num_bins: int = 1000):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        if not self.model_file.is_file():
            raise ConfigError(f"sentencepiece model {self.model_file} not found")
        sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        got = (sp.bos_id(), sp.pad_id(), sp.eos_id(), sp.unk_id())
        if got != (0, 1, 2, 3):
            raise ConfigError(f"{self.model_file}: bos/pad/eos/unk ids are {got}; the layout needs (0, 1, 2, 3)")
        self._sp = sp
        n = sp.get_piece_size()
        text_starts = np.array([sp.id_to_piece(i).startswith("\u2581") for i in range(4, n)], dtype=bool)
        super().__init__(n - 4, num_codes, num_bins, text_starts)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _decode_text(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _save_files(self, out_dir: Path) -> dict:
        if (out_dir / SPM_FILE).resolve() != self.model_file.resolve():
            shutil.copyfile(self.model_file, out_dir / SPM_FILE)
        return {"model": SPM_FILE}


def _word_boundary(text: str, start: int) -> int | None:
    """The first i >= start with text[i] a space between two letters or digits, or None."""
    i = text.find(" ", max(start, 1))
    while 0 < i < len(text) - 1:
        if text[i - 1].isalnum() and text[i + 1].isalnum():
            return i
        i = text.find(" ", i + 1)
    return None


def _read_fairseq_dict(path: Path) -> list[str]:
    symbols = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        symbol, _, count = line.rpartition(" ")
        if not symbol or not count.isdigit():
            raise ConfigError(f"{path} line {n}: expected '<symbol> <count>', got {line!r}")
        symbols.append(symbol)
    return symbols


def train_sentencepiece(
    texts,
    vocab_size: int,
    out_dir: str | Path,
    *,
    num_codes: int = 8192,
    num_bins: int = 1000,
    model_type: str = "unigram",
    max_sentences: int = 2_000_000,
) -> SentencePieceTokenizer:
    """Train a sentencepiece model on `texts` (an iterable of str) and save the full layout to `out_dir`.

    `vocab_size` counts the model's pieces including the four specials; the full vocabulary adds <mask>, the
    codes and the bins. Every text is trained on as `' ' + text`, the form OFA encodes it in.
    """
    import io

    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentences = (" " + t for t in texts if t and not t.isspace())
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            bos_id=0,
            pad_id=1,
            eos_id=2,
            unk_id=3,
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            byte_fallback=True,
            character_coverage=0.9995,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=1,
            max_sentence_length=1 << 16,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ConfigError(
            f"sentencepiece training with vocab_size={vocab_size} failed: {str(e).strip().splitlines()[-1]}"
        ) from None
    (out_dir / SPM_FILE).write_bytes(model.getvalue())
    tok = SentencePieceTokenizer(out_dir / SPM_FILE, num_codes, num_bins)
    tok.save(out_dir)
    return tok


def load_tokenizer(
    spec: str | Path, *, num_codes: int = 8192, num_bins: int = 1000, vocab_size: int | None = None
) -> Tokenizer:
    """`"ofa_bpe"` (the bundled OFA files) or a directory written by `Tokenizer.save` / `train_sentencepiece`.

    `vocab_size`, when given (the model's), must equal the tokenizer's full vocabulary size.
    """
    if str(spec) == "ofa_bpe":
        tok = OFABPETokenizer(OFA_BPE_DIR, num_codes, num_bins)
    else:
        tok = _load_dir(Path(spec), num_codes, num_bins)
    if vocab_size is not None and vocab_size != tok.vocab_size:
        raise ConfigError(
            f"tokenizer {spec} has vocab_size {tok.vocab_size} but the model expects vocab_size {vocab_size}"
        )
    return tok


def _load_dir(path: Path, num_codes: int, num_bins: int) -> Tokenizer:
    layout_file = path / LAYOUT_FILE
    if not layout_file.is_file():
        raise ConfigError(f"tokenizer {path}: no {LAYOUT_FILE} (expected 'ofa_bpe' or a saved tokenizer directory)")
    try:
        layout = json.loads(layout_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{layout_file}: not valid JSON ({e})") from e
    kind = layout.get("type")
    if kind == OFABPETokenizer.kind:
        tok = OFABPETokenizer(path, num_codes, num_bins)
    elif kind == SentencePieceTokenizer.kind:
        tok = SentencePieceTokenizer(path / layout.get("files", {}).get("model", SPM_FILE), num_codes, num_bins)
    else:
        raise ConfigError(f"{layout_file}: type {kind!r}; valid: {OFABPETokenizer.kind}, {SentencePieceTokenizer.kind}")
    for key, value in tok.layout().items():
        if layout.get(key) != value:
            raise ConfigError(
                f"{layout_file}: {key} is {layout.get(key)!r} but the tokenizer files (and "
                f"num_codes={num_codes}, num_bins={num_bins}) give {value!r}"
            )
    return tok

import math

import numpy as np
import pytest

from ofa_ds.data.masking import insert_masks, mask_spans, poisson_span_pmf, span_lengths

MASK = 9


def test_poisson_pmf_is_ofas_truncation():
    pmf = poisson_span_pmf(3.0)
    assert len(pmf) == 18  # k = 0..17: P(17) is the first below 1e-7
    assert pmf.sum() == pytest.approx(1.0)
    raw = np.array([math.exp(-3) * 3**k / math.factorial(k) for k in range(18)])
    np.testing.assert_allclose(pmf, raw / raw.sum(), rtol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 7, 30, 77])
def test_span_lengths_meet_the_budget_exactly(n):
    pmf = poisson_span_pmf(3.0)
    for seed in range(50):
        lengths = span_lengths(n, pmf, np.random.default_rng(seed))
        assert lengths.sum() == n and (lengths >= 0).all()
        assert lengths[:-1].sum() < n  # cut at the first prefix reaching the budget


def doc(num_words: int, seed: int):
    """bos, words of 1-3 pieces with unique ids, eos; and the word-start flags."""
    rng = np.random.default_rng(seed)
    tokens, starts = [0], [True]
    for w in range(num_words):
        for piece in range(rng.integers(1, 4)):
            tokens.append(100 + len(tokens))
            starts.append(piece == 0)
    tokens.append(2)
    starts.append(True)
    return np.array(tokens), np.array(starts)


def check_structure(tokens, starts, out):
    """out = tokens with whole words removed and <mask>s placed; returns the number of words removed."""
    assert out[0] == 0 and out[-1] == 2
    kept = out[out != MASK]
    keep = np.isin(tokens, kept)
    assert (tokens[keep] == kept).all()  # an in-order subsequence
    # removal is by whole words: a word is either fully kept or fully removed
    word = np.cumsum(starts[1:-1])
    inner = keep[1:-1]
    for w in np.unique(word):
        assert inner[word == w].all() or not inner[word == w].any()
    return len(np.unique(word[~inner]))


def test_mask_spans_structure_and_rate():
    pmf = poisson_span_pmf(3.0)
    fractions, masks = [], []
    for seed in range(400):
        tokens, starts = doc(60, seed)
        out = mask_spans(tokens, starts, MASK, 0.3, pmf, np.random.default_rng(seed))
        removed = check_structure(tokens, starts, out)
        fractions.append(removed / 60)
        masks.append((out == MASK).sum())
        assert (out == MASK).sum() >= 1
    # the budget is ceil(0.3 * 60) = 18 words of spans; spans may overlap (OFA), so slightly fewer are removed
    assert 0.25 < np.mean(fractions) <= 0.30
    assert np.max(fractions) <= 0.30
    # about one <mask> per span of mean length ~3 (+ inserts for zero-length spans)
    assert 4 < np.mean(masks) < 8


def test_mask_spans_is_deterministic_and_keeps_short_texts():
    pmf = poisson_span_pmf(3.0)
    tokens, starts = doc(20, 0)
    a = mask_spans(tokens, starts, MASK, 0.3, pmf, np.random.default_rng(5))
    b = mask_spans(tokens, starts, MASK, 0.3, pmf, np.random.default_rng(5))
    assert (a == b).all()
    empty = np.array([0, 2])
    assert (mask_spans(empty, np.array([True, True]), MASK, 0.3, pmf, np.random.default_rng(0)) == empty).all()


def test_insert_masks_interior_only():
    tokens = np.arange(10, 20)
    for seed in range(30):
        out = insert_masks(tokens, 3 / 10, MASK, np.random.default_rng(seed))
        assert len(out) == 13 and (out == MASK).sum() == 3
        assert out[0] == 10 and out[-1] == 19
        assert (out[out != MASK] == tokens).all()

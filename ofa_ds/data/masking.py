"""BART-style text infilling as OFA pretrains it (OFA_SPEC 4.3; unify_dataset.add_whole_word_mask).

Span lengths in words ~ Poisson(lambda) truncated where the pmf first drops below 1e-7; the masking budget is
ceil(ratio * #words); every span's first token becomes <mask> and the rest of its words are deleted
(replace_length = 1, no random tokens); zero-length spans become <mask> insertions. Spans may overlap, as in OFA.
Randomness comes from a numpy Generator instead of torch's global RNG.
"""

from __future__ import annotations

import math

import numpy as np


def poisson_span_pmf(lam: float) -> np.ndarray:
    """P(k) for k = 0, 1, ... up to and including the first k with P(k) < 1e-7, normalised."""
    ps, p_k, k = [], math.exp(-lam), 0
    while True:
        ps.append(p_k)
        if p_k < 1e-7:
            break
        k += 1
        p_k *= lam / k
    ps = np.array(ps, dtype=np.float64)
    return ps / ps.sum()


def span_lengths(num_to_mask: int, pmf: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw span lengths until they cover `num_to_mask` words; the last one is cut so the sum is exact."""
    lengths = rng.choice(len(pmf), size=num_to_mask, p=pmf)
    while lengths.sum() < num_to_mask:
        lengths = np.concatenate([lengths, rng.choice(len(pmf), size=num_to_mask, p=pmf)])
    cum = np.cumsum(lengths)
    i = int(np.searchsorted(cum, num_to_mask))  # first prefix reaching the budget
    lengths = lengths[: i + 1].copy()
    lengths[i] = num_to_mask - (cum[i - 1] if i else 0)
    return lengths


def mask_spans(
    tokens: np.ndarray, word_start: np.ndarray, mask_id: int, ratio: float, pmf: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Mask whole-word spans of `tokens` (bos ... eos, int64); `word_start[i]` says whether token i starts a word."""
    is_start = word_start.astype(np.int64)
    is_start[0] = is_start[-1] = 0
    num_to_mask = math.ceil(is_start.sum() * ratio)
    if num_to_mask == 0:
        return tokens
    lengths = span_lengths(num_to_mask, pmf, rng)
    spans = lengths[lengths > 0]
    num_inserts = len(lengths) - len(spans)
    if len(spans) == 0:
        return insert_masks(tokens, num_inserts / len(tokens), mask_id, rng)

    starts = np.flatnonzero(is_start)
    idx = starts[rng.permutation(len(starts))[: len(spans)]]
    out = tokens.copy()
    out[idx] = mask_id
    keep = np.ones(len(tokens), dtype=bool)
    is_start[-1] = 255  # a long "length" at eos so no span runs past it
    remaining = spans - 1  # words still to cover after each span's first
    while len(idx):
        remaining = remaining - is_start[idx + 1]
        more = remaining >= 0  # the next token is a continuation piece or a word still inside the span
        idx, remaining = idx[more] + 1, remaining[more]
        keep[idx] = False
    out = out[keep]
    if num_inserts:
        out = insert_masks(out, num_inserts / len(out), mask_id, rng)
    return out


def insert_masks(tokens: np.ndarray, p: float, mask_id: int, rng: np.random.Generator) -> np.ndarray:
    """Insert ceil(len * p) <mask> tokens at random interior positions (never before bos or after eos)."""
    n = math.ceil(len(tokens) * p)  # OFA's arithmetic, kept as is (p = inserts / len)
    total = len(tokens) + n
    at = rng.permutation(total - 2)[:n] + 1
    is_noise = np.zeros(total, dtype=bool)
    is_noise[at] = True
    out = np.empty(total, dtype=tokens.dtype)
    out[is_noise] = mask_id
    out[~is_noise] = tokens
    return out

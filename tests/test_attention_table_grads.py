"""The per-block reduction of the Triton backward's relative-table gradients (add_table_grads): exact per bucket
against float64 index_add with its atomics counted, and in the kernels against the per-element atomics (both
against the float64 reference). Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py), on CUDA where present."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from attention_cases import DEV, N, check, decoder_tokens, padding, run

from ofa_ds.kernels.attention.relpos import KIND_IMAGE, KIND_TEXT, image_bucket, text_bucket_lut


@triton.jit
def _table_grad_block(COL, DS, DG, N_ATOMICS, BM: tl.constexpr, BN: tl.constexpr):
    from ofa_ds.kernels.attention.triton_bwd import add_table_grads

    offs = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    tl.store(N_ATOMICS, add_table_grads(DG, tl.load(COL + offs), tl.load(DS + offs), BM, BN))


def expected_atomics(col):
    """add_table_grads' count, written out: per part (i >= j, i < j) of each skew column t (i - j = t mod BN),
    one atomic per bucket if it has at most two, else two plus one per entry at a third bucket."""
    BM, BN = col.shape
    i, j = torch.arange(BM)[:, None], torch.arange(BN)[None, :]
    t = (i - j) % BN
    n = 0
    for part in (t <= i, t > i):
        for c in range(BN):
            vals = col[(t == c) & part & (col >= 0)].tolist()
            distinct = sorted(set(vals))
            n += len(distinct) if len(distinct) <= 2 else 2 + sum(v not in distinct[:: len(distinct) - 1] for v in vals)
    return n


def block_patterns(BM, BN, g):
    """Bucket blocks of OFA's kinds: text at consecutive positions (some pairs masked, log buckets included),
    image patches in raster order (ids 1 + row*42 + col, rows of 24 patches; id 0 first), and arbitrary."""
    lut = text_bucket_lut(256, 1024).long()
    qp, kp = 150 + torch.arange(BM), torch.arange(BN)
    text = lut[(qp[:, None] - kp[None, :]).clamp(-1023, 1023) + 1023]
    text[torch.rand(BM, BN, generator=g) < 0.2] = -1
    raster = torch.arange(24 * 24)
    ids = torch.cat([torch.zeros(1, dtype=torch.long), 1 + raster // 24 * N + raster % 24])
    image = image_bucket(ids[5 : 5 + BM, None], ids[None, :BN], N)
    mixed = torch.randint(-1, 12, (BM, BN), generator=g)
    return dict(text=text, image=image, mixed=mixed)


@pytest.mark.parametrize("BM,BN", [(16, 16), (16, 32), (32, 16)])
def test_add_table_grads_block_reduction(BM, BN):
    """Exact sums per bucket (fp32 vs float64 index_add), with the atomics counted: one per bucket per skew column
    part, per entry only for a third bucket; for BM <= BN (the kernels' blocks) a text block takes at most
    BM + BN - 1 atomics and a raster image block at most 2 (BM + BN - 1), of BM * BN entries. BM > BN (several
    diagonals per part) stays exact, with less reduction."""
    g = torch.Generator().manual_seed(BM + BN)
    for name, col in block_patterns(BM, BN, g).items():
        col = col.to(torch.int32)
        ds = torch.randn(BM, BN, generator=g)
        dg = torch.zeros(int(col.max()) + 1, device=DEV)
        n = torch.zeros(1, dtype=torch.int32, device=DEV)
        _table_grad_block[(1,)](col.to(DEV), ds.to(DEV), dg, n, BM=BM, BN=BN)
        live = col >= 0
        want = torch.zeros(dg.shape, dtype=torch.float64).index_add_(0, col[live].long(), ds[live].double())
        torch.testing.assert_close(dg.cpu().double(), want, rtol=0, atol=1e-5, msg=name)
        assert n.item() == expected_atomics(col), name
        if name == "text" and BM <= BN:
            assert n.item() <= BM + BN - 1
        if name == "image" and BM <= BN:
            assert n.item() <= 2 * (BM + BN - 1) and n.item() < live.sum() // 4


@pytest.mark.parametrize("block_reduce", [True, False], ids=["block", "element"])
def test_table_gradients_reduced_per_block_match_reference(block_reduce, monkeypatch):
    """Encoder with raster-order patches (24 per row, as OFA without patch sampling) and text, and decoder image
    codes (BOS id 0): the table gradients through the per-block reduction and through per-element atomics, each
    against float64."""
    from ofa_ds.kernels.attention import triton_attention as ta

    monkeypatch.setattr(ta, "BLOCK_REDUCE", block_reduce)
    B, P, L = 2, 30, 13
    ids = 1 + torch.arange(P) // 24 * N + torch.arange(P) % 24
    kind = torch.cat([torch.full((B, P), KIND_IMAGE), torch.full((B, L), KIND_TEXT)], 1)
    pos = torch.cat([ids.expand(B, P), torch.arange(L).expand(B, L)], 1)
    pad = torch.cat([torch.zeros(B, P, dtype=torch.bool), padding(B, L, [L, 9])], 1)
    check(run(torch.float32, B=B, H=1, Tq=P + L, Tk=P + L, dv=64, wqk=128, pad=pad, tokens=(kind, pos)), torch.float32)
    codes = decoder_tokens(B, 37, [True, True])
    check(run(torch.float32, B=B, H=1, Tq=37, Tk=37, dv=64, wqk=128, causal=True, tokens=codes), torch.float32)

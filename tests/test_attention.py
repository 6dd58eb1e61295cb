"""The attention entry point's CPU paths: OFA's buckets, the materialised bias, and the reference and SDPA
backends against an OFA-style float64 attention written out here (bias from OFA's full bucket matrices).
The Triton kernels are tested against reference_attention in test_attention_triton.py."""

import pytest
import torch

from ofa_ds.kernels.attention import fused_attention, reference_attention, resolve_backend, sdpa_attention
from ofa_ds.kernels.attention.relpos import (
    KIND_IMAGE,
    KIND_NONE,
    KIND_TEXT,
    RelPos,
    image_bucket,
    image_buckets,
    text_bucket_lut,
    text_buckets,
)

N = 42


def test_text_buckets_match_ofa_spec_examples():
    lut = text_bucket_lut(256, 1024)
    examples = {0: 255, 1: 256, -1: 254, 128: 383, 129: 384, 200: 411, 500: 467, 1023: 510, -1023: 0}
    assert {r: int(lut[r + 1023]) for r in examples} == examples


def test_image_buckets_match_ofa_spec_rules():
    ids = torch.tensor([0, 1, 1 + 3 * N + 5, 1 + 41 * N + 41])
    b = image_bucket(ids[:, None], ids[None, :], N)
    assert b[2, 1] == (3 + 41) * 83 + (5 + 41) and b[1, 3] == 0 and b[3, 1] == 6888
    assert b[0, 2] == 6889 and b[2, 0] == 6890 and b[0, 0] == 6891


def encoder_rel(B, P, L, H, dtype, seed=0):
    """RelPos of OFA's encoder [P sampled patches ; L text tokens], one pure-text padding token kind 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(24 * 24, generator=g)[:P] for _ in range(B)])
    ids = 1 + (ids // 24) * N + ids % 24
    kind = torch.cat([torch.full((B, P), KIND_IMAGE), torch.full((B, L), KIND_TEXT)], 1).to(torch.int8)
    kind[:, -1] = KIND_NONE
    pos = torch.cat([ids, torch.arange(L).expand(B, L)], 1).to(torch.int32)
    tt, it = torch.randn(511, H, generator=g, dtype=dtype), torch.randn(6892, H, generator=g, dtype=dtype)
    return RelPos(kind, pos, kind, pos, tt, it, text_bucket_lut(256, 1024), N), ids


def test_materialized_bias_is_ofas():
    """OFA: text x text gets token_rp_bucket[:L, :L], image x image image_rp_bucket[id_i, id_j], the rest 0."""
    B, P, L, H = 2, 5, 9, 3
    rel, ids = encoder_rel(B, P, L, H, torch.float64)
    bias = rel.materialize()  # (B, H, S, S)
    tok, img = text_buckets(256, 1024), image_buckets(N)
    for b in range(B):
        want = torch.zeros(H, P + L, P + L, dtype=torch.float64)
        want[:, P:-1, P:-1] = rel.text_table[tok[: L - 1, : L - 1]].permute(2, 0, 1)
        want[:, :P, :P] = rel.image_table[img[ids[b]][:, ids[b]]].permute(2, 0, 1)
        assert torch.equal(bias[b], want)


def ofa_attention(q, k, v, scale, bias, mask):
    """OFA's attention (OFA_SPEC 1.5) in float64: logits + bias, -inf at masked pairs, softmax, P @ V;
    a row with every key masked is defined as 0."""
    logits = (q @ k.transpose(-1, -2)) * scale + bias
    dead = mask.all(-1, keepdim=True)
    probs = torch.softmax(logits.masked_fill(mask, float("-inf")).masked_fill(dead, 0.0), -1)
    return (probs @ v).masked_fill(dead, 0.0)


@pytest.mark.parametrize("backend", [reference_attention, sdpa_attention], ids=["reference", "sdpa"])
@pytest.mark.parametrize("causal", [False, True])
def test_backends_match_ofa_attention(backend, causal):
    B, P, L, H, D = 2, 5, 12, 2, 16
    S = P + L
    rel, _ = encoder_rel(B, P, L, H, torch.float64, seed=1)
    g = torch.Generator().manual_seed(2)
    q, k = (
        torch.randn(B, H, S, 2 * D, generator=g, dtype=torch.float64),
        torch.randn(B, H, S, 2 * D, generator=g, dtype=torch.float64),
    )
    v = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, :P] = True  # pure-text sample: patches padded
    kpm[1, 10:] = True
    if not causal:
        kpm[0] = True  # a fully padded sample
    leaves = [t.requires_grad_() for t in (q, k, v, rel.text_table, rel.image_table)]
    mask = kpm[:, None, None, :] | (torch.ones(S, S, dtype=torch.bool).triu(1) if causal else False)
    want = ofa_attention(q, k, v, 0.3, rel.materialize(), mask)
    got = backend(q, k, v, scale=0.3, causal=causal, key_padding_mask=kpm, rel_pos=rel)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    dout = torch.randn(got.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, leaves, dout), torch.autograd.grad(want, leaves, dout)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sdpa_matches_reference_in_low_precision(dtype):
    rel, _ = encoder_rel(2, 4, 9, 2, dtype)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 13, w, generator=g).to(dtype) for w in (32, 32, 16))
    kpm = torch.zeros(2, 13, dtype=torch.bool)
    kpm[1, 8:] = True
    args = dict(scale=0.25, causal=True, key_padding_mask=kpm, rel_pos=rel)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(
        sdpa_attention(q, k, v, **args), reference_attention(q, k, v, **args), rtol=tol, atol=tol
    )


def test_backend_choice(monkeypatch):
    q = torch.zeros(1, 1, 1, 64)
    monkeypatch.delenv("OFA_DS_ATTENTION", raising=False)
    assert resolve_backend(None, q) == "sdpa"  # CPU default
    assert resolve_backend("reference", q) == "reference"
    monkeypatch.setenv("OFA_DS_ATTENTION", "triton")
    assert resolve_backend(None, q) == "triton"
    with pytest.raises(ValueError, match="attention backend 'flash'; valid: auto, reference, sdpa, triton"):
        resolve_backend("flash", q)


def test_shape_errors_name_the_argument():
    q, v = torch.zeros(1, 2, 8, 32), torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"v \(1, 2, 7, 16\) does not match k"):
        fused_attention(q, q, v[:, :, :7], scale=1.0)
    with pytest.raises(ValueError, match=r"key_padding_mask must be bool \(B, Tk\) = \(1, 8\)"):
        fused_attention(q, q, v, scale=1.0, key_padding_mask=torch.zeros(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal attention needs Tq == Tk"):
        fused_attention(q[:, :, :4], q, v, scale=1.0, causal=True)
    rel, _ = encoder_rel(1, 3, 5, 3, torch.float32)
    with pytest.raises(ValueError, match=r"rel_pos.text_table must be \(num_buckets, H=2\)"):
        fused_attention(q, q, v, scale=1.0, rel_pos=rel)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_separate_position_channels_are_the_concatenation(backend):
    """pos_q / pos_k given separately: the same attention as q, k with them concatenated (cast to q's dtype, as
    the model did), values and gradients (the position channels' too), on the CPU backends."""
    B, P, L, H, D = 2, 4, 9, 2, 16
    S = P + L
    rel, _ = encoder_rel(B, P, L, H, torch.float64, seed=4)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64) for _ in range(3))
    pq, pk = (torch.randn(B, H, S, D, generator=g) for _ in range(2))  # float32: cast to q's dtype
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, 10:] = True
    results = []
    for separate in (True, False):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, pq, pk, rel.text_table, rel.image_table)]
        r = rel.with_tables(*leaves[5:])
        kw = dict(scale=0.3, causal=True, key_padding_mask=kpm, rel_pos=r, backend=backend)
        if separate:
            out = fused_attention(*leaves[:3], pos_q=leaves[3], pos_k=leaves[4], **kw)
        else:
            out = fused_attention(
                torch.cat([leaves[0], leaves[3].double()], -1),
                torch.cat([leaves[1], leaves[4].double()], -1),
                leaves[2],
                **kw,
            )
        results.append([out, *torch.autograd.grad(out, leaves, torch.ones_like(out))])
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(ValueError, match="pos_q and pos_k go together"):
        fused_attention(q, k, v, scale=1.0, pos_k=pk)
    with pytest.raises(ValueError, match=r"pos_q must be \(B, H, Tq, P\) = \(2, 2, 13, P\)"):
        fused_attention(q, k, v, scale=1.0, pos_q=pq[:, :, :5], pos_k=pk)

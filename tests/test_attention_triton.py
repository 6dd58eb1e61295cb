"""The Triton attention kernels against a float64 reference (reference_attention on float64 copies of
the same inputs): output and the gradients of q, k, v and both relative tables.

Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py), on CUDA where present. Every OFA attention
shape is covered: encoder [image ; text] self-attention with padding and a pure-text sample, decoder
self-attention on text, on image codes and on a mixed batch (causal), cross-attention (no relative
term, Tq != Tk), a fully padded sample, each head dim (64, 80, 128) and dtype. A seeded random sweep
adds arbitrary shapes, kinds and positions (text positions over the whole 1024 range, so the log
buckets and clamps are hit, image ids including the special id 0); its size is OFA_DS_ATTN_SWEEP
(default 4 cases; e.g. OFA_DS_ATTN_SWEEP=200 for a long run).

Tolerance: max |kernel - float64| <= TOL[dtype] * max(1, max |float64|) per tensor. The kernels keep
fp32 statistics and accumulators; the error is the rounding of the probabilities (and dS) to the
input dtype before the P @ V / dS @ K products, as FlashAttention does:
    fp32 1e-5 (exact fp32 dots)   fp16 2e-3   bf16 3e-2
(worst seen over 46 random cases: 5%, 30% and 65% of these bounds).
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from ofa_ds.kernels.attention import fused_attention
from ofa_ds.kernels.attention.relpos import (KIND_IMAGE, KIND_TEXT, RelPos, num_image_buckets, num_text_buckets,
                                             text_bucket_lut)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 3e-2}
N = 42  # image grid
DEV = "cuda" if torch.cuda.is_available() else "cpu"
LUT = text_bucket_lut(256, 1024, DEV)


def encoder_tokens(B, P, L, g):
    """OFA's encoder sequence: P sampled patches of a 24 x 24 grid (ids 1 + r*42 + c), then L text tokens."""
    ids = torch.stack([torch.randperm(24 * 24, generator=g)[:P] for _ in range(B)])
    ids = 1 + (ids // 24) * N + ids % 24
    kind = torch.cat([torch.full((B, P), KIND_IMAGE), torch.full((B, L), KIND_TEXT)], 1)
    pos = torch.cat([ids, torch.arange(L).expand(B, L)], 1)
    return kind, pos


def decoder_tokens(B, T, code):
    """Decoder targets: text positions 0..T-1, or image codes with OFA's ids (0 for BOS, 16 x 16 grid, 1024)."""
    grid = torch.cat([torch.zeros(1, dtype=torch.long), 1 + (torch.arange(256) // 16) * N + torch.arange(256) % 16,
                      torch.full((1024,), 1024)])
    code = torch.tensor(code)[:, None]
    kind = torch.where(code, KIND_IMAGE, KIND_TEXT).expand(B, T)
    pos = torch.where(code, grid[:T], torch.arange(T))
    return kind, pos


def run(dtype, *, B, H, Tq, Tk, dv, wqk, causal=False, pad=None, tokens=None, k_tokens=None, seed=0):
    """Kernel and float64 reference on the same random inputs; returns [(name, kernel, reference)]."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    q, k, v = rnd(B, H, Tq, wqk), rnd(B, H, Tk, wqk), rnd(B, H, Tk, dv)
    text_t, image_t = rnd(num_text_buckets(256), H), rnd(num_image_buckets(N), H)
    dout = rnd(B, H, Tq, dv)
    inputs = [t.to(DEV) for t in (q, k, v, text_t, image_t)]
    kpm = pad.to(DEV) if pad is not None else None

    def attend(q, k, v, text_t, image_t, backend):
        rel = None
        if tokens is not None:
            (qk, qp), (kk, kp) = tokens, k_tokens or tokens
            rel = RelPos(qk.to(torch.int8).to(DEV), qp.to(torch.int32).to(DEV), kk.to(torch.int8).to(DEV),
                         kp.to(torch.int32).to(DEV), text_t, image_t, LUT, N)
        return fused_attention(q, k, v, scale=(2 * dv) ** -0.5, causal=causal, key_padding_mask=kpm, rel_pos=rel,
                               backend=backend)

    results = []
    for backend, ts in (("triton", inputs), ("reference", [t.double() for t in inputs])):
        ts = [t.detach().requires_grad_() for t in ts]
        out = attend(*ts, backend)
        grads = torch.autograd.grad(out, ts, dout.to(DEV, out.dtype), allow_unused=True)
        results.append([out, *grads])
    names = ["out", "dq", "dk", "dv", "d_text_table", "d_image_table"]
    return [(n, a, b) for n, a, b in zip(names, *results)]


def check(results, dtype):
    for name, got, want in results:
        if want is None:  # a table the attention never reads
            assert got is None or not got.any(), name
            continue
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        err = (got.double() - want).abs().max().item()
        bound = TOL[dtype] * max(1.0, want.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def padding(B, T, lengths):
    return torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None]


# Encoder [image ; text]: sample 1 is pure text (its patches all padded), text right-padded.
ENC_KIND, ENC_POS = encoder_tokens(2, 12, 25, torch.Generator().manual_seed(1))
ENC_PAD = torch.cat([torch.tensor([[False] * 12, [True] * 12]), padding(2, 25, [25, 18])], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dv", [64, 80, 128])
def test_encoder_self_attention(dtype, dv):
    res = run(dtype, B=2, H=1, Tq=37, Tk=37, dv=dv, wqk=2 * dv, pad=ENC_PAD, tokens=(ENC_KIND, ENC_POS))
    check(res, dtype)


@pytest.mark.parametrize("dtype,dv,code", [(torch.bfloat16, 80, [False, False]), (torch.float16, 128, [True, True]),
                                           (torch.float32, 64, [True, False])], ids=["text", "codes", "mixed"])
def test_decoder_self_attention(dtype, dv, code):
    res = run(dtype, B=2, H=2, Tq=29, Tk=29, dv=dv, wqk=2 * dv, causal=True, pad=padding(2, 29, [29, 21]),
              tokens=decoder_tokens(2, 29, code))
    check(res, dtype)


def test_cross_attention_without_position_channels():
    res = run(torch.float32, B=2, H=2, Tq=19, Tk=33, dv=64, wqk=64, pad=padding(2, 33, [33, 7]))
    check(res, torch.float32)


def test_fully_padded_sample_gives_zeros():
    pad = padding(2, 21, [21, 0])
    res = run(torch.bfloat16, B=2, H=1, Tq=21, Tk=21, dv=64, wqk=128, causal=True, pad=pad,
              tokens=decoder_tokens(2, 21, [False, True]))
    check(res, torch.bfloat16)
    out, dq, dk, dv = (r[1] for r in res[:4])
    assert not out[1].any() and not dq[1].any() and not dk[1].any() and not dv[1].any()


def random_case(seed):
    r = random.Random(seed)
    B, H = r.randint(1, 2), r.randint(1, 2)
    causal = r.random() < 0.5
    Tq = r.randint(1, 40)
    Tk = Tq if causal else r.randint(1, 40)
    dv = r.choice([64, 80, 128])
    g = torch.Generator().manual_seed(seed)

    def tokens(T):  # any mix of kinds; text positions over the whole range, image ids including 0
        kind = torch.randint(0, 3, (B, T), generator=g)
        text = torch.randint(0, 1024, (B, T), generator=g)
        image = torch.randint(0, N * N + 1, (B, T), generator=g)
        return kind, torch.where(kind == KIND_TEXT, text, image)

    pad = torch.rand(B, Tk, generator=g) < r.choice([0.0, 0.3, 1.0])
    q_tok = tokens(Tq)
    return dict(dtype=r.choice([torch.float32, torch.float16, torch.bfloat16]), B=B, H=H, Tq=Tq, Tk=Tk, dv=dv,
                wqk=r.choice([dv, 2 * dv]), causal=causal, pad=pad if r.random() < 0.7 else None,
                tokens=q_tok if r.random() < 0.8 else None, k_tokens=q_tok if causal else tokens(Tk), seed=seed)


@pytest.mark.parametrize("seed", range(int(os.environ.get("OFA_DS_ATTN_SWEEP", "4"))))
def test_random_sweep(seed):
    case = random_case(seed)
    check(run(**case), case["dtype"])


def test_unsupported_inputs_are_named_errors():
    q = torch.randn(1, 1, 8, 96)
    with pytest.raises(ValueError, match=r"head dim .*96.*supported head dims \(64, 80, 128\)"):
        fused_attention(q, q, q, scale=1.0, backend="triton")
    q = torch.randn(1, 1, 8, 64, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64 not supported; supported"):
        fused_attention(q, q, q, scale=1.0, backend="triton")
    q, v = torch.randn(1, 2, 8, 128), torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match="k .* does not match q"):
        fused_attention(q, q[..., :100], v, scale=1.0, backend="triton")
    kind, pos = decoder_tokens(1, 8, [False])
    bad = RelPos(kind.to(torch.int8), pos.int(), kind.to(torch.int8), pos.int(), torch.zeros(511, 2),
                 torch.zeros(100, 2), LUT.cpu(), N)
    with pytest.raises(ValueError, match="image_table has 100 rows; grid 42 needs 6892"):
        fused_attention(q, q, v, scale=1.0, rel_pos=bad, backend="triton")
    bad = RelPos(kind.to(torch.int8), pos.int(), kind.to(torch.int8), pos.int(), torch.zeros(255, 2), None,
                 LUT.cpu(), N)
    with pytest.raises(ValueError, match="text_table has 255 rows; text_lut indexes 511"):
        fused_attention(q, q, v, scale=1.0, rel_pos=bad, backend="triton")
    bad = RelPos(kind[:, :5].to(torch.int8), pos[:, :5].int(), kind.to(torch.int8), pos.int(), torch.zeros(511, 2),
                 None, LUT.cpu(), N)
    with pytest.raises(ValueError, match=r"query kinds/positions must be \(1, 8\)"):
        fused_attention(q, q, v, scale=1.0, rel_pos=bad, backend="triton")


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    from ofa_ds.kernels.attention import triton_attention as ta

    monkeypatch.setattr(ta, "INTERPRET", False)
    q = torch.randn(1, 1, 8, 64)
    with pytest.raises(ValueError, match="needs CUDA tensors .* use backend='sdpa' or 'reference'"):
        fused_attention(q, q, q, scale=1.0, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_ofa_huge_encoder_shape(dtype):
    kind, pos = encoder_tokens(2, 196, 128, torch.Generator().manual_seed(0))
    pad = torch.cat([torch.zeros(2, 196, dtype=torch.bool), padding(2, 128, [128, 57])], 1)
    check(run(dtype, B=2, H=4, Tq=324, Tk=324, dv=80, wqk=160, pad=pad, tokens=(kind, pos)), dtype)


def test_model_with_triton_matches_reference():
    """A tiny OFA (head dim 64) with the Triton attention: same loss and parameter gradients as the
    reference path, on a batch with an image + text sample, a pure-text sample, text and image-code targets."""
    import torch.nn.functional as F

    from ofa_ds.config import ModelConfig
    from ofa_ds.model.ofa import OFAModel

    V = 300
    cfg = dict(embed_dim=64, ffn_dim=128, heads=1, encoder_layers=1, decoder_layers=1, resnet="resnet18",
               vocab_size=V, dropout=0.0, encoder_drop_path=0.0, decoder_drop_path=0.0)
    torch.manual_seed(0)
    models = {b: OFAModel(ModelConfig(**cfg, attn_backend=b)).to(DEV) for b in ("reference", "triton")}
    models["triton"].load_state_dict(models["reference"].state_dict())
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, V, (2, 8), generator=g)
    src[:, 0], src[0, -1], src[1, 5], src[1, 6:] = 0, 2, 2, 1
    target = torch.randint(4, V, (2, 8), generator=g)
    target[0, 6:] = 1
    prev = torch.cat([torch.zeros(2, 1, dtype=torch.long), target[:, :-1]], 1)
    stream = dict(src_tokens=src, patch_images=torch.randn(2, 3, 32, 32, generator=g),
                  patch_masks=torch.tensor([True, False]), prev_output_tokens=prev,
                  code_masks=torch.tensor([False, True]))
    stream = {k: v.to(DEV) for k, v in stream.items()}
    results = {}
    for name, model in models.items():
        logits = model(stream)
        loss = F.cross_entropy(logits.flatten(0, 1), target.to(DEV).flatten(), ignore_index=1)
        loss.backward()
        results[name] = loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    (loss_r, grads_r), (loss_t, grads_t) = results["reference"], results["triton"]
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-6, atol=0)
    assert grads_t.keys() == grads_r.keys()
    assert any("rel_pos.image" in n for n in grads_r) and any("rel_pos.text" in n for n in grads_r)
    for n in grads_r:  # the 1e-8 floor: k-position biases have an exactly-zero gradient (softmax shift invariance)
        err, ref = (grads_t[n] - grads_r[n]).norm().item(), grads_r[n].norm().item()
        assert err <= 1e-4 * ref + 1e-8, f"{n}: gradient difference norm {err:.3g} vs reference norm {ref:.3g}"

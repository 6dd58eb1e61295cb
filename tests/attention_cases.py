"""Attention test cases shared by the Triton tests: OFA's token layouts, the kernel and a float64 reference run on
the same random inputs, and the per-dtype tolerance (tests/test_attention_triton.py's docstring explains it)."""

from __future__ import annotations

import torch

from ofa_ds.kernels.attention import fused_attention
from ofa_ds.kernels.attention.relpos import (
    KIND_IMAGE,
    KIND_TEXT,
    RelPos,
    num_image_buckets,
    num_text_buckets,
    text_bucket_lut,
)

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
    grid = torch.cat(
        [
            torch.zeros(1, dtype=torch.long),
            1 + (torch.arange(256) // 16) * N + torch.arange(256) % 16,
            torch.full((1024,), 1024),
        ]
    )
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
            rel = RelPos(
                qk.to(torch.int8).to(DEV),
                qp.to(torch.int32).to(DEV),
                kk.to(torch.int8).to(DEV),
                kp.to(torch.int32).to(DEV),
                text_t,
                image_t,
                LUT,
                N,
            )
        return fused_attention(
            q, k, v, scale=(2 * dv) ** -0.5, causal=causal, key_padding_mask=kpm, rel_pos=rel, backend=backend
        )

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

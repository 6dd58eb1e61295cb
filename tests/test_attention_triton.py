"""The Triton attention kernels against a float64 reference (reference_attention on float64 copies of
the same inputs): output and the gradients of q, k, v and both relative tables.

Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py), on CUDA where present. Every OFA attention
shape is covered: encoder [image ; text] self-attention with padding and a pure-text sample, decoder
self-attention on text, on image codes and on a mixed batch (causal), cross-attention (no relative
term, Tq != Tk), a fully padded sample, each head dim (64, 80, 128) and dtype. A seeded random sweep
adds arbitrary shapes, kinds and positions (text positions over the whole 1024 range, so the log
buckets and clamps are hit, image ids including the special id 0); its size is OFA_DS_ATTN_SWEEP
(default 4 cases; e.g. OFA_DS_ATTN_SWEEP=200 for a long run).

Also: the position channels passed separately (pos_q / pos_k, read in place) against the concatenated
path (bit-identical) and the head-dim pieces (80 = 64 + 16, no padding to 128). The per-block reduction of the
table gradients is tests/test_attention_table_grads.py's; the shared cases are tests/attention_cases.py.

Tolerance: max |kernel - float64| <= TOL[dtype] * max(1, max |float64|) per tensor. The kernels keep
fp32 statistics and accumulators; the error is the rounding of the probabilities (and dS) to the
input dtype before the P @ V / dS @ K products, as FlashAttention does:
    fp32 1e-5 (exact fp32 dots)   fp16 2e-3   bf16 3e-2
(worst seen over 46 random cases: 5%, 30% and 65% of these bounds).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
from attention_cases import DEV, LUT, N, check, decoder_tokens, encoder_tokens, padding, run

from ofa_ds.kernels.attention import fused_attention
from ofa_ds.kernels.attention.relpos import (
    KIND_TEXT,
    RelPos,
    num_image_buckets,
    num_text_buckets,
)

# Encoder [image ; text]: sample 1 is pure text (its patches all padded), text right-padded.
ENC_KIND, ENC_POS = encoder_tokens(2, 12, 25, torch.Generator().manual_seed(1))
ENC_PAD = torch.cat([torch.tensor([[False] * 12, [True] * 12]), padding(2, 25, [25, 18])], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dv", [64, 80, 128])
def test_encoder_self_attention(dtype, dv):
    res = run(dtype, B=2, H=1, Tq=37, Tk=37, dv=dv, wqk=2 * dv, pad=ENC_PAD, tokens=(ENC_KIND, ENC_POS))
    check(res, dtype)


@pytest.mark.parametrize(
    "dtype,dv,code",
    [(torch.bfloat16, 80, [False, False]), (torch.float16, 128, [True, True]), (torch.float32, 64, [True, False])],
    ids=["text", "codes", "mixed"],
)
def test_decoder_self_attention(dtype, dv, code):
    res = run(
        dtype,
        B=2,
        H=2,
        Tq=29,
        Tk=29,
        dv=dv,
        wqk=2 * dv,
        causal=True,
        pad=padding(2, 29, [29, 21]),
        tokens=decoder_tokens(2, 29, code),
    )
    check(res, dtype)


def test_cross_attention_without_position_channels():
    res = run(torch.float32, B=2, H=2, Tq=19, Tk=33, dv=64, wqk=64, pad=padding(2, 33, [33, 7]))
    check(res, torch.float32)


def test_fully_padded_sample_gives_zeros():
    pad = padding(2, 21, [21, 0])
    res = run(
        torch.bfloat16,
        B=2,
        H=1,
        Tq=21,
        Tk=21,
        dv=64,
        wqk=128,
        causal=True,
        pad=pad,
        tokens=decoder_tokens(2, 21, [False, True]),
    )
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
    return dict(
        dtype=r.choice([torch.float32, torch.float16, torch.bfloat16]),
        B=B,
        H=H,
        Tq=Tq,
        Tk=Tk,
        dv=dv,
        wqk=r.choice([dv, 2 * dv]),
        causal=causal,
        pad=pad if r.random() < 0.7 else None,
        tokens=q_tok if r.random() < 0.8 else None,
        k_tokens=q_tok if causal else tokens(Tk),
        seed=seed,
    )


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
    bad = RelPos(
        kind.to(torch.int8),
        pos.int(),
        kind.to(torch.int8),
        pos.int(),
        torch.zeros(511, 2),
        torch.zeros(100, 2),
        LUT.cpu(),
        N,
    )
    with pytest.raises(ValueError, match="image_table has 100 rows; grid 42 needs 6892"):
        fused_attention(q, q, v, scale=1.0, rel_pos=bad, backend="triton")
    bad = RelPos(
        kind.to(torch.int8), pos.int(), kind.to(torch.int8), pos.int(), torch.zeros(255, 2), None, LUT.cpu(), N
    )
    with pytest.raises(ValueError, match="text_table has 255 rows; text_lut indexes 511"):
        fused_attention(q, q, v, scale=1.0, rel_pos=bad, backend="triton")
    bad = RelPos(
        kind[:, :5].to(torch.int8),
        pos[:, :5].int(),
        kind.to(torch.int8),
        pos.int(),
        torch.zeros(511, 2),
        None,
        LUT.cpu(),
        N,
    )
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


COMPILE_SCRIPT = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ofa_ds.kernels.attention.triton_bwd import attn_bwd_dkdv, attn_bwd_dq
from ofa_ds.kernels.attention.triton_fwd import attn_fwd

ptr = dict(LSE="*fp32", DELTA="*fp32", DG="*fp32", KPM="*i8", Q_KIND="*i8", K_KIND="*i8", Q_POS="*i32",
           K_POS="*i32", LUT="*i32", scale="fp32")
ptr.update((n, "*bf16") for n in "Q PQ K PK V O DO DQ DPQ DK DPK DV TEXT_T IMAGE_T".split())
const = dict(MAX_POS=1024, GRID_N=42, CAUSAL=False, HAS_KPM=True, HAS_TEXT=True, HAS_IMAGE=True, HAS_POS=True, D0=64,
             D1=16, DOT_T=tl.bfloat16, BLOCK_REDUCE=True, BLOCK_M=64, BLOCK_N=64)
out = {}
for arch, fn in ((80, attn_fwd), (80, attn_bwd_dq), (80, attn_bwd_dkdv), (90, attn_bwd_dkdv)):
    c = {k: v for k, v in const.items() if k in fn.arg_names}
    sig = {n: "constexpr" if n in c else ptr.get(n, "i32") for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, constexprs=c), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=4, num_stages=2))
    out[f"{fn.__name__}_sm{arch}"] = k.metadata.shared
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists(), reason="no ptxas")
def test_kernels_compile_for_a100_and_h100():
    """The GPU path without a GPU: the kernels (head dim 80 in pieces, separate position channels, the per-block
    table-gradient reduction's tl.gather) compile through ptxas for sm_80 and sm_90 within an A100's shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(shared) == 4 and all(0 < b <= 166912 for b in shared.values()), shared


def test_model_with_triton_matches_reference():
    """A tiny OFA (head dim 64) with the Triton attention: same loss and parameter gradients as the
    reference path, on a batch with an image + text sample, a pure-text sample, text and image-code targets."""
    import torch.nn.functional as F

    from ofa_ds.config import ModelConfig
    from ofa_ds.model.ofa import OFAModel

    V = 300
    cfg = dict(
        embed_dim=64,
        ffn_dim=128,
        heads=1,
        encoder_layers=1,
        decoder_layers=1,
        resnet="resnet18",
        vocab_size=V,
        dropout=0.0,
        encoder_drop_path=0.0,
        decoder_drop_path=0.0,
    )
    torch.manual_seed(0)
    models = {b: OFAModel(ModelConfig(**cfg, attn_backend=b)).to(DEV) for b in ("reference", "triton")}
    models["triton"].load_state_dict(models["reference"].state_dict())
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, V, (2, 8), generator=g)
    src[:, 0], src[0, -1], src[1, 5], src[1, 6:] = 0, 2, 2, 1
    target = torch.randint(4, V, (2, 8), generator=g)
    target[0, 6:] = 1
    prev = torch.cat([torch.zeros(2, 1, dtype=torch.long), target[:, :-1]], 1)
    stream = dict(
        src_tokens=src,
        patch_images=torch.randn(2, 3, 32, 32, generator=g),
        patch_masks=torch.tensor([True, False]),
        prev_output_tokens=prev,
        code_masks=torch.tensor([False, True]),
    )
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


# ------------------------------------------------------------------ position channels passed separately


def heads(x, d):  # as ofa_ds/model: (B, T, H*d) -> (B, H, T, d), a strided view
    B, T, _ = x.shape
    return x.view(B, T, -1, d).transpose(1, 2)


@pytest.mark.parametrize(
    "dtype,dv,causal,pos_dtype",
    [
        (torch.float32, 80, False, torch.float32),
        (torch.bfloat16, 80, True, torch.float32),
        (torch.float16, 64, True, torch.float16),
        (torch.bfloat16, 128, False, torch.bfloat16),
    ],
    ids=str,
)
def test_separate_position_channels_match_concatenated(dtype, dv, causal, pos_dtype):
    """fused_attention(q, k, v, pos_q=, pos_k=) on the Triton path reads q, k (strided views of one qkv
    projection, as the model makes them) and the position channels in place: bit-identical to the
    concatenated call, gradients of the position channels included, and within TOL of float64."""
    B, H, T = 2, 1, 37
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, T, 3 * H * dv, generator=g).to(DEV, dtype)
    pos = torch.randn(B, T, 2 * H * dv, generator=g).to(DEV, pos_dtype)
    tables = [torch.randn(n, H, generator=g).to(DEV, dtype) for n in (num_text_buckets(256), num_image_buckets(N))]
    dout = torch.randn(B, H, T, dv, generator=g).to(DEV, dtype)
    if causal:
        kind, posid = decoder_tokens(B, T, [True, False])
        pad = padding(B, T, [T, 30])
    else:
        kind, posid = ENC_KIND, ENC_POS
        pad = ENC_PAD
    kind, posid, pad = kind.to(DEV, torch.int8), posid.to(DEV, torch.int32), pad.to(DEV)

    def attend(qkv, pos, text_t, image_t, separate, backend="triton"):
        q, k, v = (heads(t, dv) for t in qkv.chunk(3, -1))
        pq, pk = (heads(t, dv) for t in pos.chunk(2, -1))
        rel = RelPos(kind, posid, kind, posid, text_t, image_t, LUT, N)
        kw = dict(scale=(2 * dv) ** -0.5, causal=causal, key_padding_mask=pad, rel_pos=rel, backend=backend)
        if separate:
            return fused_attention(q, k, v, pos_q=pq, pos_k=pk, **kw)
        return fused_attention(torch.cat([q, pq.to(q.dtype)], -1), torch.cat([k, pk.to(k.dtype)], -1), v, **kw)

    results = []
    for separate in (True, False):
        leaves = [t.detach().requires_grad_() for t in (qkv, pos, *tables)]
        out = attend(*leaves, separate)
        results.append([out, *torch.autograd.grad(out, leaves, dout)])
    names = ["out", "d_qkv", "d_pos", "d_text_table", "d_image_table"]
    for name, a, b in zip(names, *results):
        assert a.dtype == b.dtype, name
        if name.endswith("table") and DEV == "cuda":  # fp32 atomics: summation order varies on a GPU
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b), f"{name}: separate and concatenated position channels differ"
    leaves = [t.detach().double().requires_grad_() for t in (qkv, pos, *tables)]
    want = attend(*leaves, True, backend="reference")
    ref = [want, *torch.autograd.grad(want, leaves, dout.double())]
    check([(n, a.to(dtype), b) for n, a, b in zip(names, results[0], ref)], dtype)


def test_separate_position_channels_errors():
    q, v = torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64)
    with pytest.raises(ValueError, match="pos_q and pos_k go together"):
        fused_attention(q, q, v, scale=1.0, pos_q=q, backend="triton")
    with pytest.raises(ValueError, match=r"pos_k must be \(B, H, Tk, P\) = \(1, 2, 8, 64\)"):
        fused_attention(q, q, v, scale=1.0, pos_q=q, pos_k=q[..., :32], backend="triton")
    with pytest.raises(ValueError, match="separate position channels need q/k width = pos width = head dim"):
        fused_attention(q, q, v, scale=1.0, pos_q=q[..., :32], pos_k=q[..., :32], backend="triton")


# ------------------------------------------------------------------ head dims as power-of-two pieces


@pytest.mark.parametrize("dv,pieces", [(64, (64, 0)), (80, (64, 16)), (128, (128, 0))])
def test_head_dims_run_as_pieces_without_padding(dv, pieces):
    """The kernels' tiles are the head dim's power-of-two main piece and tail (80 = 64 + 16; q/k 160 =
    2 x 64 + 2 x 16 with the position channels), never a width padded to 128 / 256; a concatenated q/k is
    read through views of itself (no copies)."""
    from ofa_ds.kernels.attention import triton_attention as ta

    assert ta._pieces(dv) == pieces
    q, v = torch.randn(1, 2, 8, 2 * dv), torch.randn(1, 2, 8, dv)
    args = ta._kernel_args(q, q, v, None, None, None, None, None, None, 1.0, False)
    assert (args["D0"], args["D1"], args["HAS_POS"]) == (*pieces, True)  # the tiles' widths: nothing else
    assert args["Q"].data_ptr() == q.data_ptr() and args["PQ"].data_ptr() == q[..., dv:].data_ptr()


def test_head_dim_80_without_position_channels():
    """q/k width = head dim 80 (no position channels): main + tail pieces on both sides."""
    res = run(
        torch.float32,
        B=2,
        H=2,
        Tq=21,
        Tk=35,
        dv=80,
        wqk=80,
        pad=padding(2, 35, [35, 12]),
        tokens=encoder_tokens(2, 9, 12, torch.Generator().manual_seed(3)),
        k_tokens=encoder_tokens(2, 15, 20, torch.Generator().manual_seed(4)),
    )
    check(res, torch.float32)

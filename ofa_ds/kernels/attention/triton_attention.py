"""Triton backend of `fused_attention`: checks, kernel launches and the autograd Function.

Kernels: triton_fwd.py (forward), triton_bwd.py (dQ; dK, dV and table gradients), triton_bias.py (the
in-kernel relative buckets and masks). Extra state beyond q, k, v, out: one fp32 log-sum-exp per query
row in the forward, plus one fp32 delta per query row and an fp32 (H, text + image buckets) table-gradient
buffer in the backward; no (B, H, Tq, Tk) tensor exists. Determinism: see triton_bwd.py (dQ, dK, dV
bit-reproducible; the table gradients use fp32 atomics, reproducible to fp32 rounding on a GPU).

Supported: head dims (v width) 64, 80, 128 with q/k width equal to it or twice it (OFA's absolute-
position channels), or q/k of the head dim with the position channels as separate pos_q / pos_k of the
head dim (read in place: no concatenated copy); fp16, bf16, fp32 (fp32 uses exact fp32 dots, no TF32); any
lengths; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (the Triton interpreter, for tests).
OFA_DS_TRITON_TABLE_GRAD=element turns off the per-block reduction of the table gradients (one atomic per
(query, key) pair instead; a fallback should a compiler reject the reduction's tl.gather).
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl

from . import check_inputs
from .relpos import RelPos, num_image_buckets
from .triton_bwd import attn_bwd_dkdv, attn_bwd_dq
from .triton_fwd import attn_fwd

HEAD_DIMS = (64, 80, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_REDUCE = os.environ.get("OFA_DS_TRITON_TABLE_GRAD", "block") != "element"


def _configs(blocks):
    if INTERPRET:  # the interpreter cannot autotune; small blocks so short test sequences span several
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in blocks]


# T_BUCKET (next power of two of the lengths) exists only to key the tuning by length without retuning
# for every length.
_KEY = ["D0", "D1", "HAS_POS", "T_BUCKET", "CAUSAL", "HAS_KPM", "HAS_TEXT", "HAS_IMAGE", "DOT_T"]
_fwd = triton.autotune(
    _configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (128, 128, 8, 2)]),
    key=_KEY,
)(attn_fwd)
# Each list has a config that fits fp32 at q/k width 256 in an A100's shared memory (checked by compiling
# for sm_80): fwd (64, 32, 4, 2), dq (32, 32, 4, 1), dkdv (32, 64, 4, 2). dkdv's blocks have BLOCK_M <= BLOCK_N,
# which add_table_grads (triton_bwd.py) reduces best.
_bwd_dq = triton.autotune(
    _configs([(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 1)]), key=_KEY
)(attn_bwd_dq)
# Autotuning runs the kernel several times; the atomically accumulated table gradients restart at 0.
_bwd_dkdv = triton.autotune(
    _configs([(64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 2)]), key=_KEY, reset_to_zero=["DG"]
)(attn_bwd_dkdv)


def triton_attention(
    q,
    k,
    v,
    *,
    scale: float,
    causal: bool = False,
    key_padding_mask=None,
    rel_pos: RelPos | None = None,
    pos_q=None,
    pos_k=None,
) -> torch.Tensor:
    """q, k (B, H, Tq|Tk, Wqk), v (B, H, Tk, Wv) -> (B, H, Tq, Wv); see the package docstring."""
    check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, rel_pos=rel_pos, pos_q=pos_q, pos_k=pos_k)
    check_supported(q, k, v, key_padding_mask, rel_pos, pos_q, pos_k)
    if pos_q is not None:  # as the concatenated path rounds them (no copy when the dtype already matches)
        pos_q, pos_k = pos_q.to(q.dtype), pos_k.to(q.dtype)
    rp = rel_pos
    text_table = rp.text_table if rp is not None else None
    image_table = rp.image_table if rp is not None else None
    return _TritonAttention.apply(
        q, k, v, pos_q, pos_k, text_table, image_table, rp, key_padding_mask, float(scale), causal
    )


def check_supported(q, k, v, key_padding_mask, rel_pos, pos_q=None, pos_k=None) -> None:
    """What only this backend cannot take: head dims, dtypes, devices."""
    wqk, wv = q.shape[-1], v.shape[-1]
    if pos_q is not None:
        wqk = q.shape[-1] + pos_q.shape[-1]
        if q.shape[-1] != wv or pos_q.shape[-1] != wv:
            raise ValueError(
                f"triton attention: separate position channels need q/k width = pos width = head dim "
                f"(v width) {wv}; got q/k {q.shape[-1]}, pos {pos_q.shape[-1]}"
            )
    if wv not in HEAD_DIMS or wqk not in (wv, 2 * wv):
        raise ValueError(
            f"triton attention: head dim (v width) {wv} with q/k width {wqk} is not supported; "
            f"supported head dims {HEAD_DIMS}, q/k width = head dim or 2 x head dim"
        )
    if q.dtype not in DTYPES:
        raise ValueError(f"triton attention: dtype {q.dtype} not supported; supported: {DTYPES}")
    if not (q.is_cuda or (INTERPRET and q.device.type == "cpu")):
        raise ValueError(
            f"triton attention needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); got "
            f"{q.device}; use backend='sdpa' or 'reference' here"
        )
    named = {"k": k, "v": v, "key_padding_mask": key_padding_mask, "pos_q": pos_q, "pos_k": pos_k}
    if rel_pos is not None:
        rp = rel_pos
        named.update(
            q_kind=rp.q_kind,
            q_pos=rp.q_pos,
            k_kind=rp.k_kind,
            k_pos=rp.k_pos,
            text_lut=rp.text_lut,
            text_table=rp.text_table,
            image_table=rp.image_table,
        )
        if rp.image_table is not None and rp.image_table.shape[0] != num_image_buckets(rp.image_grid):
            raise ValueError(
                f"rel_pos.image_table has {rp.image_table.shape[0]} rows; grid {rp.image_grid} "
                f"needs {num_image_buckets(rp.image_grid)}"
            )
        if rp.text_lut.dim() != 1 or rp.text_lut.numel() % 2 == 0:
            raise ValueError(f"rel_pos.text_lut must be (2 * max_positions - 1,), got {tuple(rp.text_lut.shape)}")
        if rp.text_table is not None and rp.text_table.shape[0] < _lut_rows(rp.text_lut):
            raise ValueError(
                f"rel_pos.text_table has {rp.text_table.shape[0]} rows; text_lut indexes {_lut_rows(rp.text_lut)}"
            )
    for name, t in named.items():
        if t is not None and t.device != q.device:
            raise ValueError(f"triton attention: {name} is on {t.device}, q on {q.device}")


_LUT_ROWS: dict[int, int] = {}  # id(text LUT) -> rows it indexes; the entry goes with the LUT


def _lut_rows(lut) -> int:
    """Rows of the text table a LUT indexes; read once per LUT (a model buffer), not once per call."""
    key = id(lut)
    if key not in _LUT_ROWS:
        _LUT_ROWS[key] = int(lut.max()) + 1
        weakref.finalize(lut, _LUT_ROWS.pop, key, None)
    return _LUT_ROWS[key]


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_q, pos_k, text_table, image_table, rel_pos, key_padding_mask, scale, causal):
        q, k, v, pos_q, pos_k = (_last_dim_contiguous(t) for t in (q, k, v, pos_q, pos_k))
        B, H, TQ, _ = q.shape
        args = _kernel_args(q, k, v, pos_q, pos_k, text_table, image_table, rel_pos, key_padding_mask, scale, causal)
        o = q.new_empty(B, H, TQ, v.shape[-1])
        lse = torch.empty(B * H, TQ, device=q.device, dtype=torch.float32)
        _fwd[_grid(B * H, TQ, "BLOCK_M")](O=o, LSE=lse, **args)
        # Held until the backward beyond q, k, v, out: lse, O(B*H*Tq). Tables and positions are shared.
        ctx.save_for_backward(q, k, v, pos_q, pos_k, o, lse, text_table, image_table)
        ctx.rel_pos, ctx.key_padding_mask, ctx.scale, ctx.causal = rel_pos, key_padding_mask, scale, causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, pos_q, pos_k, o, lse, text_table, image_table = ctx.saved_tensors
        B, H, TQ, d = o.shape
        args = _kernel_args(
            q, k, v, pos_q, pos_k, text_table, image_table, ctx.rel_pos, ctx.key_padding_mask, ctx.scale, ctx.causal
        )
        do = _last_dim_contiguous(do)
        args.update(DO=do, s_dob=do.stride(0), s_doh=do.stride(1), s_dot=do.stride(2))
        dq, dpos_q, DQ, DPQ, s_dq = _grad_buffers(q, pos_q, d)
        dk, dpos_k, DK, DPK, s_dk = _grad_buffers(k, pos_k, d)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        delta = torch.empty_like(lse)
        _bwd_dq[_grid(B * H, TQ, "BLOCK_M")](O=o, DQ=DQ, DPQ=DPQ, s_dq=s_dq, LSE=lse, DELTA=delta, **args)
        # One fp32 accumulator per head, [text rows | image rows] (the kernel's bucket ids index both at once).
        text_rows = args["TEXT_ROWS"]
        dg = torch.zeros(H, text_rows + num_image_buckets(args["GRID_N"]), dtype=torch.float32, device=q.device)
        _bwd_dkdv[_grid(B * H, k.shape[2], "BLOCK_N")](
            DK=DK, DPK=DPK, s_dk=s_dk, DV=dv, DG=dg, LSE=lse, DELTA=delta, BLOCK_REDUCE=BLOCK_REDUCE, **args
        )
        dtext = dg[:, :text_rows].t().to(text_table.dtype) if text_table is not None else None
        dimage = dg[:, text_rows:].t().to(image_table.dtype) if image_table is not None else None
        return dq, dk, dv, dpos_q, dpos_k, dtext, dimage, None, None, None, None


def _split_pos(x, pos, d):
    """(head channels, position channels or None) of q or k: views of x when the position channels ride in it."""
    if pos is None and x.shape[-1] == 2 * d:
        return x[..., :d], x[..., d:]
    return x, pos


def _grad_buffers(x, pos, d):
    """Gradients of q (or k) and of its separate position channels, and what the kernel writes through: the
    head and position parts (views of one buffer when concatenated; a dummy without positions) and their row
    stride."""
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if pos is not None:
        dpos = torch.empty(pos.shape, dtype=pos.dtype, device=pos.device)
        return dx, dpos, dx, dpos, d
    if x.shape[-1] == 2 * d:
        return dx, None, dx[..., :d], dx[..., d:], 2 * d
    return dx, None, dx, dx, d  # DPQ never written (HAS_POS is False)


def _pieces(d: int) -> tuple[int, int]:
    """Head dim d as a power-of-two main piece and a tail (80 = 64 + 16), each one dot in the kernels."""
    d0 = 1 << (d.bit_length() - 1)
    return d0, d - d0


def _kernel_args(q, k, v, pos_q, pos_k, text_table, image_table, rp, key_padding_mask, scale, causal) -> dict:
    """The arguments all three kernels share. Absent optional tensors become 1-element dummies (never read)."""
    dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
    TQ, TK, d = q.shape[2], k.shape[2], v.shape[3]
    q, pq = _split_pos(q, pos_q, d)
    k, pk = _split_pos(k, pos_k, d)
    has_pos = pq is not None
    if not has_pos:
        pq, pk = q, k  # never read
    if rp is not None:  # no copies for the model's int8 kinds and int32 positions
        tokens = dict(
            Q_KIND=rp.q_kind.to(torch.int8).contiguous(),
            Q_POS=rp.q_pos.to(torch.int32).contiguous(),
            K_KIND=rp.k_kind.to(torch.int8).contiguous(),
            K_POS=rp.k_pos.to(torch.int32).contiguous(),
            LUT=rp.text_lut.to(torch.int32).contiguous(),
            MAX_POS=rp.max_positions,
            GRID_N=rp.image_grid,
        )
    else:
        tokens = dict(Q_KIND=dummy, Q_POS=dummy, K_KIND=dummy, K_POS=dummy, LUT=dummy, MAX_POS=1, GRID_N=1)
    # Tables transposed to (H, rows): one head's buckets are contiguous in the kernels (O(rows * H) copies).
    text_t = text_table.t().contiguous() if text_table is not None else dummy.float()
    image_t = image_table.t().contiguous() if image_table is not None else dummy.float()
    d0, d1 = _pieces(d)
    strides = {}
    for name, t in (("q", q), ("pq", pq), ("k", k), ("pk", pk), ("v", v)):
        strides.update({f"s_{name}b": t.stride(0), f"s_{name}h": t.stride(1), f"s_{name}t": t.stride(2)})
    return dict(
        Q=q,
        PQ=pq,
        K=k,
        PK=pk,
        V=v,
        TEXT_T=text_t,
        IMAGE_T=image_t,
        **tokens,
        **strides,
        KPM=key_padding_mask.contiguous().view(torch.int8) if key_padding_mask is not None else dummy,
        H=q.shape[1],
        TQ=TQ,
        TK=TK,
        TEXT_ROWS=text_t.shape[-1],
        scale=scale,
        T_BUCKET=triton.next_power_of_2(max(TQ, TK)),
        CAUSAL=causal,
        HAS_KPM=key_padding_mask is not None,
        HAS_TEXT=text_table is not None,
        HAS_IMAGE=image_table is not None,
        HAS_POS=has_pos,
        D0=d0,
        D1=d1,
        DOT_T=tl.float32 if INTERPRET or q.dtype == torch.float32 else _TL_DTYPES[q.dtype],
    )


def _grid(bh, length, block):
    return lambda meta: (triton.cdiv(length, meta[block]), bh)


def _last_dim_contiguous(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


__all__ = ["triton_attention", "check_supported", "HEAD_DIMS", "DTYPES"]

"""The one attention entry point of ofa-ds.

    out = fused_attention(q, k, v, scale=..., causal=..., key_padding_mask=..., rel_pos=...,
                          pos_q=None, pos_k=None)

q (B, H, Tq, Dqk), k (B, H, Tk, Dqk), v (B, H, Tk, Dv) -> out (B, H, Tq, Dv).

OFA's untied absolute-position term rides in q/k as extra channels (`[q, q_pos] . [k, k_pos]`, so Dqk
is the head dim plus the position channels), either already concatenated into q and k (pos_q = pos_k =
None) or passed as pos_q (B, H, Tq, P), pos_k (B, H, Tk, P), cast to q's dtype: the same attention as
`cat([q, pos_q], -1)`, `cat([k, pos_k], -1)`, which the "reference" and "sdpa" backends build and the
"triton" kernels do not (they read the position channels, shared by a layer stack, in place). The
relative term is `rel_pos` (see relpos.py), gathered from per-layer tables. `scale` multiplies the whole
dot product. Masked keys get -inf; a query row whose keys are all masked yields zeros (never NaN).
Gradients reach q, k, v, pos_q, pos_k and the tables.

Backends: "reference" (plain PyTorch, materialised bias, fp32 softmax as OFA), "sdpa" (torch SDPA with
a materialised float bias; the CPU default), "triton" (the fused kernel; the CUDA default).
`backend=None` reads OFA_DS_ATTENTION, else "auto".
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .relpos import KIND_IMAGE, KIND_NONE, KIND_TEXT, RelPos  # noqa: F401

BACKENDS = ("auto", "reference", "sdpa", "triton")


def fused_attention(
    q,
    k,
    v,
    *,
    scale: float,
    causal: bool = False,
    key_padding_mask=None,
    rel_pos: RelPos | None = None,
    backend: str | None = None,
    pos_q=None,
    pos_k=None,
) -> torch.Tensor:
    check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, rel_pos=rel_pos, pos_q=pos_q, pos_k=pos_k)
    backend = resolve_backend(backend, q)
    if backend == "triton":
        from .triton_attention import triton_attention

        return triton_attention(
            q,
            k,
            v,
            scale=scale,
            causal=causal,
            key_padding_mask=key_padding_mask,
            rel_pos=rel_pos,
            pos_q=pos_q,
            pos_k=pos_k,
        )
    if pos_q is not None:
        q, k = torch.cat([q, pos_q.to(q.dtype)], -1), torch.cat([k, pos_k.to(k.dtype)], -1)
    fn = reference_attention if backend == "reference" else sdpa_attention
    return fn(q, k, v, scale=scale, causal=causal, key_padding_mask=key_padding_mask, rel_pos=rel_pos)


def resolve_backend(backend: str | None, q: torch.Tensor) -> str:
    if backend in (None, "auto"):  # an explicit backend beats the environment, which beats auto
        backend = os.environ.get("OFA_DS_ATTENTION") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if q.is_cuda and triton_available() else "sdpa"
    return backend


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_inputs(q, k, v, *, causal, key_padding_mask, rel_pos, pos_q=None, pos_k=None) -> None:
    """Shape and dtype errors before any kernel launches, naming the offending argument."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Tq, Dqk = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != Dqk:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, heads or q/k width")
    if (pos_q is None) != (pos_k is None):
        raise ValueError("pos_q and pos_k go together: give both or neither")
    if pos_q is not None:
        if pos_q.dim() != 4 or pos_q.shape[:3] != q.shape[:3]:
            raise ValueError(f"pos_q must be (B, H, Tq, P) = ({B}, {H}, {Tq}, P), got {tuple(pos_q.shape)}")
        if pos_k.dim() != 4 or pos_k.shape[:3] != k.shape[:3] or pos_k.shape[3] != pos_q.shape[3]:
            raise ValueError(
                f"pos_k must be (B, H, Tk, P) = ({B}, {H}, {k.shape[2]}, {pos_q.shape[3]}), got {tuple(pos_k.shape)}"
            )
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} does not match k {tuple(k.shape)} in batch, heads or length")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    Tk = k.shape[2]
    if causal and Tq != Tk:
        raise ValueError(f"causal attention needs Tq == Tk, got {Tq} and {Tk}")
    if key_padding_mask is not None and (key_padding_mask.shape != (B, Tk) or key_padding_mask.dtype != torch.bool):
        raise ValueError(
            f"key_padding_mask must be bool (B, Tk) = ({B}, {Tk}), got "
            f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )
    if rel_pos is not None:
        rp = rel_pos
        if rp.q_kind.shape != (B, Tq) or rp.q_pos.shape != (B, Tq):
            raise ValueError(
                f"rel_pos query kinds/positions must be ({B}, {Tq}), got "
                f"{tuple(rp.q_kind.shape)}, {tuple(rp.q_pos.shape)}"
            )
        if rp.k_kind.shape != (B, Tk) or rp.k_pos.shape != (B, Tk):
            raise ValueError(
                f"rel_pos key kinds/positions must be ({B}, {Tk}), got "
                f"{tuple(rp.k_kind.shape)}, {tuple(rp.k_pos.shape)}"
            )
        for name, t in (("text_table", rp.text_table), ("image_table", rp.image_table)):
            if t is not None and (t.dim() != 2 or t.shape[1] != H):
                raise ValueError(f"rel_pos.{name} must be (num_buckets, H={H}), got {tuple(t.shape)}")
        if rp.text_table is None and rp.image_table is None:
            raise ValueError("rel_pos has neither a text nor an image table")


def _mask(q, k, causal, key_padding_mask):
    """Boolean (B, 1, Tq, Tk) mask of disallowed pairs, or None."""
    B, _, Tq, _ = q.shape
    Tk = k.shape[2]
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :].expand(B, 1, Tq, Tk)
    if causal:
        c = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).triu(1)
        mask = c.expand(B, 1, Tq, Tk) if mask is None else mask | c
    return mask


def reference_attention(q, k, v, *, scale, causal=False, key_padding_mask=None, rel_pos=None):
    """OFA's unfused attention: scores + bias, -inf masks, softmax in fp32, cast back."""
    scores = torch.matmul(q * scale, k.transpose(-1, -2))  # (B, H, Tq, Tk)
    if rel_pos is not None:
        scores = scores + rel_pos.materialize().to(scores.dtype)
    mask = _mask(q, k, causal, key_padding_mask)
    dead = None
    if mask is not None:
        dead = mask.all(-1, keepdim=True)  # (B, 1, Tq, 1): rows with no allowed key
        scores = scores.masked_fill(mask & ~dead, float("-inf"))
    # fp32 softmax for half inputs as OFA; float64 stays float64 (the tests' exact reference).
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v)
    return out if dead is None else out.masked_fill(dead, 0)


def sdpa_attention(q, k, v, *, scale, causal=False, key_padding_mask=None, rel_pos=None):
    """torch SDPA with the bias and masks folded into one float attn_mask (a single gather per layer)."""
    mask = _mask(q, k, causal, key_padding_mask)
    dead = None
    if mask is not None:
        dead = mask.all(-1, keepdim=True)  # (B, 1, Tq, 1)
        mask = mask & ~dead
    if rel_pos is not None:
        bias = rel_pos.dense_bias(None if mask is None else mask[:, 0]).to(q.dtype)
    elif mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(mask, float("-inf"))
    else:
        bias = None
    dv = v.shape[-1]
    if dv != q.shape[-1] and not (bias is not None and bias.requires_grad):
        # SDPA's fused kernels want equal q/k/v widths (and take no bias gradient, so a learnable bias runs the
        # math path anyway); zero-padding v is cheaper than the math path.
        v = F.pad(v, (0, q.shape[-1] - dv))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)[..., :dv]
    return out if dead is None else out.masked_fill(dead, 0)


__all__ = [
    "fused_attention",
    "reference_attention",
    "sdpa_attention",
    "RelPos",
    "resolve_backend",
    "check_inputs",
    "KIND_NONE",
    "KIND_TEXT",
    "KIND_IMAGE",
]

"""OFA's relative-position buckets (OFA_SPEC 1.4.3-1.4.4), in a form a kernel can evaluate in place.

Every query and key token carries a kind (none / text / image) and a position: a text position
0..max_positions-1, or an image position id 0..n*n (id = 1 + row*n + col, id 0 a special slot).
A query-key pair gets a relative bias only when both are text (1D table) or both image (2D table):

    text:  text_table[text_lut[pos_q - pos_k + max_positions - 1], h]
    image: image_table[image_bucket(id_q, id_k), h]

This covers every attention OFA has: the encoder's [image ; text] sequence (text x text and
image x image blocks only), the decoder's text targets (all text) and image-code targets (all image,
ids from `decoder_image_position_ids`), and cross-attention (no rel_pos at all).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

KIND_NONE, KIND_TEXT, KIND_IMAGE = 0, 1, 2


@lru_cache(maxsize=None)
def _text_lut_cpu(bucket_size: int, max_position: int) -> torch.Tensor:
    # Exactly OFA's make_token_bucket_position, evaluated on r = i - j instead of the full matrix
    # (the matrix depends only on i - j), so the float log/ceil rounding is the same.
    rel = torch.arange(-(max_position - 1), max_position, dtype=torch.long, device="cpu")
    sign = torch.sign(rel)
    mid = bucket_size // 2
    abs_pos = torch.where((rel < mid) & (rel > -mid), mid - 1, torch.abs(rel))
    log_pos = torch.ceil(torch.log(abs_pos / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    log_pos = log_pos.int()
    bucket = torch.where(abs_pos.le(mid), rel, log_pos * sign).long()
    return (bucket + bucket_size - 1).to(torch.int32)


def text_bucket_lut(bucket_size: int, max_position: int, device=None) -> torch.Tensor:
    """(2*max_position - 1,) int32: the text bucket of r = i - j stored at index r + max_position - 1."""
    return _text_lut_cpu(bucket_size, max_position).to(device)


def text_buckets(bucket_size: int, max_position: int) -> torch.Tensor:
    """OFA's full `token_rp_bucket` buffer, (max_position, max_position) int64."""
    lut = _text_lut_cpu(bucket_size, max_position).long()
    i = torch.arange(max_position)
    return lut[i[:, None] - i[None, :] + max_position - 1]


def image_bucket(id_q: torch.Tensor, id_k: torch.Tensor, n: int) -> torch.Tensor:
    """2D bucket of image position ids (broadcasting); ids are 1 + row*n + col, id 0 a special slot."""
    num = (2 * n - 1) ** 2 + 3
    rq, cq = torch.div(id_q - 1, n, rounding_mode="floor"), torch.remainder(id_q - 1, n)
    rk, ck = torch.div(id_k - 1, n, rounding_mode="floor"), torch.remainder(id_k - 1, n)
    b = (rq - rk + n - 1) * (2 * n - 1) + (cq - ck + n - 1)
    b = torch.where(id_k == 0, num - 2, b)
    b = torch.where(id_q == 0, num - 3, b)
    return torch.where((id_q == 0) & (id_k == 0), num - 1, b)


def image_buckets(n: int) -> torch.Tensor:
    """OFA's full `image_rp_bucket` buffer, (n*n + 1, n*n + 1) int64."""
    ids = torch.arange(n * n + 1)
    return image_bucket(ids[:, None], ids[None, :], n)


def num_text_buckets(bucket_size: int) -> int:
    return 2 * bucket_size - 1


def num_image_buckets(n: int) -> int:
    return (2 * n - 1) ** 2 + 3


@dataclass
class RelPos:
    """A relative-position bias described by position ids and per-layer tables (no S x S tensor)."""

    q_kind: torch.Tensor  # (B, Tq) int8: KIND_NONE / KIND_TEXT / KIND_IMAGE
    q_pos: torch.Tensor  # (B, Tq) int32: text position or image position id
    k_kind: torch.Tensor  # (B, Tk) int8
    k_pos: torch.Tensor  # (B, Tk) int32
    text_table: torch.Tensor | None  # (2*token_bucket_size - 1, H)
    image_table: torch.Tensor | None  # ((2n-1)^2 + 3, H)
    text_lut: torch.Tensor  # (2*max_positions - 1,) int32, see text_bucket_lut
    image_grid: int  # n (image_bucket_size)
    cache: dict = field(
        default_factory=dict, repr=False
    )  # shared by all layers: bucket indices depend on positions only

    def with_tables(self, text_table, image_table) -> "RelPos":
        """The same positions with another layer's tables (positions are shared across layers)."""
        return RelPos(
            self.q_kind,
            self.q_pos,
            self.k_kind,
            self.k_pos,
            text_table,
            image_table,
            self.text_lut,
            self.image_grid,
            self.cache,
        )

    @property
    def max_positions(self) -> int:
        return (self.text_lut.numel() + 1) // 2

    def buckets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Materialised (text_bucket, text_mask, image_bucket, image_mask), each (B, Tq, Tk)."""
        qp, kp = self.q_pos.long()[:, :, None], self.k_pos.long()[:, None, :]
        m = self.max_positions
        tb = self.text_lut.long()[(qp - kp).clamp(-(m - 1), m - 1) + m - 1]
        tmask = (self.q_kind[:, :, None] == KIND_TEXT) & (self.k_kind[:, None, :] == KIND_TEXT)
        ib = image_bucket(qp, kp, self.image_grid).clamp(0, num_image_buckets(self.image_grid) - 1)
        imask = (self.q_kind[:, :, None] == KIND_IMAGE) & (self.k_kind[:, None, :] == KIND_IMAGE)
        return tb, tmask, ib, imask

    def dense_bias(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The dense bias (B, H, Tq, Tk) by one gather from [text table; image table; 0; -inf], with -inf
        where `mask` (B, Tq, Tk) is True. Same values as `materialize` plus the mask; faster on CPU."""
        parts = [t for t in (self.text_table, self.image_table) if t is not None]
        off = sum(t.shape[0] for t in parts)
        key = ("index", self.text_table is not None, self.image_table is not None, off)
        if key not in self.cache:
            tb, tmask, ib, imask = self.buckets()
            idx = torch.full_like(tb, off)  # the zero row: no relative bias
            if self.text_table is not None:
                idx = torch.where(tmask, tb, idx)
            if self.image_table is not None:
                n_text = 0 if self.text_table is None else self.text_table.shape[0]
                idx = torch.where(imask, ib + n_text, idx)
            self.cache[key] = idx
        idx = self.cache[key]
        if mask is not None:
            idx = idx.masked_fill(mask, off + 1)
        table = parts[0]
        rows = torch.cat(
            parts + [table.new_zeros(1, table.shape[1]), table.new_full((1, table.shape[1]), float("-inf"))]
        )
        return _GatherBias.apply(rows, idx).transpose(0, 1)  # (H, B, Tq, Tk) -> (B, H, Tq, Tk)

    def materialize(self) -> torch.Tensor:
        """The dense bias (B, H, Tq, Tk), differentiable with respect to both tables."""
        tb, tmask, ib, imask = self.buckets()
        table = self.text_table if self.text_table is not None else self.image_table
        bias = table.new_zeros(*tb.shape, table.shape[1])
        if self.text_table is not None:
            bias = torch.where(tmask[..., None], self.text_table[tb], bias)
        if self.image_table is not None:
            bias = torch.where(imask[..., None], self.image_table[ib], bias)
        return bias.permute(0, 3, 1, 2)


class _GatherBias(torch.autograd.Function):
    """out[h, b, i, j] = rows[idx[b, i, j], h]; the backward sums per row with index_add_ (several times faster
    on CPU than the index_put that advanced indexing's backward runs)."""

    @staticmethod
    def forward(ctx, rows, idx):  # rows (N, H), idx (B, Tq, Tk) -> (H, B, Tq, Tk)
        ctx.save_for_backward(idx)
        ctx.num_rows = rows.shape[0]
        return rows.t().index_select(1, idx.flatten()).view(rows.shape[1], *idx.shape)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        grad = grad.reshape(grad.shape[0], -1)
        out = grad.new_zeros(grad.shape[0], ctx.num_rows).index_add_(1, idx.flatten(), grad)
        return out.t(), None

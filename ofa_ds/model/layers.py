"""OFA's transformer layers: pre-LN with the NormFormer extras (OFA_SPEC 1.5-1.7).

Layout is batch-first, x (B, T, D). Positions enter only through attention: the untied absolute term as
extra q/k channels (pos_q, pos_k: (B, H, T, Dh), shared by all layers of a stack) and the per-layer
relative tables, which live in the layer that uses them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ofa_ds.config import ModelConfig
from ofa_ds.kernels.attention import RelPos, fused_attention
from ofa_ds.kernels.attention.relpos import num_image_buckets, num_text_buckets


class Linear(nn.Linear):
    """nn.Linear with OFA's BERT-style init (N(0, 0.02), zero bias). The init lives in reset_parameters, which
    nn.Linear.__init__ calls, so it also holds under deepspeed.zero.Init: that partitions a module's parameters
    as soon as its __init__ returns, after which in-place inits are no-ops on empty tensors."""

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding with N(0, 0.02) rows and a zero padding row (zero.Init-safe, as Linear)."""

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=0.02)
        self._fill_padding_idx_with_zero()


class _Tie(torch.autograd.Function):
    """Two aliases of the tied weight, one for the lookups and one for the output projection, whose gradients meet
    in this node: the lookups' sparse rows are added in place into the projection's dense (V, D) gradient, and
    autograd gets that one tensor. (Left to autograd, a dense gradient arriving first and a sparse one make a new
    (V, D) tensor per lookup; two dense ones, a (V, D) block of zeros per lookup and a (V, D) sum.)"""

    @staticmethod
    def forward(ctx, weight):
        return weight.view_as(weight), weight.view_as(weight)

    @staticmethod
    def backward(ctx, lookups, output):  # sparse (V, D) rows or None; dense (V, D) or None
        if output is None:
            return None if lookups is None else lookups.to_dense()
        if lookups is None:
            return output
        if output.is_contiguous():
            return output.add_(lookups)
        return output + lookups


class SharedEmbedding(Embedding):
    """The token embedding that is also the output projection (tied): a module call either way, so that an engine
    that gathers a module's parameters around its forward (ZeRO-3) sees both uses.

    Within `tied_step()` (OFAModel.forward) both uses take the weight through one _Tie node and the lookups give
    sparse rows. Elsewhere (encode or decode alone, a pipeline's stages) and with `tie` off, every use reads the
    weight itself, densely. An engine that gathers the weight only around each call (ZeRO-3) turns `tie` off: the
    aliases, made at the step's start, would keep the weight gathered the whole step."""

    tie = True

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.aliases = None  # (the lookups' weight, the output projection's) within tied_step

    @contextlib.contextmanager
    def tied_step(self):
        if self.tie and torch.is_grad_enabled() and self.weight.requires_grad:
            self.aliases = _Tie.apply(self.weight)
        try:
            yield
        finally:
            self.aliases = None

    def forward(self, x, output: bool = False):
        lookup_weight, output_weight = self.aliases or (self.weight, self.weight)
        if output:
            return F.linear(x, output_weight)  # hidden states (B, T, D) -> logits (B, T, V)
        return F.embedding(x, lookup_weight, self.padding_idx, sparse=self.aliases is not None)


def layer_norm(d: int) -> nn.LayerNorm:
    return nn.LayerNorm(d, eps=1e-5)


def gelu(x):
    return F.gelu(x.float()).type_as(x)  # exact erf GELU in fp32, as fairseq


class DropPath(nn.Module):
    """Stochastic depth on a residual branch: one keep/drop draw per sample, survivors scaled by 1/keep."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):  # (B, T, D)
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head attention with `c_attn` head scaling. Self-attention fuses q/k/v into one GEMM;
    cross-attention projects the query and the fused key/value separately."""

    def __init__(self, cfg: ModelConfig, cross: bool = False):
        super().__init__()
        d, self.head_dim = cfg.embed_dim, cfg.head_dim
        self.scale = (cfg.head_dim * cfg.attn_scale_factor) ** -0.5
        self.backend = cfg.attn_backend
        if cross:
            self.q_proj, self.kv_proj = Linear(d, d), Linear(d, 2 * d)
        else:
            self.qkv_proj = Linear(d, 3 * d)
        self.c_attn = nn.Parameter(torch.ones(cfg.heads))
        self.out_proj = Linear(d, d)

    def _heads(self, x):  # (B, T, H*Dh) -> (B, H, T, Dh); H is this rank's share of the heads under TP
        B, T, _ = x.shape
        return x.view(B, T, -1, self.head_dim).transpose(1, 2)

    def forward(self, x, pos_q, pos_k, *, memory=None, causal=False, key_padding_mask=None, rel_pos=None):
        if memory is None:
            q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        else:
            q, (k, v) = self.q_proj(x), self.kv_proj(memory).chunk(2, dim=-1)
        # The position channels (B, H, T, Dh), shared by the stack, go in separately: fused_attention casts them to
        # q's dtype and the Triton kernels read them in place, with no concatenated copy per layer.
        o = fused_attention(
            self._heads(q),
            self._heads(k),
            self._heads(v),
            scale=self.scale,
            causal=causal,
            key_padding_mask=key_padding_mask,
            rel_pos=rel_pos,
            backend=self.backend,
            pos_q=pos_q,
            pos_k=pos_k,
        )
        o = o * self.c_attn.to(o.dtype)[None, :, None, None]  # (B, H, T, Dh)
        B, _, T, _ = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(B, T, -1))


class RelPosTables(nn.Module):
    """A layer's relative-position tables: 1D text buckets and 2D image buckets, one column per head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.text = nn.Parameter(torch.empty(num_text_buckets(cfg.token_bucket_size), cfg.heads).normal_(std=0.02))
        self.image = nn.Parameter(torch.empty(num_image_buckets(cfg.image_bucket_size), cfg.heads).normal_(std=0.02))

    def bind(self, rel_pos: RelPos) -> RelPos:
        return rel_pos.with_tables(self.text, self.image)


class FeedForward(nn.Module):
    """fc1 -> GELU -> LayerNorm over the inner width (NormFormer `ffn_layernorm`) -> fc2."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc1 = Linear(cfg.embed_dim, cfg.ffn_dim)
        self.ffn_layernorm = layer_norm(cfg.ffn_dim)
        self.fc2 = Linear(cfg.ffn_dim, cfg.embed_dim)

    def forward(self, x):
        return self.fc2(self.ffn_layernorm(gelu(self.fc1(x))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, drop_path: float):
        super().__init__()
        d = cfg.embed_dim
        self.self_attn_layer_norm, self.self_attn, self.attn_ln = layer_norm(d), Attention(cfg), layer_norm(d)
        self.final_layer_norm, self.ffn = layer_norm(d), FeedForward(cfg)
        self.rel_pos = RelPosTables(cfg)
        self.dropout, self.drop_path = nn.Dropout(cfg.dropout), DropPath(drop_path)

    def forward(self, x, pos_q, pos_k, key_padding_mask, rel_pos: RelPos):
        h = self.self_attn(
            self.self_attn_layer_norm(x),
            pos_q,
            pos_k,
            key_padding_mask=key_padding_mask,
            rel_pos=self.rel_pos.bind(rel_pos),
        )
        x = x + self.drop_path(self.dropout(self.attn_ln(h)))
        return x + self.drop_path(self.dropout(self.ffn(self.final_layer_norm(x))))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, drop_path: float):
        super().__init__()
        d = cfg.embed_dim
        self.self_attn_layer_norm, self.self_attn, self.self_attn_ln = layer_norm(d), Attention(cfg), layer_norm(d)
        self.encoder_attn_layer_norm, self.encoder_attn = layer_norm(d), Attention(cfg, cross=True)
        self.cross_attn_ln = layer_norm(d)
        self.final_layer_norm, self.ffn = layer_norm(d), FeedForward(cfg)
        self.rel_pos = RelPosTables(cfg)
        self.dropout, self.drop_path = nn.Dropout(cfg.dropout), DropPath(drop_path)

    def forward(self, x, memory, self_pos, cross_pos, self_padding_mask, memory_padding_mask, rel_pos: RelPos):
        (sq, sk), (cq, ck) = self_pos, cross_pos
        h = self.self_attn(
            self.self_attn_layer_norm(x),
            sq,
            sk,
            causal=True,
            key_padding_mask=self_padding_mask,
            rel_pos=self.rel_pos.bind(rel_pos),
        )
        x = x + self.drop_path(self.dropout(self.self_attn_ln(h)))
        h = self.encoder_attn(
            self.encoder_attn_layer_norm(x), cq, ck, memory=memory, key_padding_mask=memory_padding_mask
        )
        x = x + self.drop_path(self.dropout(self.cross_attn_ln(h)))
        return x + self.drop_path(self.dropout(self.ffn(self.final_layer_norm(x))))

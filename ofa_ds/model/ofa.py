"""The OFA encoder-decoder (OFA_SPEC 1): one shared embedding for text, image codes and location bins.

    logits = OFAModel(cfg)(stream)      # stream: the batch format of DESIGN.md, logits (B, T, V)

Encoder sequence per sample: [image patches ; text tokens]; positions enter only as attention terms.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ofa_ds.config import ModelConfig
from ofa_ds.kernels.attention.relpos import KIND_IMAGE, KIND_TEXT, RelPos, text_bucket_lut
from ofa_ds.model.layers import DecoderLayer, Embedding, EncoderLayer, Linear, SharedEmbedding, layer_norm
from ofa_ds.model.resnet import OUT_CHANNELS, ResNet


class EncoderOut(NamedTuple):  # a tuple, so that ZeRO-3's module hooks see the tensors it returns
    x: torch.Tensor  # (B, S, D) after the final LayerNorm
    padding_mask: torch.Tensor  # (B, S) True = pad token or masked image patch
    pos: torch.Tensor  # (B, S, D) LayerNorm'd position embeddings, for the decoder's cross-attention term


def image_position_ids(h: int, w: int, n: int, device=None) -> torch.Tensor:
    """(h*w,) ids 1 + row*n + col of a row-major h x w patch grid (row stride n whatever w is)."""
    return (torch.arange(h, device=device)[:, None] * n + torch.arange(w, device=device)[None, :] + 1).flatten()


def decoder_image_position_ids(cfg: ModelConfig) -> torch.Tensor:
    """OFA's `image_position_idx`: 0 for the BOS, the code grid's ids, then 1024 for EOS/padding."""
    window = cfg.code_image_size // 8
    ids = torch.cat([torch.zeros(1, dtype=torch.long), image_position_ids(window, window, cfg.image_bucket_size)])
    return torch.cat([ids, torch.full((cfg.max_positions + 2 - ids.numel(),), 1024, dtype=torch.long)])


class Encoder(nn.Module):
    seq_multiple = 1  # the layers' sequence is padded (masked) to a multiple of it: sequence parallelism's split

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, n = cfg.embed_dim, cfg.image_bucket_size
        self.cfg = cfg
        self.embed_images = ResNet(cfg.resnet_layers, cfg.bn_mode)
        self.image_proj = Linear(OUT_CHANNELS, d)
        self.type_embedding = Embedding(2, d)  # row 0 text, row 1 image
        self.layernorm_embedding, self.patch_layernorm_embedding = layer_norm(d), layer_norm(d)
        self.embed_positions = Embedding(cfg.max_positions + 2, d)
        self.embed_image_positions = Embedding(n * n + 1, d)
        self.pos_ln, self.image_pos_ln = layer_norm(d), layer_norm(d)
        self.pos_q_linear, self.pos_k_linear = Linear(d, d), Linear(d, d)
        rates = torch.linspace(0, cfg.encoder_drop_path, cfg.encoder_layers, device="cpu").tolist()
        self.layers = nn.ModuleList(EncoderLayer(cfg, p) for p in rates)
        self.layer_norm = layer_norm(d)
        self.dropout = nn.Dropout(cfg.dropout)

    def embed_image(self, patch_images, patch_masks, patch_idx, image_index=None):
        """Patch embeddings (B, K, D), padding (B, K), position ids (B, K) for the kept patches. patch_images are
        an image per example, or with image_index (B,) (each example's row) the distinct images examples share,
        which the ResNet then sees once each."""
        feats = self.embed_images(patch_images)  # (N, 1024, h, w)
        _, _, h, w = feats.shape
        n = self.cfg.image_bucket_size
        if h > n or w > n:
            raise ValueError(
                f"image of {patch_images.shape[-2]}x{patch_images.shape[-1]} px gives a {h}x{w} patch "
                f"grid; the position grid allows at most {n}x{n} ({16 * n} px)"
            )
        feats = feats.flatten(2).transpose(1, 2)  # (N, P, 1024)
        if image_index is not None:
            feats = feats[image_index]  # (B, P, 1024)
        B = feats.shape[0]
        ids = image_position_ids(h, w, n, feats.device).expand(B, h * w)
        if patch_idx is not None:  # patch sampling: keep K patches per sample, with their own positions
            feats = feats.gather(1, patch_idx[:, :, None].expand(-1, -1, feats.shape[2]))
            ids = ids.gather(1, patch_idx)
        if patch_masks is None:
            patch_masks = torch.ones(B, dtype=torch.bool, device=feats.device)
        pad = (~patch_masks)[:, None].expand(B, ids.shape[1])
        x = self.image_proj(feats) + self.type_embedding(feats.new_full((), 1, dtype=torch.long))
        return self.dropout(self.patch_layernorm_embedding(x)), pad, ids

    def forward(
        self,
        embed_tokens: nn.Embedding,
        text_lut,
        src_tokens,
        patch_images=None,
        patch_masks=None,
        patch_idx=None,
        image_index=None,
    ) -> EncoderOut:
        s = self.embed(embed_tokens(src_tokens), src_tokens, patch_images, patch_masks, patch_idx, image_index)
        rel = RelPos(s.kind, s.pos_ids, s.kind, s.pos_ids, None, None, text_lut, self.cfg.image_bucket_size)
        x, pad = s.x, (s.pad if bool(s.pad.any()) else None)
        for layer in self.layers:
            x = layer(x, s.pos_q, s.pos_k, pad, rel)
        return EncoderOut(self.layer_norm(x), s.pad, s.pos)

    def embed(
        self, tokens, src_tokens, patch_images=None, patch_masks=None, patch_idx=None, image_index=None
    ) -> "EncoderIn":
        """The layers' inputs: everything before the first layer. tokens (B, L, D): src_tokens' embeddings."""
        cfg = self.cfg
        B, L = src_tokens.shape
        if L > cfg.max_positions:
            raise ValueError(f"source text of {L} tokens; the limit is max_positions={cfg.max_positions}")
        text_pos_ids = torch.arange(L, device=src_tokens.device).expand(B, L)
        text_type = self.type_embedding(src_tokens.new_zeros(()))  # (D,)
        x = self.dropout(self.layernorm_embedding(tokens + text_type))
        pad = src_tokens.eq(cfg.pad_id)
        pos = self.pos_ln(self.embed_positions(text_pos_ids[0])).expand(B, L, -1)
        kind = torch.full((B, L), KIND_TEXT, dtype=torch.int8, device=src_tokens.device)
        pos_ids = text_pos_ids
        if patch_images is not None:
            img, img_pad, ids = self.embed_image(patch_images, patch_masks, patch_idx, image_index)
            x = torch.cat([img.to(x.dtype), x], dim=1)
            pad = torch.cat([img_pad, pad], dim=1)
            pos = torch.cat([self.image_pos_ln(self.embed_image_positions(ids)), pos], dim=1)
            kind = torch.cat([torch.full_like(ids, KIND_IMAGE, dtype=torch.int8), kind], dim=1)
            pos_ids = torch.cat([ids, text_pos_ids], dim=1)
        extra = -x.shape[1] % self.seq_multiple
        if extra:  # masked positions at the end, for the sequence split
            x, pos, pos_ids, kind = (
                F.pad(t, (0, 0, 0, extra)) if t.dim() == 3 else F.pad(t, (0, extra)) for t in (x, pos, pos_ids, kind)
            )
            pad = F.pad(pad, (0, extra), value=True)
        if bool(pad.any()):
            x = x * (~pad)[..., None].to(x.dtype)
        pos_q, pos_k = heads(self.pos_q_linear(pos), cfg.head_dim), heads(self.pos_k_linear(pos), cfg.head_dim)
        return EncoderIn(x, pad, pos, pos_q, pos_k, kind, pos_ids.to(torch.int32))


class EncoderIn(NamedTuple):
    x: torch.Tensor  # (B, S, D)
    pad: torch.Tensor  # (B, S) bool
    pos: torch.Tensor  # (B, S, D) LayerNorm'd position embeddings
    pos_q: torch.Tensor  # (B, H, S, Dh) the absolute-position attention term, shared by the layers
    pos_k: torch.Tensor
    kind: torch.Tensor  # (B, S) int8 text / image, for the relative buckets
    pos_ids: torch.Tensor  # (B, S) int32


class Decoder(nn.Module):
    seq_multiple = 1  # the decoder's length must be a multiple of it (sequence parallelism's split)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, n = cfg.embed_dim, cfg.image_bucket_size
        self.cfg = cfg
        self.layernorm_embedding, self.code_layernorm_embedding = layer_norm(d), layer_norm(d)
        self.embed_positions = Embedding(cfg.max_positions + 2, d)
        self.embed_image_positions = Embedding(n * n + 1, d)
        self.pos_ln, self.image_pos_ln = layer_norm(d), layer_norm(d)
        self.self_pos_q_linear, self.self_pos_k_linear = Linear(d, d), Linear(d, d)
        self.cross_pos_q_linear, self.cross_pos_k_linear = Linear(d, d), Linear(d, d)
        rates = torch.linspace(0, cfg.decoder_drop_path, cfg.decoder_layers, device="cpu").tolist()
        self.layers = nn.ModuleList(DecoderLayer(cfg, p) for p in rates)
        self.layer_norm = layer_norm(d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.register_buffer("image_position_idx", decoder_image_position_ids(cfg), persistent=False)

    def forward(self, embed_tokens: nn.Embedding, text_lut, prev_output_tokens, enc: EncoderOut, code_masks=None):
        """Final hidden states (B, T, D). Text targets use 1D positions; image-code targets (code_masks)
        use the code grid's 2D positions, their own LayerNorms and the 2D relative table."""
        s = self.embed(embed_tokens(prev_output_tokens), prev_output_tokens, enc.pos, code_masks)
        rel = RelPos(s.kind, s.pos_ids, s.kind, s.pos_ids, None, None, text_lut, self.cfg.image_bucket_size)
        x, pad = s.x, (s.pad if bool(s.pad.any()) else None)
        for layer in self.layers:
            x = layer(x, enc.x, (s.self_q, s.self_k), (s.cross_q, s.cross_k), pad, enc.padding_mask, rel)
        return self.layer_norm(x)

    def embed(self, tokens, prev_output_tokens, enc_pos, code_masks=None) -> "DecoderIn":
        """The layers' inputs: tokens (B, T, D) are prev_output_tokens' embeddings, enc_pos the encoder's."""
        cfg = self.cfg
        B, T = prev_output_tokens.shape
        if T > cfg.max_positions:
            raise ValueError(f"decoder input of {T} tokens; the limit is max_positions={cfg.max_positions}")
        if T % self.seq_multiple:
            raise ValueError(f"decoder input of {T} tokens: sequence parallelism splits it in {self.seq_multiple}")
        dev = prev_output_tokens.device
        code = torch.zeros(B, dtype=torch.bool, device=dev) if code_masks is None else code_masks.bool()
        c = code[:, None, None]
        img_ids = self.image_position_idx[:T]
        pos = torch.where(
            c,
            self.image_pos_ln(self.embed_image_positions(img_ids)),
            self.pos_ln(self.embed_positions(torch.arange(T, device=dev))),
        )  # (B, T, D)
        x = self.dropout(torch.where(c, self.code_layernorm_embedding(tokens), self.layernorm_embedding(tokens)))
        kind = torch.where(code, KIND_IMAGE, KIND_TEXT).to(torch.int8)[:, None].expand(B, T)
        pos_ids = torch.where(code[:, None], img_ids, torch.arange(T, device=dev)).to(torch.int32)
        dh = cfg.head_dim
        return DecoderIn(
            x,
            prev_output_tokens.eq(cfg.pad_id),
            heads(self.self_pos_q_linear(pos), dh),
            heads(self.self_pos_k_linear(pos), dh),
            heads(self.cross_pos_q_linear(pos), dh),
            heads(self.cross_pos_k_linear(enc_pos), dh),
            kind,
            pos_ids,
        )


class DecoderIn(NamedTuple):
    x: torch.Tensor  # (B, T, D)
    pad: torch.Tensor  # (B, T) bool
    self_q: torch.Tensor  # (B, H, T, Dh) absolute-position terms of self- and cross-attention
    self_k: torch.Tensor
    cross_q: torch.Tensor
    cross_k: torch.Tensor  # (B, H, S, Dh)
    kind: torch.Tensor  # (B, T) int8
    pos_ids: torch.Tensor  # (B, T) int32


def heads(x, head_dim: int):  # (B, T, H*Dh) -> (B, H, T, Dh); H: this rank's heads under TP
    B, T, _ = x.shape
    return x.view(B, T, -1, head_dim).transpose(1, 2)


class OFAModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = SharedEmbedding(cfg.vocab_size, cfg.embed_dim, padding_idx=cfg.pad_id)  # tied in and out
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.register_buffer("text_lut", text_bucket_lut(cfg.token_bucket_size, cfg.max_positions), persistent=False)

    def encode(self, src_tokens, patch_images=None, patch_masks=None, patch_idx=None, image_index=None) -> EncoderOut:
        return self.encoder(
            self.embed_tokens, self.text_lut, src_tokens, patch_images, patch_masks, patch_idx, image_index
        )

    def decode(self, prev_output_tokens, enc: EncoderOut, code_masks=None):
        x = self.decoder(self.embed_tokens, self.text_lut, prev_output_tokens, enc, code_masks)
        return self.embed_tokens(x, output=True)  # (B, T, V)

    def forward(self, stream: dict) -> torch.Tensor:
        tied = self.embed_tokens.tied_step() if isinstance(self.embed_tokens, SharedEmbedding) else nullcontext()
        with tied:  # the tied weight's gradient made once (TP's vocabulary-parallel embedding has its own)
            enc = self.encode(
                stream["src_tokens"],
                stream.get("patch_images"),
                stream.get("patch_masks"),
                stream.get("patch_idx"),
                stream.get("image_index"),
            )
            return self.decode(stream["prev_output_tokens"], enc, stream.get("code_masks"))

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs in which the module's forward reads a parameter it does not own: each layer's
        relative-position tables, which the layer hands to its attention. Every other parameter is read inside its
        own module's forward, so a partitioning engine (ZeRO-3) that gathers a module's parameters around its
        forward needs to be told of these alone (engine.build_model registers them)."""
        layers = [*self.encoder.layers, *self.decoder.layers]
        return [(layer, p) for layer in layers for p in layer.rel_pos.parameters()]

    def num_parameters(self) -> int:
        """Learnable parameters, the tied embedding counted once (as OFA's published counts)."""
        return sum(p.numel() for p in self.parameters())

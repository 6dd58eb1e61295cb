"""Training FLOPs of one OFA step, from the model config and the batch shapes alone.

Counts what `torch.utils.flop_counter` counts: matmuls and convolutions (2 FLOPs per multiply-add), not
norms, softmax, activations or gathers. A training step is forward + backward; backward costs twice the
forward (input and weight gradients) except for the stem convolution, whose input (the image) needs no
gradient. Recomputation is not counted: this is the "model FLOPs" of MFU. The ResNet counts once per image it
runs on: examples that share an image (a VL row's two) share its ResNet pass.

Attention counts the full (B, H, Tq, Tk) score matrix, causal or not, with q/k widened by the absolute-
position channels (`[q, q_pos] . [k, k_pos]`: 2 * head_dim per head).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ofa_ds.config import ModelConfig
from ofa_ds.data.collate import distinct_images

RESNET_OUT = 1024
PATCH = 16


class StreamShape(NamedTuple):
    batch: int
    image_size: int  # R of the (B, 3, R, R) images
    patches: int  # image tokens per sample entering the encoder (K when patches are sampled)
    src_len: int  # L
    tgt_len: int  # T
    images: int | None = None  # images the ResNet runs on (distinct ones shared by examples); None: one per example


def stream_shape(stream: dict) -> StreamShape:
    """Of a loader Stream (uint8 images: the ResNet will run on its `distinct_images`) or model inputs (float
    images, each of which the ResNet runs on: an image per example, or model_inputs' distinct images)."""
    images = stream["patch_images"]
    b, r = stream["src_tokens"].shape[0], images.shape[-1]
    n = distinct_images(stream)[0].shape[0] if images.dtype == torch.uint8 else images.shape[0]
    idx = stream.get("patch_idx")
    patches = idx.shape[1] if idx is not None else (r // PATCH) ** 2
    return StreamShape(b, r, patches, stream["src_tokens"].shape[1], stream["prev_output_tokens"].shape[1], n)


def _conv(cin: int, cout: int, k: int, out_hw: int) -> int:
    return 2 * cin * cout * k * k * out_hw * out_hw


def _out(n: int, k: int, stride: int) -> int:
    return (n + 2 * (k // 2) - k) // stride + 1


def resnet_flops(layers: tuple[int, int, int], image_size: int) -> tuple[int, int]:
    """Forward FLOPs per image: (stem conv, everything else)."""
    h = _out(image_size, 7, 2)
    stem = _conv(3, 64, 7, h)
    h = _out(h, 3, 2)  # max pool
    rest, cin = 0, 64
    for stage, (n, width) in enumerate(zip(layers, (64, 128, 256))):
        for b in range(n):
            stride = 2 if (b == 0 and stage > 0) else 1
            cout, h_out = 4 * width, _out(h, 3, stride)
            rest += _conv(cin, width, 1, h) + _conv(width, width, 3, h_out) + _conv(width, cout, 1, h_out)
            if stride != 1 or cin != cout:
                rest += _conv(cin, cout, 1, h_out)
            cin, h = cout, h_out
    return stem, rest


def _linear(tokens: int, din: int, dout: int) -> int:
    return 2 * tokens * din * dout


def _attention(batch: int, tq: int, tk: int, d: int) -> int:
    return 2 * batch * tq * tk * (2 * d) + 2 * batch * tq * tk * d  # [q, q_pos] . [k, k_pos], then probs . v


def forward_flops(cfg: ModelConfig, s: StreamShape) -> tuple[int, int]:
    """Forward FLOPs of one stream: (stem conv, everything else)."""
    d, f, V = cfg.embed_dim, cfg.ffn_dim, cfg.vocab_size
    B, S, T = s.batch, s.patches + s.src_len, s.tgt_len
    stem, rest = resnet_flops(cfg.resnet_layers, s.image_size)
    n = B if s.images is None else s.images
    stem, fl = n * stem, n * rest
    fl += _linear(B * s.patches, RESNET_OUT, d)  # image_proj
    # encoder: absolute-position q/k projections once per stack, then the layers
    fl += 2 * _linear(B * S, d, d)
    enc_layer = _linear(B * S, d, 3 * d) + _linear(B * S, d, d) + _attention(B, S, S, d) + 2 * _linear(B * S, d, f)
    fl += cfg.encoder_layers * enc_layer
    # decoder: self (q, k) and cross (q on targets, k on encoder positions) position projections
    fl += 3 * _linear(B * T, d, d) + _linear(B * S, d, d)
    self_attn = _linear(B * T, d, 3 * d) + _linear(B * T, d, d) + _attention(B, T, T, d)
    cross_attn = _linear(B * T, d, d) + _linear(B * S, d, 2 * d) + _linear(B * T, d, d) + _attention(B, T, S, d)
    fl += cfg.decoder_layers * (self_attn + cross_attn + 2 * _linear(B * T, d, f))
    fl += _linear(B * T, d, V)  # tied output projection
    return stem, fl


def train_flops(cfg: ModelConfig, streams: list[StreamShape]) -> int:
    """FLOPs of forward + backward over the given streams (e.g. every v1/v2 of a step, on every rank)."""
    total = 0
    for s in streams:
        stem, rest = forward_flops(cfg, s)
        total += 2 * stem + 3 * rest
    return total


__all__ = ["StreamShape", "stream_shape", "resnet_flops", "forward_flops", "train_flops"]

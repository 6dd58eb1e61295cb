"""DeepSpeed pipeline parallelism for OFA: the model as a sequence of stage layers (deepspeed.pipe).

    module = pipeline_module(model, groups, loss_fn, partition="parameters")   # a deepspeed.pipe.PipelineModule

The layers, in order; each takes the previous one's output tuple:

    0        token embedding (tied)  -> embeddings of the source and of the decoder input, plus the raw inputs
    1        encoder input           -> x, padding, positions and their attention terms, decoder inputs carried
    2 ..     encoder layers          (the last one applies the encoder's final LayerNorm and drops what only the
                                      encoder uses)
    .        decoder input           -> x, memory, padding, the position terms of self- and cross-attention
    .. ..    decoder layers          (the last one applies the decoder's final LayerNorm and returns x alone)
    last     token embedding (tied)  -> logits; the loss function handed in by the engine turns them into the loss

The token embedding is a TiedLayerSpec: the first and last stages each hold it and DeepSpeed sums its gradients
between them. Floats that cross a stage boundary all reach a later use (DeepSpeed asserts each gets a gradient);
masks and ids cross as bool / int tensors. Each stage layer holds the plain model's own modules (built whole and,
under TP, sliced first) under their names in the plain model, so `source_name` maps a pipeline parameter back to
the plain model's name (export), and the stage layers run the model's own code (Encoder.embed, Decoder.embed, the
layers).
A rank keeps only its stage's layers; the rest of the model is freed once the pipeline module exists.
"""

from __future__ import annotations

import torch
from torch import nn

from ofa_ds.config import ModelConfig
from ofa_ds.kernels.attention.relpos import RelPos
from ofa_ds.model.ofa import Decoder, Encoder, OFAModel
from ofa_ds.parallel.groups import Groups

NO_PATCH_SAMPLE = -1  # patch_idx (B, 1) filled with it: the stream keeps every patch (the pipeline needs tensors)


def _boundary(*tensors) -> tuple:
    """A stage layer's outputs as they cross to the next stage: contiguous (point-to-point sends need it)."""
    return tuple(t.contiguous() for t in tensors)


class TokenEmbedding(nn.Module):
    """The tied token embedding (the model's embed_tokens): a lookup on the first stage (its forward; DeepSpeed
    saves the tied weight with the layer whose forward is the module's own), the output projection on the last."""

    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, inputs):
        src_tokens, patch_images, patch_masks, patch_idx, image_index, prev_output_tokens, code_masks = inputs
        return _boundary(self.embed(src_tokens), self.embed(prev_output_tokens), *inputs)


def output_logits(tied: TokenEmbedding, x):
    return tied.embed(x, output=True)  # (B, T, D) -> (B, T, V) (this rank's vocabulary share under TP)


class EncoderInput(nn.Module):
    """The encoder's modules before its first layer, under their names in Encoder, running Encoder.embed."""

    embed = Encoder.embed
    embed_image = Encoder.embed_image

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.cfg, self.seq_multiple = encoder.cfg, encoder.seq_multiple
        for name, m in encoder.named_children():
            if name not in ("layers", "layer_norm"):
                setattr(self, name, m)

    def forward(self, inputs):
        src, tgt, src_tokens, patch_images, patch_masks, patch_idx, image_index, prev_output_tokens, code_masks = inputs
        sample = None if bool((patch_idx == NO_PATCH_SAMPLE).all()) else patch_idx
        s = self.embed(src, src_tokens, patch_images, patch_masks, sample, image_index)
        return _boundary(s.x, s.pad, s.pos, s.pos_q, s.pos_k, s.kind, s.pos_ids, tgt, prev_output_tokens, code_masks)


class EncoderLayer(nn.Module):
    """One encoder layer; the last also applies the encoder's final LayerNorm (`final`)."""

    def __init__(self, layer: nn.Module, text_lut: torch.Tensor, image_bucket_size: int, final: nn.Module | None):
        super().__init__()
        self.layer, self.final, self.bucket = layer, final, image_bucket_size
        self.register_buffer("text_lut", text_lut, persistent=False)

    def forward(self, state):
        x, pad, pos, pos_q, pos_k, kind, pos_ids, *decoder_inputs = state
        rel = RelPos(kind, pos_ids, kind, pos_ids, None, None, self.text_lut, self.bucket)
        x = self.layer(x, pos_q, pos_k, pad if bool(pad.any()) else None, rel)
        if self.final is None:
            return _boundary(x, pad, pos, pos_q, pos_k, kind, pos_ids, *decoder_inputs)
        return _boundary(self.final(x), pad, pos, *decoder_inputs)


class DecoderInput(nn.Module):
    """The decoder's modules before its first layer, under their names in Decoder, running Decoder.embed."""

    embed = Decoder.embed

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.cfg, self.seq_multiple = decoder.cfg, decoder.seq_multiple
        for name, m in decoder.named_children():
            if name not in ("layers", "layer_norm"):
                setattr(self, name, m)
        self.register_buffer("image_position_idx", decoder.image_position_idx, persistent=False)

    def forward(self, state):
        memory, memory_pad, enc_pos, tgt, prev_output_tokens, code_masks = state
        s = self.embed(tgt, prev_output_tokens, enc_pos, code_masks)
        return _boundary(s.x, memory, memory_pad, s.self_q, s.self_k, s.cross_q, s.cross_k, s.pad, s.kind, s.pos_ids)


class DecoderLayer(nn.Module):
    """One decoder layer; the last also applies the decoder's final LayerNorm and returns the hidden states alone."""

    def __init__(self, layer: nn.Module, text_lut: torch.Tensor, image_bucket_size: int, final: nn.Module | None):
        super().__init__()
        self.layer, self.final, self.bucket = layer, final, image_bucket_size
        self.register_buffer("text_lut", text_lut, persistent=False)

    def forward(self, state):
        x, memory, memory_pad, sq, sk, cq, ck, pad, kind, pos_ids = state
        rel = RelPos(kind, pos_ids, kind, pos_ids, None, None, self.text_lut, self.bucket)
        x = self.layer(x, memory, (sq, sk), (cq, ck), pad if bool(pad.any()) else None, memory_pad, rel)
        if self.final is None:
            return _boundary(x, memory, memory_pad, sq, sk, cq, ck, pad, kind, pos_ids)
        return self.final(x)


def layer_prefixes(cfg: ModelConfig) -> list[str]:
    """Each pipeline layer's prefix in the plain model, in order (the two tied ones are "")."""
    enc = [f"encoder.layers.{i}." for i in range(cfg.encoder_layers)]
    dec = [f"decoder.layers.{i}." for i in range(cfg.decoder_layers)]
    return ["", "encoder.", *enc, "decoder.", *dec, ""]


def layer_specs(model: OFAModel) -> list:
    """The pipeline's layer specs over the model's modules (in the order of layer_prefixes)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    cfg, lut = model.cfg, model.text_lut
    enc, dec = model.encoder, model.decoder
    tied = dict(tied_weight_attr="embed.weight")
    specs = [TiedLayerSpec("embed", TokenEmbedding, model.embed_tokens, **tied), LayerSpec(EncoderInput, enc)]
    for i, layer in enumerate(enc.layers):
        final = enc.layer_norm if i == len(enc.layers) - 1 else None
        specs.append(LayerSpec(EncoderLayer, layer, lut, cfg.image_bucket_size, final))
    specs.append(LayerSpec(DecoderInput, dec))
    for i, layer in enumerate(dec.layers):
        final = dec.layer_norm if i == len(dec.layers) - 1 else None
        specs.append(LayerSpec(DecoderLayer, layer, lut, cfg.image_bucket_size, final))
    specs.append(TiedLayerSpec("embed", TokenEmbedding, model.embed_tokens, forward_fn=output_logits, **tied))
    return specs


TIED = "tied_modules.embed."


def source_name(name: str, prefixes: list[str]) -> str:
    """A pipeline module's parameter or buffer name ("7.layer.fc1.weight", "tied_modules.embed.embed.weight")
    -> the plain model's ("encoder.layers.5.fc1.weight", "embed_tokens.weight")."""
    if name.startswith(TIED):
        return "embed_tokens." + name[len(TIED + "embed.") :]
    index, _, rest = name.partition(".")
    prefix = prefixes[int(index)]
    if rest.startswith("final."):
        return prefix.split("layers.")[0] + "layer_norm." + rest[len("final.") :]
    if rest.startswith("layer."):
        return prefix + rest[len("layer.") :]
    return prefix + rest


def pipeline_module(model: OFAModel, groups: Groups, loss_fn, partition: str, checkpoint_interval: int = 0):
    """The deepspeed.pipe.PipelineModule of `model` for this layout (TP fastest, then DP, then PP)."""
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    specs = layer_specs(model)
    topology = PipeModelDataParallelTopology(num_pp=groups.pp_size, num_mp=groups.tp_size, num_dp=groups.dp_size)
    return PipelineModule(
        specs,
        topology=topology,
        loss_fn=loss_fn,
        partition_method=partition,
        activation_checkpoint_interval=checkpoint_interval,
        dynamic_shape=True,
    )


def stream_inputs(x: dict) -> tuple:
    """A stream (model_inputs: distinct images and image_index) as the first stage's input tuple; a stream without
    patch sampling gets the NO_PATCH_SAMPLE placeholder."""
    idx = x.get("patch_idx")
    if idx is None:
        src = x["src_tokens"]
        idx = torch.full((src.shape[0], 1), NO_PATCH_SAMPLE, dtype=torch.long, device=src.device)
    return (
        x["src_tokens"],
        x["patch_images"],
        x["patch_masks"],
        idx,
        x["image_index"],
        x["prev_output_tokens"],
        x["code_masks"],
    )


__all__ = [
    "NO_PATCH_SAMPLE",
    "TokenEmbedding",
    "EncoderInput",
    "EncoderLayer",
    "DecoderInput",
    "DecoderLayer",
    "layer_prefixes",
    "layer_specs",
    "source_name",
    "pipeline_module",
    "stream_inputs",
]

"""Megatron sequence parallelism over the tensor-parallel group, applied to the (tensor-parallel) model in one place.

    apply(model, groups)    # called by tensor.parallelize when parallel.sequence_parallel is set

Between the tensor-parallel regions of a layer (the LayerNorms, dropout, drop-path and residual adds, and the
encoder's output) each TP rank holds only its 1/T of the sequence, x (B, S / T, D), instead of the whole of it:
the column-parallel projections all-gather their input over the group and the row-parallel ones reduce-scatter
their output (megatron-core's linears with `sequence_parallel`, fed sequence-first), so activation memory outside
attention and the FFN's inner width falls by T for the same communication volume as TP alone.

- The layers' input is split at the first layer of each stack and the decoder's output gathered after its final
  LayerNorm (forward hooks), so the output projection and the loss see the whole sequence. The encoder's output
  stays split: every decoder layer's cross-attention key/value projection gathers it.
- The encoder pads its sequence (patches and text) to a multiple of T with masked positions (Encoder.seq_multiple);
  the decoder's length is the loader's, a multiple of 8, which T must divide (ParallelConfig.check).
- A parameter used on the split activations (the layers' LayerNorms, the row-parallel biases, the stacks' final
  LayerNorms) gets only its rank's tokens' share of the gradient; a gradient hook sums it over the group before
  the engine sees it (Megatron's all-reduce of `sequence_parallel` gradients).
- Dropout on a split activation draws the mask of the whole sequence on every rank of the group (their random
  streams move in step) and keeps its own slice: the masks are those of the unsplit model.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import nn

from ofa_ds.parallel.groups import Groups

# parameters read on split activations: replicated ones inside the layers, and the stacks' final LayerNorms
SPLIT_REGION = re.compile(r"^(encoder|decoder)\.(layers\.\d+\.|layer_norm\.)")


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim)


class _Split(torch.autograd.Function):
    """x (B, S, D) -> this rank's (B, S / T, D); the gradient all-gathered back (every rank's slice of it)."""

    @staticmethod
    def forward(ctx, x, rank, size, group):
        ctx.group = group
        return x.chunk(size, 1)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad):
        return _gather(grad, 1, ctx.group), None, None, None


class _Gather(torch.autograd.Function):
    """(B, S / T, D) slices -> the whole (B, S, D) on every rank; the gradient's own slice kept (what follows is
    tensor-parallel with an all-reduced input gradient, so every rank holds the whole gradient already)."""

    @staticmethod
    def forward(ctx, x, rank, size, group):
        ctx.rank, ctx.size = rank, size
        return _gather(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(ctx.size, 1)[ctx.rank].contiguous(), None, None, None


class SplitDropout(nn.Module):
    """Dropout of a split activation x (B, S / T, D): the whole sequence's mask is drawn, this rank's slice used."""

    def __init__(self, p: float, rank: int, size: int):
        super().__init__()
        self.p, self.rank, self.size = p, rank, size

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        B, S, D = x.shape
        mask = x.new_empty(B, S * self.size, D).bernoulli_(keep).chunk(self.size, 1)[self.rank]
        return x * mask / keep


def _sum_gradient(group):
    def hook(grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad

    return hook


def apply(model: nn.Module, groups: Groups) -> None:
    t, rank, group = groups.tp_size, groups.tp_rank, groups.tp_group
    model.encoder.seq_multiple = model.decoder.seq_multiple = t

    def split(_module, args):
        return (_Split.apply(args[0], rank, t, group), *args[1:])

    def gather(_module, _args, out):
        return _Gather.apply(out, rank, t, group)

    model.encoder.layers[0].register_forward_pre_hook(split)
    model.decoder.layers[0].register_forward_pre_hook(split)
    model.decoder.layer_norm.register_forward_hook(gather)
    for layer in [*model.encoder.layers, *model.decoder.layers]:
        layer.dropout = SplitDropout(layer.dropout.p, rank, t)
    for name, p in model.named_parameters():
        if SPLIT_REGION.match(name) and not getattr(p, "tensor_model_parallel", False):
            p.register_hook(_sum_gradient(group))
            p.sequence_parallel = True  # Megatron's mark


__all__ = ["SPLIT_REGION", "SplitDropout", "apply"]

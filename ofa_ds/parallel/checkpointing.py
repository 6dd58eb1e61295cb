"""Activation checkpointing of the encoder and decoder layers, applied to the plain model in one place.

    apply(model, every)     # every K-th layer of each stack (K = 1: all) keeps only its inputs in the forward

A checkpointed layer runs its forward under DeepSpeed's activation checkpointing, which saves the random state of
the forward and restores it for the recompute in the backward, so dropout and drop-path draw the same masks twice.
The forward and the recompute are each one module call, so ZeRO-3 gathers the layer's parameters around both. It
works in every layout: pipeline stages call the same layer modules.
"""

from __future__ import annotations

import torch
from torch import nn


def every(setting: str) -> int:
    """train.activation_checkpointing -> K (0: none): "none", "layers" (K = 1) or "every_K"."""
    if setting == "none":
        return 0
    if setting == "layers":
        return 1
    return int(setting[len("every_") :])


def apply(model: nn.Module, k: int) -> None:
    if k <= 0:
        return
    for stack in (model.encoder.layers, model.decoder.layers):
        for i, layer in enumerate(stack):
            if i % k == 0:
                _checkpointed(layer)


def _flatten(args) -> tuple[list, list]:
    """Tuples among the arguments (the decoder's position terms) spread out, so that every tensor is an argument
    of the checkpointed function and gets its gradient; `spec` rebuilds them."""
    flat, spec = [], []
    for a in args:
        if isinstance(a, tuple):
            flat.extend(a)
            spec.append(len(a))
        else:
            flat.append(a)
            spec.append(None)
    return flat, spec


def _unflatten(flat, spec) -> list:
    args, i = [], 0
    for n in spec:
        if n is None:
            args.append(flat[i])
            i += 1
        else:
            args.append(tuple(flat[i : i + n]))
            i += n
    return args


def _checkpointed(layer: nn.Module) -> None:
    """The layer's calls run under DeepSpeed's (reentrant) activation checkpointing: the recompute and its backward
    run inside the layer's backward, while ZeRO-3 holds the layer's parameters gathered (the non-reentrant form
    recomputes where ZeRO-3 has released them). The layer becomes an instance of a subclass whose __call__ wraps
    the module call itself, so each run (the forward, the recompute) is one module call with its ZeRO-3 hooks, as
    Megatron-DeepSpeed checkpoints its layers; names and state dicts do not change. A reentrant recompute hands
    ZeRO its gradients in a backward of its own, so the trainer runs one backward per stream (engine.train_step)."""
    cls = type(layer)
    layer.__class__ = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": _checkpointed_call})


def _checkpointed_call(self, *args):
    from deepspeed import checkpointing

    if not (self.training and torch.is_grad_enabled()):
        return nn.Module.__call__(self, *args)
    flat, spec = _flatten(args)
    return checkpointing.checkpoint(lambda *f: nn.Module.__call__(self, *_unflatten(f, spec)), *flat)


__all__ = ["every", "apply"]

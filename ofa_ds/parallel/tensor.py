"""Megatron tensor parallelism, applied to the plain OFA model in one place.

    parallelize(model, groups)      # in place, after building the full model: each rank keeps its share
    nll = token_nll(logits, target, pad)   # the vocabulary-parallel cross-entropy over this rank's logits

SPLITS is the whole plan: which parameters are split, along which dimension, and in how many blocks (a fused q/k/v
weight is three blocks, each split by heads, so that a rank's q, k and v of its heads sit together). Linears split
along their output are megatron-core's ColumnParallelLinear, along their input its RowParallelLinear; the attention
head scales `c_attn` and the relative-position tables keep their rank's heads; `ffn_layernorm` normalises over an FFN
width split across the ranks, so it reduces its mean and variance over them; the tied token embedding is split by
vocabulary, padded to a multiple of 128 x T rows whose logits are never chosen and never in the loss. Everything
else (ResNet, embeddings' LayerNorms, position embeddings) is replicated: its inputs and gradients are identical
on the ranks of a TP group, so it stays identical.

The full model is built first on every rank from the same seed and then sliced (megatron's CPU initialisation
does the same), so TP=N starts from TP=1's weights. `shard` and `unshard` are the same plan for checkpoints.
With parallel.sequence_parallel, the layers' linears take megatron-core's sequence-parallel form and
sequence.apply splits the sequence between them.
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn.functional as F
from torch import nn

from ofa_ds.parallel import sequence
from ofa_ds.parallel.groups import Groups, parallel_state

# (parameter name pattern, split dimension, blocks)
SPLITS = (
    (r"\.qkv_proj\.(weight|bias)$", 0, 3),
    (r"\.kv_proj\.(weight|bias)$", 0, 2),
    (r"\.q_proj\.(weight|bias)$", 0, 1),
    (r"pos_[qk]_linear\.(weight|bias)$", 0, 1),  # shared position q/k projections, by heads
    (r"\.out_proj\.weight$", 1, 1),
    (r"\.c_attn$", 0, 1),
    (r"\.rel_pos\.(text|image)$", 1, 1),  # (buckets, heads)
    (r"\.fc1\.(weight|bias)$", 0, 1),
    (r"\.ffn_layernorm\.(weight|bias)$", 0, 1),
    (r"\.fc2\.weight$", 1, 1),
    (r"^embed_tokens\.weight$", 0, 1),  # vocabulary
)
VOCAB = "embed_tokens.weight"
VOCAB_MULTIPLE = 128  # per TP rank, as Megatron's make-vocab-size-divisible-by


def split_of(name: str) -> tuple[int, int] | None:
    """(dimension, blocks) of a split parameter, None for a replicated one."""
    for pattern, dim, blocks in SPLITS:
        if re.search(pattern, name):
            return dim, blocks
    return None


def padded_vocab(vocab_size: int, tp: int) -> int:
    m = VOCAB_MULTIPLE * tp
    return -(-vocab_size // m) * m


def shard(name: str, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """This rank's share of the full tensor `name` (the vocabulary padded with zero rows first)."""
    spec = split_of(name)
    if spec is None or tp == 1:
        return full
    dim, blocks = spec
    if name == VOCAB:
        full = F.pad(full, (0, 0, 0, padded_vocab(full.shape[0], tp) - full.shape[0]))
    return torch.cat([block.chunk(tp, dim)[rank] for block in full.chunk(blocks, dim)], dim)


def unshard(name: str, parts: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """The full tensor from every rank's share, in rank order (the vocabulary's padding removed)."""
    spec = split_of(name)
    if spec is None or len(parts) == 1:
        return parts[0] if name != VOCAB else parts[0][:vocab_size]
    dim, blocks = spec
    split = [p.chunk(blocks, dim) for p in parts]
    full = torch.cat([torch.cat([s[b] for s in split], dim) for b in range(blocks)], dim)
    return full[:vocab_size] if name == VOCAB else full


# ---------------------------------------------------------------------------------------------------- layers


def _megatron_layers():
    parallel_state()  # megatron-core imported quietly
    from megatron.core import tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    if not torch.cuda.is_available():
        _allocate_on_cpu()
    return tensor_parallel, ModelParallelConfig


class _CPUCuda:
    """torch.cuda for megatron-core on a machine without CUDA: its gathers and buffers allocate on
    `torch.cuda.current_device()`, here the CPU; everything else is torch.cuda's."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return torch.device("cpu")


class _CPUTorch:
    cuda = _CPUCuda()

    def __getattr__(self, name):
        return getattr(torch, name)


def _allocate_on_cpu() -> None:
    """megatron-core's modules that allocate communication buffers see _CPUTorch as their `torch` (megatron-core
    itself is unchanged, and nothing outside it sees a difference)."""
    import sys

    for name in (
        "megatron.core.tensor_parallel.mappings",
        "megatron.core.tensor_parallel.layers",
        "megatron.core.utils",
    ):
        module = sys.modules[name]
        if not isinstance(module.torch, _CPUTorch):
            module.torch = _CPUTorch()


def _plain_output(cls):
    """A megatron-core linear that returns its output alone (they return (output, bias)) and keeps the plain
    Linear's state-dict keys (they add an empty `_extra_state` for Transformer Engine, and a load hook that
    expects it)."""

    class Plain(cls):
        get_extra_state = nn.Module.get_extra_state
        set_extra_state = nn.Module.set_extra_state

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._load_state_dict_pre_hooks.clear()

        def forward(self, x):
            if not self.sequence_parallel:
                return super().forward(x)[0]
            # megatron-core splits and gathers the sequence along the first dimension: sequence-first inside
            return super().forward(x.transpose(0, 1).contiguous())[0].transpose(0, 1)

    Plain.__name__ = Plain.__qualname__ = cls.__name__
    return Plain


class _SumOverGroup(torch.autograd.Function):
    """A sum over the group whose gradient is also summed: each rank's output feeds a different slice downstream,
    so each holds only its share of the gradient. (megatron's reduce_from_tensor_model_parallel_region passes the
    gradient through unchanged, right only when everything downstream is replicated.)"""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        torch.distributed.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class ParallelLayerNorm(nn.Module):
    """LayerNorm over a width split across the TP group: x (..., n / T) is this rank's slice. The mean and variance
    are sums over all ranks' slices (two passes, as the unsplit LayerNorm), reduced in the forward and, for the
    gradient, in the backward."""

    def __init__(self, width: int, local: int, eps: float, group):
        super().__init__()
        self.width, self.eps, self.group = width, eps, group
        self.weight = nn.Parameter(torch.ones(local))
        self.bias = nn.Parameter(torch.zeros(local))

    def forward(self, x):  # (..., n / T)
        x32 = x.float()
        mean = _SumOverGroup.apply(x32.sum(-1, keepdim=True), self.group) / self.width
        c = x32 - mean
        var = _SumOverGroup.apply((c * c).sum(-1, keepdim=True), self.group) / self.width
        y = c * torch.rsqrt(var + self.eps) * self.weight.float() + self.bias.float()
        return y.to(x.dtype)


class VocabParallelEmbedding(nn.Module):
    """The tied token embedding split by vocabulary: rows [start, start + V_padded / T) on this rank. As input, a
    lookup of the rank's rows summed over the group; as output, this rank's logits (B, T, V_padded / T), with the
    padding rows' logits at the dtype's minimum."""

    def __init__(self, vocab_size: int, dim: int, padding_idx: int, rank: int, tp: int, group):
        super().__init__()
        per = padded_vocab(vocab_size, tp) // tp
        self.vocab_size, self.start, self.group = vocab_size, rank * per, group
        self.weight = nn.Parameter(torch.zeros(per, dim))
        local_pad = padding_idx - self.start
        self.padding_idx = local_pad if 0 <= local_pad < per else None
        self.register_buffer(
            "padding_columns", torch.arange(self.start, self.start + per) >= vocab_size, persistent=False
        )

    def forward(self, x, output: bool = False):
        tensor_parallel, _ = _megatron_layers()
        if output:  # hidden states (B, T, D) -> this rank's logits (B, T, V_padded / T)
            x = tensor_parallel.copy_to_tensor_model_parallel_region(x, group=self.group)
            logits = F.linear(x, self.weight)
            return logits.masked_fill(self.padding_columns, torch.finfo(logits.dtype).min)
        outside = (x < self.start) | (x >= self.start + self.weight.shape[0])
        e = F.embedding((x - self.start).masked_fill(outside, 0), self.weight, padding_idx=self.padding_idx)
        e = e.masked_fill(outside[..., None], 0.0)
        return tensor_parallel.reduce_from_tensor_model_parallel_region(e, group=self.group)


def token_nll(logits: torch.Tensor, target: torch.Tensor, pad: int) -> torch.Tensor:
    """-log p(target) per token, fp32, 0 at pad targets, from this rank's vocabulary share of the logits:
    (B, T, V_padded / T), (B, T) -> (B, T), the same on every rank of the TP group."""
    tensor_parallel, _ = _megatron_layers()
    nll = tensor_parallel.vocab_parallel_cross_entropy(logits.float().clone(), target)
    return nll.masked_fill(target.eq(pad), 0.0)


# ---------------------------------------------------------------------------------------------------- the step


def parallelize(model: nn.Module, groups: Groups) -> nn.Module:
    """Replace, in place, every module that SPLITS names by its tensor-parallel form holding this rank's share of
    the module's current (full) weights. Parameter names do not change."""
    t, rank = groups.tp_size, groups.tp_rank
    if t == 1:
        return model
    tensor_parallel, ModelParallelConfig = _megatron_layers()
    # Weights are copied from the full model below: megatron-core allocates on the CPU and initialises nothing.
    mp = ModelParallelConfig(
        tensor_model_parallel_size=t,
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
    )
    sp = groups.layout.sequence_parallel
    # the layers' projections work on the split sequence under sequence parallelism; the position projections
    # (the embeddings' side, whole sequence) never do
    mp_layers = dataclasses.replace(mp, sequence_parallel=sp)
    column = _plain_output(tensor_parallel.ColumnParallelLinear)
    row = _plain_output(tensor_parallel.RowParallelLinear)
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def replacement(name: str, m: nn.Module):
        spec = split_of(f"{name}.weight")
        if spec is None:
            return None
        if name == "embed_tokens":
            return VocabParallelEmbedding(m.num_embeddings, m.embedding_dim, m.padding_idx, rank, t, groups.tp_group)
        if isinstance(m, nn.LayerNorm):
            return ParallelLayerNorm(m.normalized_shape[0], m.normalized_shape[0] // t, m.eps, groups.tp_group)
        dim, blocks = spec
        config = mp_layers if ".layers." in f".{name}" else mp
        if dim == 0:
            return column(
                m.in_features,
                m.out_features,
                config=config,
                init_method=nn.init.zeros_,
                bias=m.bias is not None,
                stride=blocks,
                tp_group=groups.tp_group,
            )
        return row(
            m.in_features,
            m.out_features,
            config=config,
            init_method=nn.init.zeros_,
            bias=m.bias is not None,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=groups.tp_group,
        )

    for name, m in list(model.named_modules()):
        new = replacement(name, m) if name else None
        if new is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    with torch.no_grad():
        for name, p in model.named_parameters():  # every one: a new module's replicated bias needs its values too
            local = shard(name, full[name], rank, t)
            if p.shape != local.shape:  # a bare parameter (c_attn, relative tables): a new one of the local shape
                parent, _, leaf = name.rpartition(".")
                p = nn.Parameter(local.clone())
                setattr(model.get_submodule(parent), leaf, p)
            else:
                p.copy_(local)
            spec = split_of(name)
            if spec is None:
                continue
            # megatron's marks (its layers set some): DeepSpeed's gradient norm counts a split parameter on every
            # TP rank, a replicated one on TP rank 0 alone
            for attr, value in (
                ("tensor_model_parallel", True),
                ("partition_dim", spec[0]),
                ("partition_stride", spec[1]),
            ):
                setattr(p, attr, value)
    if sp:
        sequence.apply(model, groups)
    return model


__all__ = [
    "SPLITS",
    "split_of",
    "padded_vocab",
    "shard",
    "unshard",
    "ParallelLayerNorm",
    "VocabParallelEmbedding",
    "token_nll",
    "parallelize",
]

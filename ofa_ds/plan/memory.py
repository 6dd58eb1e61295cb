"""Memory of one rank of a layout, before anything runs: model states as DeepSpeed 0.19.8 allocates them, and the
activations of OFA's encoder-decoder.

Model states count the parameters the most loaded rank holds: the model is built on the meta device, split by TP
as parallel/tensor.py splits it (the vocabulary padded), its pipeline layers cut into stages by DeepSpeed's
`parameters` partition (the tied embedding on the first and the last stage). Bytes per parameter held:

    precision  weights  gradients                          optimizer (AdamW)
    fp16       2        2 (16-bit) + 4 (fp32, at the step)  4 master + 8 moments
    bf16       2        4 (fp32 accumulation, configs/ds)   4 master + 8 moments
    fp32       4        4 + 4 (fp32 copy, at the step)      4 master (DeepSpeed clones it) + 8 moments

ZeRO-1 divides the optimizer and the fp32 step gradient over the data-parallel ranks, ZeRO-2 also the gradients,
ZeRO-3 also the weights; ZeRO-3 adds the largest module gathered whole (weights + gradients), as DeepSpeed's
estimator does. Offload moves the optimizer and the fp32 gradients to the host. Communication buckets come from
the DeepSpeed JSON (DeepSpeed's defaults where it is silent).

Activations are what autograd keeps from the forward to the backward, counted per layer from the layer code
(model/layers.py: LayerNorm, linear and attention inputs, dropout masks, the attention probabilities on the
`sdpa` path, none on the fused `triton` path), plus the ResNet's and the loss head's, plus the largest transient
of the backward (the loss head's fp32 logit gradients, or one checkpointed layer's recompute). TP divides the
head- and FFN-width terms; one stream is alive at a time (the trainer runs forward and backward per stream).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

from ofa_ds.config import ModelConfig
from ofa_ds.train.flops import RESNET_OUT, StreamShape

GIB = 2**30
WEIGHT_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}
DS_DEFAULTS = {
    "reduce_bucket_size": 5e8,
    "allgather_bucket_size": 5e8,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_param_persistence_threshold": 1e5,
}


@dataclass(frozen=True)
class Counts:
    """Parameters of the most loaded rank of a TP x PP layout, before ZeRO."""

    params: int  # that rank's parameters
    largest_module: int  # the largest module's own parameters on that rank (what ZeRO-3 gathers at once)
    buffer_bytes: int  # its registered buffers (fp32)
    total: int  # the whole model's parameters (the tied embedding once)
    sizes: tuple[int, ...] = ()  # each parameter's size on that rank (without PP: ZeRO-3 partitions them one by one)


@functools.lru_cache(maxsize=8)
def _model(cfg_json: str):
    """The model's parameter shapes by name, its pipeline layers' prefixes, modules' own parameter names and buffer
    bytes (built once on the meta device)."""
    import torch

    from ofa_ds.model.ofa import OFAModel
    from ofa_ds.parallel.pipeline import layer_prefixes

    cfg = ModelConfig.from_dict(json.loads(cfg_json))
    with torch.device("meta"):
        model = OFAModel(cfg)
    params = dict(model.named_parameters())
    modules = [
        [f"{prefix}.{n}" if prefix else n for n, _ in m.named_parameters(recurse=False)]
        for prefix, m in model.named_modules()
    ]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params, layer_prefixes(cfg), modules, buffers, model.num_parameters()


@functools.lru_cache(maxsize=256)
def _counts(cfg_json: str, tp: int, pp: int) -> Counts:
    from deepspeed.runtime.utils import partition_balanced

    from ofa_ds.parallel.tensor import shard

    params, prefixes, modules, buffers, total = _model(cfg_json)
    held = {name: shard(name, p, 0, tp).numel() for name, p in params.items()}
    per_layer = [0] * len(prefixes)
    for name, n in held.items():
        if name.startswith("embed_tokens."):  # tied: the first and the last pipeline layer
            per_layer[0] += n
            per_layer[-1] += n
            continue
        per_layer[max(i for i, pre in enumerate(prefixes) if pre and name.startswith(pre))] += n
    if pp == 1:
        most = sum(held.values())
    else:
        bounds = partition_balanced(weights=per_layer, num_parts=pp)
        most = max(sum(per_layer[bounds[s] : bounds[s + 1]]) for s in range(pp))
    largest = max(sum(held[n] for n in own) for own in modules)
    return Counts(most, largest, buffers, total, tuple(held.values()) if pp == 1 else ())


def counts(cfg: ModelConfig, tp: int = 1, pp: int = 1) -> Counts:
    return _counts(json.dumps(cfg.to_dict(), sort_keys=True), tp, pp)


def model_states(
    c: Counts, *, dp: int, zero: int, precision: str, offload: bool = False, zero_config: dict | None = None
) -> dict[str, float]:
    """Bytes per rank: params, grads, optimizer, buffers (model buffers + ZeRO-3's gathered module) and
    communication (the JSON's buckets)."""
    z = {**DS_DEFAULTS, **(zero_config or {})}
    w = WEIGHT_BYTES[precision]
    P, shard = c.params, c.params / dp
    params = w * (_zero3_weights(c, dp, z["stage3_param_persistence_threshold"]) if zero == 3 else P)
    if precision == "fp16":
        low = 2 * (shard if zero >= 2 else P)
        step = 4 * (shard if zero >= 1 else P)
        grads = low + (0 if offload else step)
    elif precision == "bf16":
        grads = 4 * (shard if zero >= 2 else P)
    else:
        grads = 4 * (shard if zero >= 2 else P) + 4 * (shard if zero >= 1 else P)
    optimizer = 0.0 if offload else 12 * (shard if zero >= 1 else P)
    if precision == "fp32" and zero == 0:
        optimizer = 8 * P  # no master copy without ZeRO
    grad_bytes = 2 if precision == "fp16" else 4
    buffers = float(c.buffer_bytes)
    if zero == 3:
        buffers += (w + grad_bytes) * c.largest_module
        communication = grad_bytes * z["reduce_bucket_size"] + w * z["stage3_prefetch_bucket_size"]
    elif zero > 0:
        communication = grad_bytes * z["reduce_bucket_size"] + w * z["allgather_bucket_size"]
    else:
        communication = 0.0
    return {
        "params": params,
        "grads": grads,
        "optimizer": optimizer,
        "buffers": buffers,
        "communication": communication,
    }


def _zero3_weights(c: Counts, dp: int, threshold: float) -> float:
    """Elements of weights a ZeRO-3 rank holds: its padded shard of every parameter, and the parameters under the
    persistence threshold whole besides (gathered once, never released)."""
    if not c.sizes:
        return c.params / dp
    return sum(-(-n // dp) + (n if n < threshold else 0) for n in c.sizes)


# ---------------------------------------------------------------------------------------------------- activations


def _resnet(layers: tuple[int, int, int], image_size: int) -> int:
    """Elements the ResNet keeps per image: conv inputs, BatchNorm inputs, ReLU outputs (max-pool indices as 2)."""
    h = (image_size + 1) // 2
    kept = 3 * image_size**2 + 2 * 64 * h * h  # image (conv1 input), bn1 input, its ReLU output
    h = (h + 1) // 2
    kept += 2 * 64 * h * h  # max-pool indices (int64)
    cin = 64
    for stage, (n, width) in enumerate(zip(layers, (64, 128, 256))):
        for b in range(n):
            stride = 2 if (b == 0 and stage > 0) else 1
            ho = (h - 1) // stride + 1
            cout = 4 * width
            kept += cin * h * h if b == 0 else 0  # the block's input (later blocks': the previous output)
            kept += 2 * width * h * h + 2 * width * ho * ho + 2 * cout * ho * ho  # bn inputs and ReLU outputs
            if stride != 1 or cin != cout:
                kept += cout * ho * ho  # the downsample's BatchNorm input
            cin, h = cout, ho
    return kept


def stream_activations(
    cfg: ModelConfig,
    s: StreamShape,
    *,
    tp: int = 1,
    precision: str = "fp32",
    attention: str = "sdpa",
    checkpoint_every: int = 0,
    layers: tuple[int, int] | None = None,
    tied: bool = True,
) -> float:
    """Peak bytes of activations of one stream's forward + backward on a rank holding `layers` (encoder, decoder)
    layers (all of them by default; the embeddings and the ResNet go with the encoder, the loss head with the
    decoder when a stack is held at all). `tied`: the plain model's tied-gradient node is on (not under TP, PP or
    ZeRO-3), so the lookups' gradients are rows, not (V, D) blocks."""
    enc_layers, dec_layers = layers or (cfg.encoder_layers, cfg.decoder_layers)
    a = WEIGHT_BYTES[precision]
    d, f, heads, V = cfg.embed_dim, cfg.ffn_dim, cfg.heads, cfg.vocab_size
    B, S, T = s.batch, s.patches + s.src_len, s.tgt_len
    H = heads / tp
    gelu = 12 if a == 4 else 8  # fc1 output (fp32 copy under 16-bit), GELU output, LayerNorm output
    probs = attention == "sdpa"  # the math path keeps (B, H, Tq, Tk) probabilities; the fused kernel does not
    # encoder layer, per token: x, ln, attn_ln input, residual, ln2 (replicated); qkv 3, scaled q 2 and k 2, o,
    # o reshaped (split); FFN width; two dropout masks (1 byte)
    enc = B * S * (a * (5 * d + 9 * d / tp + (H * S if probs else 0)) + gelu * f / tp + 2 * d)
    # decoder layer, per target token: self 3 + 9/tp, cross 3 + 5/tp, FFN 2 + width; per source token kv 2, k 2
    dec = B * T * (a * (8 * d + 14 * d / tp + (H * (T + S) if probs else 0)) + gelu * f / tp + 3 * d)
    dec += B * S * a * 4 * d / tp
    k = checkpoint_every

    def stack(n: int, full: float, inputs: float) -> tuple[float, float]:
        """(bytes kept by n layers, a recompute's bytes): every K-th layer keeps only its input."""
        ck = 0 if k <= 0 else -(-n // k)
        return ck * inputs + (n - ck) * full, full if ck else 0.0

    kept_enc, recompute_enc = stack(enc_layers, enc, B * S * a * d)
    kept_dec, recompute_dec = stack(dec_layers, dec, B * T * a * d)
    if enc_layers:
        n_img = B if s.images is None else s.images
        kept_enc += n_img * a * _resnet(cfg.resnet_layers, s.image_size)
        kept_enc += B * s.patches * a * (RESNET_OUT + 2 * d)  # image_proj input, patch LayerNorm input, output
        kept_enc += B * S * a * 6 * d  # text/image embeddings' LayerNorms, positions, final LayerNorm, memory
    logits_grad = 0.0
    if dec_layers:
        kept_dec += B * T * a * 6 * d  # embeddings' LayerNorms, positions, final LayerNorm, output projection input
        kept_dec += B * T * 4 * V / tp  # log-softmax output (fp32)
        logits_grad = B * T * (4 + (a if a != 4 else 0)) * V / tp  # its gradient (and the 16-bit logits')
    # The tied embedding's gradient: a dense (V, D) block from the loss head to the backward's end, summed into the
    # parameter's gradient then (in an update's first backward it becomes that gradient: one block less); with dense
    # lookups (not tied), two while a lookup's block of zeros is summed into it.
    emb = V / tp * d * a
    phases = (
        kept_enc + kept_dec + logits_grad + emb,  # the loss head's backward
        kept_enc + kept_dec + emb + recompute_dec,  # the decoder layers' (a checkpointed one recomputed)
        kept_enc + (1 if tied else 2) * emb,  # the decoder's embedding lookup
        kept_enc + emb + recompute_enc,  # the encoder layers'
    )
    return max(phases)


__all__ = ["GIB", "Counts", "counts", "model_states", "stream_activations", "WEIGHT_BYTES"]

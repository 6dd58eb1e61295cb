"""OFA fairseq checkpoints <-> ofa_ds state dicts, and ofa_ds safetensors files (OFA_SPEC 8).

ofa_ds keeps OFA's module names except where the layout differs:
  encoder.embed_tokens.weight (= decoder.embed_tokens = decoder.output_projection)  -> embed_tokens.weight
  *.self_attn.{q,k,v}_proj (or BART's fused in_proj_*)                              -> *.self_attn.qkv_proj
  decoder.layers.L.encoder_attn.{k,v}_proj                                          -> ...encoder_attn.kv_proj
  *.layers.L.{fc1,fc2,ffn_layernorm}                                                -> *.layers.L.ffn.{...}
  *.token_rel_pos_table_list.L.weight / image_rel_pos_table_list.L.weight           -> *.layers.L.rel_pos.{text,image}
Deterministic buffers (relative-position buckets, decoder.image_position_idx, version) are not loaded: they
are recomputed (OFA_SPEC 8.5), and regenerated when writing an OFA checkpoint. Files are read with
`torch.load(weights_only=True)` or safetensors, never plain pickle.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import torch

from ofa_ds.config import RESNET_LAYERS, ModelConfig
from ofa_ds.kernels.attention.relpos import image_buckets, text_buckets

DERIVED = re.compile(r"^(encoder|decoder)\.(version|token_rp_bucket|image_rp_bucket|image_position_idx)$")
TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight")


class CheckpointError(ValueError):
    """A checkpoint that does not fit: the message lists every missing, unexpected or mis-shaped key."""


# ---------------------------------------------------------------------------------------------
# reading files


def load_ofa_checkpoint(path: str | Path) -> dict:
    """The `model` state dict of an OFA/fairseq checkpoint file, plus its `cfg` under key `cfg` if any."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - report what the safe unpickler refused
            raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from e
    if not isinstance(ck, dict) or "model" not in ck:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (expected a dict with a 'model' state dict)")
    return ck


def ofa_model_args(ck: dict) -> dict:
    cfg = ck.get("cfg") or {}
    args = dict(cfg.get("task") or {})
    args.update(cfg.get("model") or {})
    if isinstance(ck.get("args"), argparse.Namespace):
        args = {**vars(ck["args"]), **args}
    return args


# ---------------------------------------------------------------------------------------------
# architecture from shapes


def config_from_ofa(sd: dict, args: dict | None = None) -> ModelConfig:
    """The ModelConfig of an OFA state dict, read from tensor shapes (and OFA's args where shapes are silent)."""
    args = args or {}

    def count(prefix):
        return len({int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})

    d = sd["encoder.embed_tokens.weight"].shape[1]
    blocks = tuple(count(f"encoder.embed_images.layer{s}.") for s in (1, 2, 3))
    names = [n for n, b in RESNET_LAYERS.items() if b == blocks]
    if not names:
        raise CheckpointError(f"ResNet with {blocks} blocks per stage matches none of {dict(RESNET_LAYERS)}")
    resnet = args.get("resnet_type") if args.get("resnet_type") in names else names[-1]
    text_rows = sd["encoder.token_rel_pos_table_list.0.weight"].shape[0]
    image_rows = sd["encoder.image_rel_pos_table_list.0.weight"].shape[0]
    return ModelConfig(
        name=str(args.get("arch", "ofa_converted")),
        embed_dim=d,
        ffn_dim=sd["encoder.layers.0.fc1.weight"].shape[0],
        heads=sd["encoder.layers.0.self_attn.c_attn"].numel(),
        encoder_layers=count("encoder.layers."),
        decoder_layers=count("decoder.layers."),
        resnet=resnet,
        vocab_size=sd["encoder.embed_tokens.weight"].shape[0],
        token_bucket_size=(text_rows + 1) // 2,
        image_bucket_size=(math.isqrt(image_rows - 3) + 1) // 2,
        max_positions=sd["encoder.embed_positions.weight"].shape[0] - 2,
        attn_scale_factor=float(args.get("attn_scale_factor", 2.0)),
        code_image_size=int(args.get("code_image_size", 128)),
        dropout=float(args.get("dropout", 0.1)),
        encoder_drop_path=float(args.get("encoder_drop_path_rate", 0.1)),
        decoder_drop_path=float(args.get("decoder_drop_path_rate", 0.1)),
    )


# ---------------------------------------------------------------------------------------------
# key mapping


def ofa_to_ofa_ds(sd: dict) -> dict:
    """OFA state dict -> ofa_ds state dict. Tensors are reused (same dtype, no copies beyond concatenation)."""
    sd = dict(sd)
    tied = [sd[k] for k in TIED if k in sd]
    if any(t.shape != tied[0].shape or not torch.equal(t, tied[0]) for t in tied[1:]):
        raise CheckpointError(f"untied embeddings: {', '.join(k for k in TIED if k in sd)} differ; ofa_ds ties them")
    out = {}
    for k in list(sd):
        if k in TIED or DERIVED.match(k):
            continue
        if m := re.match(r"^(.*\.(?:self_attn|encoder_attn))\.(q|k|v)_proj\.(weight|bias)$", k):
            base, which, kind = m.groups()
            if which == "q":  # k and v are taken together with q
                parts = [sd[f"{base}.{p}_proj.{kind}"] for p in "qkv"]
                if base.endswith("encoder_attn"):
                    out[f"{base}.q_proj.{kind}"] = parts[0]
                    out[f"{base}.kv_proj.{kind}"] = torch.cat(parts[1:])
                else:
                    out[f"{base}.qkv_proj.{kind}"] = torch.cat(parts)
            continue
        if m := re.match(r"^(.*\.(?:self_attn|encoder_attn))\.in_proj_(weight|bias)$", k):  # BART's fused qkv
            base, kind = m.groups()
            if base.endswith("encoder_attn"):
                q, kv = sd[k].split([sd[k].shape[0] // 3, 2 * sd[k].shape[0] // 3])
                out[f"{base}.q_proj.{kind}"], out[f"{base}.kv_proj.{kind}"] = q, kv
            else:
                out[f"{base}.qkv_proj.{kind}"] = sd[k]
            continue
        k2 = re.sub(r"^(encoder|decoder)\.layers\.(\d+)\.(fc1|fc2|ffn_layernorm)\.", r"\1.layers.\2.ffn.\3.", k)
        k2 = re.sub(r"^(encoder|decoder)\.token_rel_pos_table_list\.(\d+)\.weight$", r"\1.layers.\2.rel_pos.text", k2)
        k2 = re.sub(r"^(encoder|decoder)\.image_rel_pos_table_list\.(\d+)\.weight$", r"\1.layers.\2.rel_pos.image", k2)
        out[k2] = sd[k]
    if tied:
        out["embed_tokens.weight"] = tied[0]
    return out


def ofa_ds_to_ofa(sd: dict, cfg: ModelConfig) -> dict:
    """ofa_ds state dict -> OFA state dict, with OFA's deterministic buffers regenerated as OFA's code builds
    them (float buffers take the embedding's dtype). The three tied embedding keys share one tensor."""
    from ofa_ds.model.ofa import decoder_image_position_ids

    out = {}
    emb = sd["embed_tokens.weight"]
    for k, v in sd.items():
        if k == "embed_tokens.weight":
            continue
        if m := re.match(r"^(.*)\.qkv_proj\.(weight|bias)$", k):
            for p, t in zip("qkv", v.chunk(3)):
                out[f"{m.group(1)}.{p}_proj.{m.group(2)}"] = t
            continue
        if m := re.match(r"^(.*)\.kv_proj\.(weight|bias)$", k):
            for p, t in zip("kv", v.chunk(2)):
                out[f"{m.group(1)}.{p}_proj.{m.group(2)}"] = t
            continue
        k2 = re.sub(r"^(encoder|decoder)\.layers\.(\d+)\.ffn\.", r"\1.layers.\2.", k)
        k2 = re.sub(r"^(encoder|decoder)\.layers\.(\d+)\.rel_pos\.text$", r"\1.token_rel_pos_table_list.\2.weight", k2)
        k2 = re.sub(r"^(encoder|decoder)\.layers\.(\d+)\.rel_pos\.image$", r"\1.image_rel_pos_table_list.\2.weight", k2)
        out[k2] = v
    for k in TIED:
        out[k] = emb
    tb, ib = text_buckets(cfg.token_bucket_size, cfg.max_positions), image_buckets(cfg.image_bucket_size)
    for side in ("encoder", "decoder"):
        out[f"{side}.version"] = torch.tensor([3.0], dtype=emb.dtype)
        out[f"{side}.token_rp_bucket"], out[f"{side}.image_rp_bucket"] = tb, ib
    out["decoder.image_position_idx"] = decoder_image_position_ids(cfg)
    return out


def resize_vocab(sd: dict, vocab_size: int, seed: int = 0) -> dict:
    """Fit the embedding to `vocab_size` as OFA's loader does: append N(0, d^-1/2) rows to a smaller one
    (e.g. BART's 50,265), drop the last row of one exactly one larger; anything else is an error."""
    emb = sd["embed_tokens.weight"]
    n, d = emb.shape
    if n == vocab_size:
        return sd
    if n == vocab_size + 1:
        return {**sd, "embed_tokens.weight": emb[:-1]}
    if n > vocab_size:
        raise CheckpointError(f"checkpoint vocabulary has {n} rows, more than the tokenizer's {vocab_size}")
    g = torch.Generator().manual_seed(seed)
    extra = torch.randn(vocab_size - n, d, generator=g) * d**-0.5
    return {**sd, "embed_tokens.weight": torch.cat([emb, extra.to(emb.dtype)])}


# ---------------------------------------------------------------------------------------------
# strict loading and files


def load_strict(model: torch.nn.Module, sd: dict) -> None:
    """load_state_dict that first lists every missing, unexpected and mis-shaped key, never a partial load."""
    check_keys(model.state_dict(), sd)
    model.load_state_dict(sd, strict=True)


def check_keys(want: dict, sd: dict) -> None:
    """Raise CheckpointError listing every key of `sd` that is missing, unexpected or mis-shaped against `want`."""
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(want[k].shape)}"
        for k in set(want) & set(sd)
        if tuple(sd[k].shape) != tuple(want[k].shape)
    )
    if missing or unexpected or shapes:
        lines = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if items:
                lines.append(f"{len(items)} {title} key(s):\n  " + "\n  ".join(items))
        raise CheckpointError("checkpoint does not fit the model:\n" + "\n".join(lines))


def save_safetensors(sd: dict, cfg: ModelConfig, path: str | Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in sd.items()}
    save_file(tensors, str(path), metadata={"format": "ofa_ds", "model_config": json.dumps(cfg.to_dict())})


def load_safetensors(path: str | Path) -> tuple[ModelConfig, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "ofa_ds" or "model_config" not in meta:
            raise CheckpointError(f"{path}: not an ofa_ds safetensors export (no ofa_ds model_config metadata)")
        return ModelConfig.from_dict(json.loads(meta["model_config"])), load_file(str(path))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own errors, a bad header's JSON, a bad model config
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def ofa_cfg(cfg: ModelConfig) -> dict:
    """OFA's `cfg` block for a checkpoint written from ofa_ds."""
    return {
        "model": {
            "_name": cfg.name,
            "arch": cfg.name,
            "encoder_embed_dim": cfg.embed_dim,
            "decoder_embed_dim": cfg.embed_dim,
            "encoder_ffn_embed_dim": cfg.ffn_dim,
            "decoder_ffn_embed_dim": cfg.ffn_dim,
            "encoder_attention_heads": cfg.heads,
            "decoder_attention_heads": cfg.heads,
            "encoder_layers": cfg.encoder_layers,
            "decoder_layers": cfg.decoder_layers,
            "resnet_type": cfg.resnet,
            "token_bucket_size": cfg.token_bucket_size,
            "image_bucket_size": cfg.image_bucket_size,
            "max_source_positions": cfg.max_positions,
            "max_target_positions": cfg.max_positions,
            "attn_scale_factor": cfg.attn_scale_factor,
            "code_image_size": cfg.code_image_size,
            "dropout": cfg.dropout,
            "encoder_drop_path_rate": cfg.encoder_drop_path,
            "decoder_drop_path_rate": cfg.decoder_drop_path,
            "scale_attn": True,
            "scale_fc": True,
            "scale_heads": True,
            "scale_resids": False,
            "disable_entangle": True,
            "add_type_embedding": True,
        }
    }


def load_any(path: str | Path) -> tuple[ModelConfig, dict]:
    """(config, ofa_ds state dict) from an OFA checkpoint (.pt) or an ofa_ds export (.safetensors)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    ck = load_ofa_checkpoint(path)
    return config_from_ofa(ck["model"], ofa_model_args(ck)), ofa_to_ofa_ds(ck["model"])


def save_ofa_checkpoint(sd: dict, cfg: ModelConfig, path: str | Path) -> None:
    torch.save({"args": None, "cfg": ofa_cfg(cfg), "model": ofa_ds_to_ofa(sd, cfg)}, str(path))

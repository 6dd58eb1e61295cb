"""`ofa-ds convert IN OUT`: between OFA fairseq checkpoints (.pt) and ofa_ds exports (.safetensors).

    ofa-ds convert ofa_large.pt ofa_large.safetensors     # OFA -> ofa_ds
    ofa-ds convert ofa_large.safetensors ofa_large.pt     # ofa_ds -> OFA (loads in OFA's code)

The result is checked against the architecture read from the checkpoint before anything is written.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ofa_ds.model.convert import check_keys, load_any, resize_vocab, save_ofa_checkpoint, save_safetensors


def add_arguments(p) -> None:
    p.add_argument("src", type=Path, help="OFA checkpoint (.pt) or ofa_ds export (.safetensors)")
    p.add_argument("dst", type=Path, help="output: .safetensors (ofa_ds) or .pt (OFA fairseq format)")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="fit the embedding to this vocabulary (OFA's rule: append N(0, d^-1/2) rows or drop one)",
    )


def run(args) -> int:
    if args.dst.suffix not in (".safetensors", ".pt"):
        raise SystemExit(f"{args.dst}: output must end in .safetensors (ofa_ds) or .pt (OFA)")
    from ofa_ds.model.ofa import OFAModel

    cfg, sd = load_any(args.src)
    if args.vocab_size and args.vocab_size != cfg.vocab_size:
        sd = resize_vocab(sd, args.vocab_size)
        cfg.vocab_size = args.vocab_size
    with torch.device("meta"):
        check_keys(OFAModel(cfg).state_dict(), sd)
    if args.dst.suffix == ".safetensors":
        save_safetensors(sd, cfg, args.dst)
    else:
        save_ofa_checkpoint(sd, cfg, args.dst)
    n = sum(v.numel() for k, v in sd.items() if v.is_floating_point())
    print(
        f"{args.src} -> {args.dst}: {cfg.name}, d={cfg.embed_dim}, {cfg.encoder_layers}+{cfg.decoder_layers} layers, "
        f"{cfg.resnet}, V={cfg.vocab_size}, {n:,} floats"
    )
    return 0

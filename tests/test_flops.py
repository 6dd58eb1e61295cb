"""The analytic FLOPs of flops.py against torch.utils.flop_counter on a real forward + backward."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ofa_ds.config import ModelConfig
from ofa_ds.data.collate import model_inputs
from ofa_ds.model.ofa import OFAModel
from ofa_ds.train.flops import StreamShape, resnet_flops, stream_shape, train_flops

CFG = dict(
    embed_dim=64,
    ffn_dim=96,
    heads=2,
    encoder_layers=2,
    decoder_layers=1,
    resnet="resnet18",
    vocab_size=300,
    dropout=0.0,
    encoder_drop_path=0.0,
    decoder_drop_path=0.0,
)


def make_stream(B, R, L, T, patch_idx_k=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = {
        "src_tokens": torch.randint(4, 300, (B, L), generator=g),
        "patch_images": torch.randn(B, 3, R, R, generator=g),
        "patch_masks": torch.arange(B) % 3 != 2,
        "prev_output_tokens": torch.randint(4, 300, (B, T), generator=g),
        "code_masks": torch.arange(B) % 4 == 1,
    }
    if patch_idx_k:
        s["patch_idx"] = torch.stack([torch.randperm((R // 16) ** 2, generator=g)[:patch_idx_k] for _ in range(B)])
    return s


@pytest.mark.parametrize(
    "backend,bn,B,R,L,T,K",
    [
        ("reference", "frozen", 3, 64, 16, 8, 10),  # v1-like: sampled patches, short targets
        ("sdpa", "batch", 2, 48, 24, 40, None),  # v2-like: all patches, long targets
    ],
)
def test_analytic_flops_match_flop_counter(backend, bn, B, R, L, T, K):
    cfg = ModelConfig(**CFG, attn_backend=backend, bn_mode=bn)
    model = OFAModel(cfg)
    streams = [make_stream(B, R, L, T, K), make_stream(2, 32, 8, 8, seed=1)]
    with FlopCounterMode(display=False) as counter:
        loss = sum(model(s).float().logsumexp(-1).mean() for s in streams)
        loss.backward()
    analytic = train_flops(cfg, [stream_shape(s) for s in streams])
    assert abs(analytic / counter.get_total_flops() - 1) < 0.05


def test_resnet_stem_and_stage_shapes():
    stem, rest = resnet_flops((1, 1, 1), 32)
    assert stem == 2 * 3 * 64 * 49 * 16 * 16  # 7x7/2 conv: 32 px -> 16 px

    # one bottleneck per stage at 8, 4, 2 px (stage 1 keeps the stride-4 grid), each with a downsample
    def stage(cin, w, h_in, h):
        return 2 * (cin * w * h_in**2 + w * w * 9 * h**2 + w * 4 * w * h**2 + cin * 4 * w * h**2)

    assert rest == stage(64, 64, 8, 8) + stage(256, 128, 8, 4) + stage(512, 256, 4, 2)


def test_flops_add_up_over_streams_and_samples():
    cfg = ModelConfig(**CFG)
    s = StreamShape(batch=2, image_size=32, patches=4, src_len=8, tgt_len=8)
    one = train_flops(cfg, [s])
    assert train_flops(cfg, [s, s]) == train_flops(cfg, [s._replace(batch=4)]) == 2 * one


def test_resnet_counts_each_distinct_image_once():
    """A loader stream whose examples share images: the analytic count of its shape (the ResNet once per distinct
    image) against the flop counter on the model running model_inputs; an image per example would count 5 ResNet
    passes for 2."""
    cfg = ModelConfig(**CFG, bn_mode="frozen")
    model = OFAModel(cfg)
    g = torch.Generator().manual_seed(0)
    stream = {
        "src_tokens": torch.randint(4, 300, (5, 16), generator=g),
        "prev_output_tokens": torch.randint(4, 300, (5, 8), generator=g),
        "patch_images": torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=g),
        "image_index": torch.tensor([1, 1, 0, 2, 2]),
        "patch_masks": torch.tensor([True, True, False, True, True]),
        "patch_holes": torch.zeros(5, 4, dtype=torch.long),
        "code_masks": torch.zeros(5, dtype=torch.bool),
    }
    x = model_inputs(stream, "cpu", torch.float32)
    with FlopCounterMode(display=False) as counter:
        model(x).float().logsumexp(-1).mean().backward()
    shape = stream_shape(stream)
    assert shape.images == 2 and stream_shape(x) == shape
    assert abs(train_flops(cfg, [shape]) / counter.get_total_flops() - 1) < 0.05
    assert abs(train_flops(cfg, [shape._replace(images=None)]) / counter.get_total_flops() - 1) > 0.5

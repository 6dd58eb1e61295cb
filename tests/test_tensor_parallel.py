"""Tensor parallelism (TP=2 on two gloo ranks) computes what the plain model computes: logits, per-token nll and every
parameter's gradient within 1e-5 relative, on a batch with images (one patch-masked), a pure-text stream and an
image-code target; and the split/unsplit plan (shard/unshard) round-trips every parameter."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ofa_ds.config import ConfigError, ModelConfig, ParallelConfig, model_preset
from ofa_ds.model.ofa import OFAModel
from ofa_ds.parallel import tensor as tp
from ofa_ds.train.loss import token_nll

CFG = dict(
    embed_dim=64,
    ffn_dim=128,
    heads=4,
    encoder_layers=2,
    decoder_layers=2,
    resnet="resnet18",
    vocab_size=300,
    dropout=0.0,
    encoder_drop_path=0.0,
    decoder_drop_path=0.0,
    bn_mode="batch",
    attn_backend="sdpa",
)


def tiny() -> ModelConfig:
    return ModelConfig.from_dict({**model_preset("ofa_tiny").to_dict(), **CFG})


def batches(cfg: ModelConfig) -> list[dict]:
    g = torch.Generator().manual_seed(1)

    def tokens(*shape):
        return torch.randint(4, cfg.vocab_size, shape, generator=g)

    target = tokens(3, 6)
    target[0, 4:] = cfg.pad_id
    # one image patch-masked out, the third example's target an image-code sequence
    image = {
        "src_tokens": tokens(3, 5),
        "patch_images": torch.randn(3, 3, 32, 32, generator=g),
        "patch_masks": torch.tensor([True, False, True]),
        "prev_output_tokens": tokens(3, 6),
        "code_masks": torch.tensor([False, False, True]),
        "target": target,
        "weights": torch.tensor([1.0, 0.5, 1.0]),
    }
    text = {
        "src_tokens": tokens(2, 7),
        "prev_output_tokens": tokens(2, 4),
        "target": tokens(2, 4),
        "weights": torch.ones(2),
    }
    text["src_tokens"][1, 5:] = cfg.pad_id
    return [image, text]


def loss_of(model, batch, nll_fn, cfg):
    x = {k: v for k, v in batch.items() if k not in ("target", "weights")}
    logits = model(x)
    nll = nll_fn(logits, batch["target"], cfg.pad_id)
    return logits, nll, (nll * batch["weights"][:, None]).sum()


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def _grad(p):
    return torch.zeros_like(p) if p.grad is None else p.grad


def _worker(rank: int, world: int, port: int, out: str, sequence_parallel: bool):
    from ofa_ds.parallel import groups as G

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = tiny()
    torch.manual_seed(0)
    full = OFAModel(cfg)
    torch.manual_seed(0)
    model = OFAModel(cfg)
    g = G.build(ParallelConfig(tensor=world, sequence_parallel=sequence_parallel))
    tp.parallelize(model, g)
    lengths = {}  # the sequence length the layers run at, per batch
    for stack in ("encoder", "decoder"):
        hook = lambda m, a, out, k=stack: lengths.update({k: out.shape[1]})  # noqa: E731
        getattr(model, stack).layers[1].register_forward_hook(hook)
    worst = {}
    for i, b in enumerate(batches(cfg)):
        full.zero_grad()
        model.zero_grad()
        ref_logits, ref_nll, ref_loss = loss_of(full, b, token_nll, cfg)
        lengths.clear()
        logits, nll, loss = loss_of(model, b, tp.token_nll, cfg)
        ref_loss.backward()
        loss.backward()
        # every rank's vocabulary share, padding included: (V_padded, T, B)
        logits = tp.unshard(tp.VOCAB, [x.movedim(-1, 0) for x in _gather(logits.detach())], 10**9)
        got = {"logits": logits[: cfg.vocab_size], "nll": nll.detach()}
        want = {"logits": ref_logits.detach().movedim(-1, 0), "nll": ref_nll.detach()}
        grads = dict(full.named_parameters())
        for name, p in model.named_parameters():  # (the text stream leaves the ResNet's gradients None)
            got[name] = tp.unshard(name, _gather(_grad(p)), cfg.vocab_size)
            want[name] = _grad(grads[name])
        worst[i] = {k: (float((got[k] - want[k]).abs().max()), float(want[k].abs().max())) for k in want}
        worst[i]["lengths"] = lengths["encoder"], lengths["decoder"]
        worst[i]["padding_not_minimal"] = (
            float((logits[cfg.vocab_size :] != torch.finfo(logits.dtype).min).sum()),
            1.0,
        )
    if rank == 0:
        torch.save(worst, out)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp2_equals_plain_model(sequence_parallel, tmp_path):
    """With sequence parallelism the encoder's sequences (4 patches + 5 tokens, 7 tokens) are odd: its padding to a
    multiple of 2 is exercised too."""
    import pretrain_harness as H

    out = tmp_path / "worst.pt"
    mp.start_processes(_worker, args=(2, H.free_port(), str(out), sequence_parallel), nprocs=2, start_method="spawn")
    worst = torch.load(out, weights_only=True)
    split = {0: (5, 3), 1: (4, 2)} if sequence_parallel else {0: (9, 6), 1: (7, 4)}  # (4 patches + 5 tokens, 6)
    assert {i: per.pop("lengths") for i, per in worst.items()} == split
    for i, per in worst.items():
        # 1e-5 relative to the largest entry; the 1e-8 floor is for the key projections' biases, whose gradient is
        # zero in exact arithmetic (a bias on every key shifts all scores of a query alike) and ~1e-10 in float32
        bad = {k: (diff, scale) for k, (diff, scale) in per.items() if not diff <= 1e-5 * scale + 1e-8}  # NaN too
        assert not bad, (i, bad)
        assert per["logits"][1] > 0.1 and per["encoder.layers.0.self_attn.qkv_proj.weight"][1] > 1e-4
    names = set(worst[0]) - {"logits", "nll", "padding_not_minimal"}
    assert names == {n for n, _ in OFAModel(tiny()).named_parameters()}  # every gradient compared


def test_shard_unshard_round_trip():
    cfg = tiny()
    torch.manual_seed(0)
    sd = OFAModel(cfg).state_dict()
    for t in (1, 2, 4):
        for name, full in sd.items():
            parts = [tp.shard(name, full, r, t) for r in range(t)]
            assert torch.equal(tp.unshard(name, parts, cfg.vocab_size), full), (t, name)
    qkv = sd["encoder.layers.0.self_attn.qkv_proj.weight"]  # (3D, D): rank 1 of 2 holds q, k, v of heads 2-3
    q, k, v = tp.shard("encoder.layers.0.self_attn.qkv_proj.weight", qkv, 1, 2).chunk(3)
    assert torch.equal(q, qkv[32:64]) and torch.equal(k, qkv[96:128]) and torch.equal(v, qkv[160:192])
    assert tp.shard(tp.VOCAB, sd[tp.VOCAB], 0, 2).shape == (256, 64)  # 300 rows padded to 512 (2 x 128 x 2)
    assert tp.padded_vocab(59457, 8) == 59392 + 1024


@pytest.mark.parametrize(
    "layout, message",
    [
        (dict(tensor=3), "parallel.tensor=3 does not divide model heads=4"),
        (dict(tensor=4, pipeline=1), "world size 2 is not a multiple of parallel.tensor=4"),
        (dict(pipeline=5), "parallel.pipeline=5 stages for 2+2 transformer layers"),
        (dict(pipeline=2, zero=3), "ZeRO stage 3"),
        (dict(tensor=3, sequence_parallel=True, world=3, model="ofa_base"), "the sequence split must divide"),
    ],
)
def test_bad_layouts_are_named(layout, message):
    zero, world = layout.pop("zero", 1), layout.pop("world", 2)
    model = model_preset(layout.pop("model")) if "model" in layout else tiny()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        ParallelConfig(**layout).check(model, world, zero)
    with pytest.raises(ConfigError, match="sequence_parallel needs parallel.tensor > 1"):
        ParallelConfig(sequence_parallel=True)

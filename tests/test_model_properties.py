"""Model properties on a small random OFA: causality, padding invariance, mixed batches, patch sampling."""

import pytest
import torch

from ofa_ds.config import ModelConfig
from ofa_ds.data.collate import model_inputs
from ofa_ds.model.convert import CheckpointError, load_strict
from ofa_ds.model.ofa import OFAModel

V = 300


def small(**kw):
    base = dict(
        embed_dim=64,
        ffn_dim=128,
        heads=2,
        encoder_layers=1,
        decoder_layers=2,
        resnet="resnet18",
        vocab_size=V,
        dropout=0.0,
        encoder_drop_path=0.0,
        decoder_drop_path=0.0,
        attn_backend="reference",
    )
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return OFAModel(small()).eval()


def batch(B=2, L=7, T=6, R=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, V, (B, L), generator=g)
    src[:, 0], src[:, -1] = 0, 2
    prev = torch.randint(4, V, (B, T), generator=g)
    prev[:, 0] = 0
    return dict(
        src_tokens=src,
        prev_output_tokens=prev,
        patch_images=torch.randn(B, 3, R, R, generator=g),
        patch_masks=torch.ones(B, dtype=torch.bool),
    )


def run(model, **s):
    with torch.no_grad():
        return model(s)


def test_decoder_is_causal(model):
    s = batch()
    base = run(model, **s)
    for t in range(1, s["prev_output_tokens"].shape[1]):
        prev = s["prev_output_tokens"].clone()
        prev[:, t] = (prev[:, t] + 17) % (V - 4) + 4
        out = run(model, **{**s, "prev_output_tokens": prev})
        assert torch.equal(out[:, :t], base[:, :t]), t
        assert not torch.allclose(out[:, t:], base[:, t:])


def test_padding_invariance(model):
    s = batch()
    base = run(model, **s)
    pad = lambda x, n: torch.cat([x, torch.ones(x.shape[0], n, dtype=x.dtype)], 1)  # noqa: E731
    out = run(
        model, **{**s, "src_tokens": pad(s["src_tokens"], 5), "prev_output_tokens": pad(s["prev_output_tokens"], 3)}
    )
    torch.testing.assert_close(out[:, : base.shape[1]], base, atol=1e-5, rtol=1e-5)


def test_mixed_image_and_text_batch(model):
    """A pure-text sample (patch_mask False) in a batch with an image sample equals that sample run with
    no image at all, and the image sample is unaffected by its neighbour."""
    s = batch()
    s["patch_masks"] = torch.tensor([True, False])
    mixed = run(model, **s)
    alone_text = run(model, src_tokens=s["src_tokens"][1:], prev_output_tokens=s["prev_output_tokens"][1:])
    alone_img = run(model, **{k: v[:1] for k, v in s.items()})
    torch.testing.assert_close(mixed[1:], alone_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[:1], alone_img, atol=1e-5, rtol=1e-5)


def test_code_target_samples(model):
    """Image-code targets take their own path (code LayerNorm, 2D positions and buckets) per sample."""
    s = batch(T=9)
    s["prev_output_tokens"][1, 1:] = torch.arange(200, 208)  # image codes
    codes = torch.tensor([False, True])
    mixed = run(model, **s, code_masks=codes)
    for i in range(2):
        alone = run(model, **{k: v[i : i + 1] for k, v in s.items()}, code_masks=codes[i : i + 1])
        torch.testing.assert_close(mixed[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    as_text = run(model, **s)
    assert torch.equal(as_text[0], mixed[0]) and not torch.allclose(as_text[1], mixed[1], atol=1e-3)


def test_patch_sampling_keeps_positions(model):
    """Feeding the patches in a random order (each with its own position id) permutes the encoder output."""
    s = batch(B=2, R=64)  # 4x4 = 16 patches
    P = 16
    perm = torch.stack([torch.randperm(P, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    with torch.no_grad():
        full = model.encode(s["src_tokens"], s["patch_images"], s["patch_masks"])
        sampled = model.encode(s["src_tokens"], s["patch_images"], s["patch_masks"], patch_idx=perm)
    torch.testing.assert_close(
        sampled.x[:, :P], full.x[:, :P].gather(1, perm[..., None].expand(-1, -1, 64)), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(sampled.x[:, P:], full.x[:, P:], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # a subset: K tokens, positions of the chosen patches
        sub = model.encode(s["src_tokens"], s["patch_images"], s["patch_masks"], patch_idx=perm[:, :5])
    assert sub.x.shape[1] == 5 + s["src_tokens"].shape[1]


@pytest.mark.parametrize("masks", [[True, True, True, False, True], [False] * 5], ids=["mixed", "text_only"])
def test_shared_images_equal_an_image_per_example(masks):
    """With frozen BatchNorm, the ResNet once per distinct image (model_inputs' image_index) gives the loss, logits and
    gradients of an image per example (the model's input before image_index, built here by hand). Examples 0 and 1
    share an image, 2 has it with a hole, 3 has no image, 4 another image; or no example has an image."""
    torch.manual_seed(0)
    model = OFAModel(small(bn_mode="frozen")).train()
    s = batch(B=5, R=64)  # 4x4 = 16 patches
    g = torch.Generator().manual_seed(2)
    pixels = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=g)
    pixels[0] = 0  # the loader's zero image of examples without one
    stream = {
        **s,
        "patch_images": pixels,
        "image_index": torch.tensor([1, 1, 1, 0, 2]),
        "patch_masks": torch.tensor(masks),
        "patch_holes": torch.zeros(5, 4, dtype=torch.long),
        "patch_idx": torch.stack([torch.randperm(16, generator=g)[:10] for _ in range(5)]),
    }
    stream["patch_holes"][2] = torch.tensor([16, 8, 48, 40])  # x0, y0, x1, y1
    per_example = (pixels[stream["image_index"]].float() / 255 - 0.5) / 0.5  # (5, 3, 64, 64)
    per_example[2, :, 8:40, 16:48] = 0
    per_example[~stream["patch_masks"]] = 0
    x = model_inputs(stream, "cpu", torch.float32)
    assert x["patch_images"].shape[0] == (3 if any(masks) else 1)
    reference = {k: v for k, v in x.items() if k != "image_index"}
    reference["patch_images"] = per_example
    results = []
    for inputs in (x, reference):
        model.zero_grad()
        logits = model(inputs)
        loss = logits.logsumexp(-1).mean()
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.encoder.embed_images.parameters()])
        results.append((logits.detach(), loss.detach(), grads))
    for got, want in zip(*results):
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()


def test_every_parameter_trains():
    torch.manual_seed(0)
    model = OFAModel(small(dropout=0.1)).train()  # drop-path off: it may drop the only code sample
    s = batch(B=3, T=8)
    s["patch_masks"] = torch.tensor([True, False, True])
    s["prev_output_tokens"][2, 1:] = torch.arange(200, 207)
    logits = model({**s, "code_masks": torch.tensor([False, False, True])})
    logits.float().logsumexp(-1).mean().backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent, silent


def test_frozen_batchnorm_has_no_trainable_affine():
    m = OFAModel(small(bn_mode="frozen"))
    names = {n for n, _ in m.named_parameters()}
    assert not any(".bn" in n or "downsample.1" in n for n in names)
    assert "encoder.embed_images.bn1.weight" in m.state_dict()  # same keys as the trainable modes


@pytest.mark.parametrize("resnet, count", [("resnet101", 94), ("resnet152", 145)])
def test_batchnorm_count(resnet, count):
    """The README's cost of sync BatchNorm: one all-reduce per BatchNorm in the forward and one in the backward."""
    from ofa_ds.config import RESNET_LAYERS
    from ofa_ds.model.resnet import BatchNorm2d, ResNet

    with torch.device("meta"):
        backbone = ResNet(RESNET_LAYERS[resnet])
    assert sum(isinstance(m, BatchNorm2d) for m in backbone.modules()) == count


def test_image_larger_than_position_grid_is_an_error():
    m = OFAModel(small(image_bucket_size=16, code_image_size=64)).eval()
    with pytest.raises(ValueError, match="at most 16x16"):
        run(m, **batch(R=16 * 17))


def test_text_longer_than_positions_is_an_error():
    m = OFAModel(small(max_positions=64, code_image_size=32)).eval()
    with pytest.raises(ValueError, match="max_positions=64"):
        run(m, src_tokens=torch.full((1, 65), 5), prev_output_tokens=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="max_positions=64"):
        run(m, src_tokens=torch.full((1, 6), 5), prev_output_tokens=torch.zeros(1, 65, dtype=torch.long))


def test_bad_checkpoint_lists_every_problem():
    m = OFAModel(small())
    sd = m.state_dict()
    sd.pop("encoder.pos_ln.weight")
    sd.pop("decoder.layers.1.ffn.fc2.bias")
    sd["encoder.extra.weight"] = torch.zeros(1)
    sd["embed_tokens.weight"] = torch.zeros(V + 5, 64)
    with pytest.raises(CheckpointError) as e:
        load_strict(m, sd)
    msg = str(e.value)
    for needle in [
        "2 missing",
        "encoder.pos_ln.weight",
        "decoder.layers.1.ffn.fc2.bias",
        "1 unexpected",
        "encoder.extra.weight",
        "1 mis-shaped",
        "embed_tokens.weight: checkpoint (305, 64) vs model (300, 64)",
    ]:
        assert needle in msg


def _graph_nodes(t: torch.Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


def _tied_grads(m: OFAModel, tie: bool, forwards: int, backwards: int) -> dict[str, torch.Tensor]:
    """Gradients after `backwards` backward passes, each of the summed losses of `forwards` forwards."""
    m.embed_tokens.tie = tie
    m.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks either way
    for _ in range(backwards):
        sum(m(batch()).float().logsumexp(-1).sum() for _ in range(forwards)).backward()
    return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("forwards, backwards", [(1, 1), (1, 2), (2, 1)])
def test_tied_embedding_gradient_is_made_once_and_equals_plain_autograd(forwards, backwards):
    """The tied weight's gradient goes through one _Tie node per forward (the lookups' sparse rows added into the
    output projection's dense gradient): every gradient equals plain autograd's (tie off: dense lookups), also
    accumulated over two backward passes and over two forwards summed into one loss, and the tied one is dense."""
    torch.manual_seed(0)
    m = OFAModel(small()).train()
    assert m.embed_tokens.tie
    assert "_TieBackward" in _graph_nodes(m(batch()))
    tied = []  # per call of the embedding (two lookups, the projection): did it read the aliases?
    hook = m.embed_tokens.register_forward_hook(lambda mod, args, out: tied.append(mod.aliases is not None))
    m(batch())
    with torch.no_grad():  # no gradient, no node
        m(batch())
    hook.remove()
    assert tied == [True] * 3 + [False] * 3
    tied = _tied_grads(m, True, forwards, backwards)
    plain = _tied_grads(m, False, forwards, backwards)
    assert tied["embed_tokens.weight"].layout == torch.strided
    assert tied.keys() == plain.keys()
    for n, g in plain.items():
        torch.testing.assert_close(tied[n], g, atol=1e-6, rtol=1e-6, msg=n)

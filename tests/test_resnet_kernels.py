"""The fused BatchNorm (+ residual) (+ ReLU) kernels of csrc/resnet.

CPU: the kernels' shared math (csrc/resnet/bn_act_math.h) built for the host (bn_act_host.cpp, g++, ctypes:
tests/resnet_host.py) against torch in float64, and cuda_ext's autograd Function run over that host build. GPU
(skipped without CUDA): the extension against torch on OFA's layer shapes. Dispatch: the ResNet on CPU is the same
with the kernel path selected, and asking for the extension where it is not built is a clear error.
"""

import copy
import inspect
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from resnet_host import CODE, HostOps, host_library, ptr

from ofa_ds.kernels.resnet import batch_norm_act, build, cuda_ext, use_backend
from ofa_ds.model.resnet import ResNet

VEC = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}  # channels per 16-byte pack
CL = torch.channels_last


# ---- host build of the shared math --------------------------------------------------------------------


def test_host_ops_have_the_bindings_signatures():
    """cuda_ext is tested here over HostOps: they must take what the torch ops take, in the same order."""
    source = re.sub(r'"\s*\n\s*"', "", (build.ROOT / build.BINDING).read_text())  # join the schema literals
    schemas = re.findall(r'm\.def\("(\w+)\((.*?)\) ->', source)
    assert {name for name, _ in schemas} == {
        "welford_stats",
        "welford_combine",
        "bn_act_forward",
        "grad_sums",
        "bn_act_backward",
    }
    for name, args in schemas:
        want = [a.split()[-1] for a in args.split(",")]
        assert list(inspect.signature(getattr(HostOps, name)).parameters)[1:] == want, name


@pytest.fixture(scope="module")
def host():
    return HostOps(host_library())


@pytest.fixture
def host_ops(host, monkeypatch):
    """cuda_ext's autograd Function running on the host build."""
    monkeypatch.setattr(torch.ops, "ofa_resnet", host, raising=False)
    host.widths.clear()
    return host


def _inputs(dtype, C, N=2, H=5, W=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = (3 + 2 * r(N, C, H, W)).to(dtype).contiguous(memory_format=CL)  # offset mean: Welford must not cancel
    residual = r(N, C, H, W).to(dtype).contiguous(memory_format=CL)
    dy = r(N, C, H, W).to(dtype).contiguous(memory_format=CL)
    weight, bias = 1 + 0.2 * r(C), 0.1 * r(C)
    running_mean, running_var = 0.5 * r(C), 1 + r(C).abs()
    return x, residual, dy, weight, bias, running_mean, running_var


def _reference(x, residual, dy, weight, bias, running_mean, running_var, *, training, relu, momentum=0.1, eps=1e-5):
    """torch in float64 on the same (already rounded) inputs: y, grads of x/weight/bias/residual, running stats."""
    leaves = [t.double().requires_grad_() for t in (x, weight, bias)]
    res = residual.double().requires_grad_() if residual is not None else None
    rm, rv = running_mean.double(), running_var.double()
    z = F.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training, momentum, eps)
    if res is not None:
        z = z + res
    y = F.relu(z) if relu else z
    y.backward(dy.double())
    return y.detach(), [t.grad for t in leaves], res.grad if res is not None else None, rm, rv


# y and dx carry one round-to-nearest to the storage dtype, at most half an ulp (relative 2^-11 fp16,
# 2^-8 bf16; truncating or rounding twice exceeds it), on top of fp32 arithmetic (atol); dweight/dbias and
# the statistics are fp32.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2**-11, atol=1e-4),
    torch.bfloat16: dict(rtol=2**-8, atol=1e-4),
}
FP32 = dict(rtol=1e-5, atol=1e-5)
MODES = [("train", True, True), ("train", False, True), ("train", False, False), ("eval", True, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_host_conversions_are_torchs_rounding(host, dtype):
    lib = host.lib
    if dtype is not torch.float32:  # every 16-bit pattern widens exactly as torch does
        bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
        wide = torch.empty(65536)
        lib.ofa_to_float(CODE[dtype], ptr(bits), ptr(wide), 65536)
        want = bits.view(dtype).float()
        assert torch.equal(wide.isnan(), want.isnan()) and torch.equal(wide[~want.isnan()], want[~want.isnan()])
    # float -> dtype: random scales, exact ties, subnormals, overflow, infinities, signed zeros, NaN.
    g = torch.Generator().manual_seed(1)
    vals = torch.randn(20000, generator=g) * torch.logspace(-30, 30, 20000, base=2)
    grid = torch.arange(1, 3000, dtype=torch.float32)
    ties = torch.cat([(grid + 0.5) * 2.0**-10, (grid + 0.5) * 2.0**-7, (grid + 0.5) * 2.0**-24])
    special = torch.tensor(
        [
            0.0,
            -0.0,
            65504.0,
            65519.0,
            65520.0,
            1e30,
            -1e30,
            float("inf"),
            float("-inf"),
            float("nan"),
            2.0**-25,
            2.0**-26,
            3 * 2.0**-26,
            1e-40,
            -1e-40,
        ]
    )
    vals = torch.cat([vals, ties, -ties, special])
    out = torch.empty(len(vals), dtype=dtype)
    lib.ofa_from_float(CODE[dtype], ptr(vals), ptr(out), len(vals))
    want = vals.to(dtype)
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.uint8), want[~nan].view(torch.uint8))  # bit-exact, -0 included


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C", [64, 12, 7])  # 12 and 7 are not multiples of the 8-wide fp16/bf16 pack
@pytest.mark.parametrize("mode,residual,relu", MODES)
def test_host_math_matches_torch(host_ops, dtype, C, mode, residual, relu):
    training = mode == "train"
    x, res, dy, weight, bias, rm, rv = _inputs(dtype, C)
    res = res if residual else None
    y_ref, (dx_ref, dw_ref, db_ref), dres_ref, rm_ref, rv_ref = _reference(
        x, res, dy, weight, bias, rm, rv, training=training, relu=relu
    )

    weight.requires_grad_(), bias.requires_grad_()
    xg = x.clone().requires_grad_()
    resg = res.clone().requires_grad_() if residual else None
    running = rm.clone(), rv.clone()
    y = cuda_ext._BatchNormAct.apply(xg, weight, bias, resg, *running, training, 0.1, 1e-5, relu, None)
    y.backward(dy)

    width = VEC[dtype] if C % VEC[dtype] == 0 else 1
    assert set(host_ops.widths.values()) == {width}
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    torch.testing.assert_close(xg.grad.double(), dx_ref, **TOL[dtype])
    torch.testing.assert_close(weight.grad.double(), dw_ref, **FP32, check_dtype=False)
    torch.testing.assert_close(bias.grad.double(), db_ref, **FP32, check_dtype=False)
    if residual:
        torch.testing.assert_close(resg.grad.double(), dres_ref, **TOL[dtype])
    torch.testing.assert_close(running[0].double(), rm_ref, **FP32)
    torch.testing.assert_close(running[1].double(), rv_ref, **FP32)


def test_host_welford_is_accurate_far_from_zero(host):
    """Mean 1000, std 1 in fp32: sum-of-squares would lose the variance; Welford + Chan's combine keep it."""
    x = (1000 + torch.randn(8, 16, 32, 32, generator=torch.Generator().manual_seed(2))).contiguous(memory_format=CL)
    stats = host.welford_stats(x)
    x64 = x.double().permute(1, 0, 2, 3).reshape(16, -1)
    torch.testing.assert_close(stats[0].double(), x64.mean(1), rtol=1e-6, atol=0)
    torch.testing.assert_close((stats[1] / stats[2]).double(), x64.var(1, unbiased=False), rtol=1e-4, atol=0)
    assert torch.equal(stats[2], torch.full((16,), 8.0 * 32 * 32))


def test_host_per_rank_statistics_combine_to_the_global_batch(host):
    """`sync`: per-rank (3, C) statistics all-gathered and combined equal the statistics of the whole batch;
    per-rank gradient sums all-reduced equal the whole batch's."""
    x, _, dy, *_ = _inputs(torch.float16, 24, N=5)
    ranks = [x[:1].contiguous(memory_format=CL), x[1:].contiguous(memory_format=CL)]  # uneven: 1 and 4 images
    combined = host.welford_combine(torch.stack([host.welford_stats(r) for r in ranks]))
    whole = host.welford_stats(x)
    torch.testing.assert_close(combined, whole, rtol=1e-5, atol=1e-5)
    mean = whole[0].contiguous()
    per_rank = [
        host.grad_sums(dy[s].contiguous(memory_format=CL), r, None, mean, False)
        for s, r in ((slice(0, 1), ranks[0]), (slice(1, 5), ranks[1]))
    ]
    torch.testing.assert_close(
        per_rank[0] + per_rank[1], host.grad_sums(dy, x, None, mean, False), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_vector_and_scalar_paths_agree_exactly(host, dtype):
    """A view at an odd element offset is not 16-byte aligned and takes the scalar path: same bits."""
    x, res, dy, weight, bias, *_ = _inputs(dtype, 32, N=3)
    buf = torch.empty(x.numel() + 1, dtype=dtype)
    buf[1:] = x.permute(0, 2, 3, 1).reshape(-1)
    x_odd = buf[1:].view(3, 5, 7, 32).permute(0, 3, 1, 2)
    assert x_odd.is_contiguous(memory_format=CL) and torch.equal(x_odd, x)
    outs = []
    for xi in (x, x_odd):
        stats = host.welford_stats(xi)
        y, mean, invstd = host.bn_act_forward(xi, res, stats, weight, bias, None, None, True, 0.1, 1e-5, True)
        sums = host.grad_sums(dy, xi, y, mean, True)
        dx, dres = torch.empty_like(y), torch.empty_like(y)
        host.bn_act_backward(dy, xi, y, mean, invstd, weight, sums, stats[2], True, True, dx, dres)
        outs.append((stats, y, sums, dx, dres))
        assert set(host.widths.values()) == ({VEC[dtype]} if xi is x else {1})
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_host_sync_mode_through_the_autograd_function(host_ops, one_rank_group):
    """The `sync` plumbing (all-gather + combine, all-reduce of the sums) on one rank equals plain batch mode."""
    x, res, dy, weight, bias, rm, rv = _inputs(torch.float32, 16)
    results = []
    for group in (None, one_rank_group):
        w, b, xg = weight.clone().requires_grad_(), bias.clone().requires_grad_(), x.clone().requires_grad_()
        running = rm.clone(), rv.clone()
        y = cuda_ext._BatchNormAct.apply(xg, w, b, res, *running, True, 0.1, 1e-3, True, group)
        y.backward(dy)
        results.append((y, xg.grad, w.grad, b.grad, *running))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---- dispatch on machines without the extension -------------------------------------------------------


def _train_step(model, x):
    out = model(x)
    out.float().square().sum().backward()
    return out


@pytest.mark.parametrize("bn_mode", ["batch", "frozen"])
def test_resnet_kernel_path_equals_torch_path_on_cpu(bn_mode):
    """With the kernel path selected ("auto", the default) a CPU ResNet falls back to torch ops exactly."""
    torch.manual_seed(0)
    model = ResNet((1, 1, 1), bn_mode)
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    with use_backend("auto"):
        out = _train_step(model, x)
    with use_backend("torch"):
        want = _train_step(twin, x)
    assert out.shape == (2, 1024, 4, 4) and torch.equal(out, want)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        assert torch.equal(a, b), name


@pytest.mark.skipif(cuda_ext.is_built(), reason="the extension is built here")
def test_cuda_backend_without_the_extension_is_a_clear_error():
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(
        cuda_ext.ExtensionNotBuilt,
        match="backend 'cuda' needs the csrc/resnet extension, which is not built .*backend='torch'",
    ):
        batch_norm_act(x, None, None, torch.zeros(8), torch.ones(8), training=True, backend="cuda")
    status = cuda_ext.extension_status()
    assert status["resnet_cuda"] == "not built" and status["detail"]


def test_bad_inputs_name_what_is_supported():
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(TypeError, match="float64 unsupported; supported: float32, float16, bfloat16"):
        batch_norm_act(x.double(), None, None, None, None, training=True, backend="cuda")
    with pytest.raises(ValueError, match=r"non-empty \(N, C, H, W\) tensor, got \(2, 8, 16\)"):
        batch_norm_act(x.flatten(2), None, None, None, None, training=True, backend="cuda")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_act(x[:1, :, :1, :1], None, None, None, None, training=True, backend="cuda")
    with pytest.raises(ValueError, match="backend 'triton'; valid: auto, torch, cuda"):
        batch_norm_act(x, None, None, None, None, training=True, backend="triton")


# ---- GPU: the extension against torch ------------------------------------------------------------------


def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


# OFA's BatchNorm layers at 384 px, batch 2: (C, H = W, residual, relu) for the stem, each stage's
# conv1/conv2/conv3 (+ residual) and the downsample branch.
OFA_LAYERS = [
    (64, 192, False, True),
    (64, 96, False, True),
    (256, 96, True, True),
    (256, 96, False, False),
    (128, 96, False, True),
    (128, 48, False, True),
    (512, 48, True, True),
    (256, 48, False, True),
    (256, 24, False, True),
    (1024, 24, True, True),
    (1024, 24, False, False),
]
# Against torch in fp32 on the same inputs: y/dx/dres one rounding to the dtype (2 ulps allowed); the
# statistics and parameter gradients are fp32 sums over up to 73,728 rows in a different order.
GPU_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
GPU_SUMS = dict(rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layer", OFA_LAYERS, ids=lambda x: f"C{x[0]}_H{x[1]}" + "_res" * x[2] + "_relu" * x[3])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@gpu
def test_gpu_kernels_match_torch(dtype, layer, training):
    C, H, residual, relu = layer
    x, res, dy, weight, bias, rm, rv = (t.cuda() for t in _inputs(dtype, C, N=2, H=H, W=H))
    res = res if residual else None
    leaves = [t.float().requires_grad_() for t in (x, weight, bias)]
    res_ref = res.float().requires_grad_() if residual else None
    rm_ref, rv_ref = rm.clone(), rv.clone()
    z = F.batch_norm(leaves[0], rm_ref, rv_ref, leaves[1], leaves[2], training, 0.1, 1e-5)
    if residual:
        z = z + res_ref
    y_ref = F.relu(z) if relu else z
    y_ref.backward(dy.float())

    w, b, xg = weight.clone().requires_grad_(), bias.clone().requires_grad_(), x.clone().requires_grad_()
    resg = res.clone().requires_grad_() if residual else None
    y = batch_norm_act(xg, w, b, rm, rv, training=training, residual=resg, relu=relu, backend="cuda")
    y.backward(dy)
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y.float(), y_ref, **GPU_TOL[dtype])
    torch.testing.assert_close(xg.grad.float(), leaves[0].grad, **GPU_TOL[dtype])
    if residual:
        torch.testing.assert_close(resg.grad.float(), res_ref.grad, **GPU_TOL[dtype])
    torch.testing.assert_close(w.grad, leaves[1].grad, **GPU_SUMS)
    torch.testing.assert_close(b.grad, leaves[2].grad, **GPU_SUMS)
    torch.testing.assert_close(rm, rm_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-4, atol=1e-5)


@gpu
def test_gpu_layout_dtype_and_param_dtype_handling():
    x = torch.randn(2, 64, 8, 8, device="cuda")
    rm, rv = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")
    # NCHW input is converted (one copy): same result as channels_last.
    y_nchw = batch_norm_act(x, None, None, rm.clone(), rv.clone(), training=True, backend="cuda")
    y_cl = batch_norm_act(
        x.contiguous(memory_format=CL), None, None, rm.clone(), rv.clone(), training=True, backend="cuda"
    )
    assert torch.equal(y_nchw, y_cl) and y_nchw.is_contiguous(memory_format=CL)
    # The ops themselves reject what the wrapper would convert, naming what they need.
    ops = torch.ops.ofa_resnet
    with pytest.raises(RuntimeError, match="channels_last contiguous"):
        ops.welford_stats(x)
    with pytest.raises(TypeError, match="supported: float32, float16, bfloat16"):
        ops.welford_stats(x.double().contiguous(memory_format=CL))
    # bf16 running statistics and parameters (a module cast with .bfloat16()) are updated through fp32.
    xb = x.bfloat16().contiguous(memory_format=CL)
    rmb, rvb = rm.bfloat16(), rv.bfloat16()
    w, b = torch.ones(64, device="cuda", dtype=torch.bfloat16), torch.zeros(64, device="cuda", dtype=torch.bfloat16)
    batch_norm_act(xb, w, b, rmb, rvb, training=True, backend="cuda")
    rm_ref, rv_ref = rm.clone(), rv.clone()
    F.batch_norm(xb.float(), rm_ref, rv_ref, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(rmb.float(), rm_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(rvb.float(), rv_ref, rtol=1e-2, atol=1e-2)


@gpu
def test_gpu_resnet_kernel_path_matches_torch_path():
    torch.manual_seed(0)
    model = ResNet((3, 4, 6)).cuda()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 256, 256, device="cuda")
    with use_backend("cuda"):
        out = _train_step(model, x)
    with use_backend("torch"):
        want = _train_step(twin, x)
    # fp32 through 43 BatchNorm layers whose sums run in a different order than cuDNN's.
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert (a.grad - b.grad).norm() <= 1e-3 * b.grad.norm(), name
    for (name, a), b in zip(model.named_buffers(), twin.buffers()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4, msg=name)

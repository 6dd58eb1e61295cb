import pytest
import torch

from ofa_ds.train.schedule import lr_at, set_lr, warmup_steps

KW = dict(peak=1e-4, steps=1000, warmup_ratio=0.01, power=1.0, end_lr=0.0)


def test_ofa_schedule_linear_warmup_then_linear_decay_to_zero():
    assert warmup_steps(1000, 0.01) == 10
    assert lr_at(1, **KW) == pytest.approx(1e-5)  # peak / warmup
    assert lr_at(10, **KW) == pytest.approx(1e-4)
    assert lr_at(505, **KW) == pytest.approx(1e-4 * (1 - 495 / 990))
    assert lr_at(1000, **KW) == 0.0


def test_polynomial_power_and_end_lr():
    kw = {**KW, "power": 2.0, "end_lr": 1e-6}
    assert lr_at(505, **kw) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5**2)
    assert lr_at(1000, **kw) == 1e-6


def test_no_warmup_starts_at_peak():
    assert lr_at(1, **{**KW, "warmup_ratio": 0.0}) == pytest.approx(1e-4 * (1 - 1 / 1000))


def test_set_lr_sets_every_parameter_group():
    opt = torch.optim.AdamW(
        [{"params": [torch.nn.Parameter(torch.zeros(1))]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 3.0}],
        lr=1e-4,
    )
    set_lr(opt, lr_at(7, **KW))
    assert [g["lr"] for g in opt.param_groups] == [lr_at(7, **KW)] * 2 == [pytest.approx(7e-5)] * 2

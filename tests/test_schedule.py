import pytest
import torch

from ofa_ds.train.schedule import lr_at, scheduler, warmup_steps

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


def test_scheduler_gives_update_t_its_rate_and_continues_from_a_state_dict():
    def make():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
        return opt, scheduler(opt, steps=1000, warmup_ratio=0.01, power=1.0, end_lr=0.0)

    opt, sched = make()
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])  # the rate the next update runs at
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(t, **KW) for t in range(1, 21)])
    opt2, sched2 = make()
    sched2.load_state_dict(sched.state_dict())
    opt2.step()
    sched2.step()
    opt.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(lr_at(22, **KW))

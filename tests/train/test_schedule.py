import math

import pytest
import torch

from facecompat.train.schedule import WarmupScheduler, cosine_lr, poly_lr


def test_poly_lr_warmup_then_linear_decay_to_zero():
    lrs = [poly_lr(s, base_lr=0.1, total_steps=10, warmup_steps=2) for s in range(11)]
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == pytest.approx(0.1)
    assert lrs[2] == pytest.approx(0.1)
    assert lrs[6] == pytest.approx(0.05)  # halfway through the 8 decay steps
    assert lrs[10] == 0.0
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_poly_power_two_matches_the_formula():
    assert poly_lr(5, base_lr=1.0, total_steps=10, power=2.0) == pytest.approx(0.25)


def test_scheduler_state_restores_the_learning_rate():
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": params}, {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=0.2)
    sched = WarmupScheduler(opt, total_steps=8, warmup_steps=1)
    for _ in range(3):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([{"params": params}, {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=0.2)
    sched2 = WarmupScheduler(opt2, total_steps=8, warmup_steps=1)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert sched.get_last_lr()[0] == pytest.approx(poly_lr(3, base_lr=0.2, total_steps=8, warmup_steps=1))


def test_poly_lr_rejects_no_steps():
    with pytest.raises(ValueError, match="total_steps"):
        poly_lr(0, base_lr=0.1, total_steps=0)


def test_cosine_lr_warms_up_then_follows_the_half_cosine_to_zero():
    lrs = [cosine_lr(s, base_lr=0.1, total_steps=10, warmup_steps=2) for s in range(11)]
    assert lrs[:2] == pytest.approx([0.05, 0.1])
    assert lrs[2] == pytest.approx(0.1) and lrs[6] == pytest.approx(0.05) and lrs[10] == pytest.approx(0.0)
    assert lrs[4] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    with pytest.raises(ValueError, match="total_steps must be positive"):
        cosine_lr(0, base_lr=0.1, total_steps=0)


def test_scheduler_decay_is_checked_and_cosine_is_applied_per_step():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    with pytest.raises(ValueError, match="decay must be one of"):
        WarmupScheduler(opt, total_steps=4, decay="step")
    sched = WarmupScheduler(opt, total_steps=4, decay="cosine")
    seen = []
    for _ in range(4):
        seen.append(sched.get_last_lr()[0])
        sched.step()
    assert seen == pytest.approx([cosine_lr(s, base_lr=0.4, total_steps=4) for s in range(4)])
    assert sched.state_dict()["decay"] == "cosine"

import pytest
import torch

from facecompat.train.schedule import PolyWarmupScheduler, poly_lr


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
    sched = PolyWarmupScheduler(opt, total_steps=8, warmup_steps=1)
    for _ in range(3):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([{"params": params}, {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=0.2)
    sched2 = PolyWarmupScheduler(opt2, total_steps=8, warmup_steps=1)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert sched.get_last_lr()[0] == pytest.approx(poly_lr(3, base_lr=0.2, total_steps=8, warmup_steps=1))


def test_poly_lr_rejects_no_steps():
    with pytest.raises(ValueError, match="total_steps"):
        poly_lr(0, base_lr=0.1, total_steps=0)

"""Tests of scrimp/training/schedule.py against the GaLore paper's formula computed in float64 by hand."""

from __future__ import annotations

import math

import pytest
import torch

from scrimp.training.schedule import WarmupCosineScheduler, check_schedule, cosine_with_warmup


def _reference(step, warmup, total, ratio):
    # GaLore training_utils: linear warmup from 0, then cosine from 1 to ratio over the rest.
    if step < warmup:
        return step / warmup
    progress = (step - warmup) / (total - warmup)
    return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@pytest.mark.parametrize("warmup,total,ratio", [(10, 100, 0.1), (0, 50, 0.0), (5, 20, 1.0)])
def test_multiplier_matches_reference(warmup, total, ratio):
    for step in range(total + 5):
        assert cosine_with_warmup(step, warmup, total, ratio) == pytest.approx(_reference(step, warmup, total, ratio))
    assert cosine_with_warmup(total, warmup, total, ratio) == pytest.approx(ratio)


def test_scheduler_sets_group_lrs_and_resumes():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p], "lr": 0.5}], lr=0.5)
    sched = WarmupCosineScheduler(opt, 3, 10, 0.1)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == pytest.approx([0.5 * _reference(s, 3, 10, 0.1) for s in range(10)])
    opt2 = torch.optim.SGD([{"params": [p], "lr": 0.5}], lr=0.5)
    resumed = WarmupCosineScheduler(opt2, 3, 10, 0.1)
    resumed.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_bad_schedule_is_one_sentence():
    with pytest.raises(ValueError, match="min_lr_ratio must be in"):
        check_schedule(0, 10, 1.5)
    with pytest.raises(ValueError, match="warmup_steps must be a non-negative integer"):
        check_schedule(-1, 10, 0.1)

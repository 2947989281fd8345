"""Learning-rate schedule of the GaLore paper: linear warmup, then cosine decay to a minimum ratio.

Zhao et al., 2024 (GaLore), Sec. 5 / their ``training_utils.get_scheculer(scheduler_type="cosine",
min_lr_ratio=0.1)``: the multiplier rises linearly from 0 (at step 0) to 1 over ``warmup_steps`` and then
follows half a cosine from 1 down to ``min_lr_ratio`` at ``total_steps``, staying there after.

    from scrimp.training.schedule import cosine_with_warmup
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, 100, 10_000, 0.1))
"""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The LR multiplier at optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def check_schedule(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> None:
    """Raise one sentence for a schedule that cannot be meant."""
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"module.warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"module.min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    if total_steps is not None and total_steps < 1:
        raise ValueError(f"the schedule needs a positive number of steps, got {total_steps!r}")


class WarmupCosineScheduler:
    """Sets ``lr = base_lr * cosine_with_warmup(step)`` on every param group of an optimizer.

    Works for ``torch.optim.Optimizer`` and for wrappers that only expose ``param_groups``
    (the layer-wise optimizer); ``state_dict``/``load_state_dict`` make it resumable.
    """

    def __init__(self, optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float):
        check_schedule(warmup_steps, total_steps, min_lr_ratio)
        self.optimizer = optimizer
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        for group, base in zip(optimizer.param_groups, self.base_lrs):
            group["initial_lr"] = base
        self.last_step = 0
        self._apply()

    def _apply(self) -> None:
        factor = cosine_with_warmup(self.last_step, self.warmup_steps, self.total_steps, self.min_lr_ratio)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "base_lrs": list(self.base_lrs), "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "min_lr_ratio": self.min_lr_ratio}

    def load_state_dict(self, state: dict) -> None:
        # Only the position is restored: the lr and the schedule's shape are the run's own settings, which
        # may change on resume (the saved base_lrs would silently keep the old lr).
        self.last_step = int(state["last_step"])
        self._apply()

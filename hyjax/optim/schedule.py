"""The learning-rate schedule of a run's `train` section (first- and zeroth-order updates alike)."""

from __future__ import annotations

import optax

SCHEDULES = ("cosine", "linear", "constant")  # train.schedule, after the warmup

def learning_rate_schedule(train, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `train.warmup_steps`, then cosine / linear decay to
    `learning_rate * final_lr_fraction` at `total_steps`, or constant."""
    peak = train.learning_rate
    decay_steps = max(total_steps - train.warmup_steps, 1)
    if train.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=train.final_lr_fraction)
    elif train.schedule == "linear":
        after = optax.linear_schedule(peak, peak * train.final_lr_fraction, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if train.warmup_steps == 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, train.warmup_steps)
    return optax.join_schedules([warmup, after], [train.warmup_steps])

"""The learning-rate schedule of every algorithm: linear warmup, then constant, linear or cosine
decay, stepped once per optimizer step (``lr_schedule`` in ``conf/config.yaml``).

The shapes are transformers' (:func:`transformers.get_scheduler`), the ones TRL and verl
expose: after ``warmup_steps`` steps rising linearly from 0 to the optimizer's learning rate,
``linear`` and ``cosine`` fall to 0 at ``total_steps`` (``trainer.max_steps``), ``constant``
stays. The default, ``constant`` without warmup, multiplies the learning rate by exactly 1 at
every step: the behaviour of a run without a schedule.
"""

from __future__ import annotations

import torch

#: the decays after warmup, by the name of transformers' scheduler that draws them
DECAYS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def lr_scheduler(
    optimizer: torch.optim.Optimizer, decay: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The scheduler of ``optimizer``: ``warmup_steps`` of linear warmup, then ``decay``
    (a key of :data:`DECAYS`) until ``total_steps``."""
    from transformers import get_scheduler

    if decay not in DECAYS:
        raise ValueError(f"lr_schedule.decay={decay!r} is not known; allowed: {list(DECAYS)}")
    if not 0 <= warmup_steps < max(total_steps, 1):
        raise ValueError(
            f"lr_schedule.warmup_steps={warmup_steps!r}; allowed: an integer in "
            f"[0, trainer.max_steps={total_steps})"
        )
    return get_scheduler(
        DECAYS[decay],
        optimizer,
        num_warmup_steps=int(warmup_steps),
        num_training_steps=int(total_steps),
    )


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the next optimizer step uses (of the first parameter group)."""
    return float(optimizer.param_groups[0]["lr"])

"""DAPO options: overlong reward shaping and the dynamic-sampling group filter."""

from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward.

    lengths [B] int (response tokens) -> [B] float: 0 up to `max_new_tokens - buffer`, then a linear
    ramp down to `-penalty` at `max_new_tokens` (and beyond).
    """
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32)
    start = max_new_tokens - buffer
    over = (lengths.float() - start).clamp(min=0, max=buffer)
    return -penalty * over / buffer


def informative_groups(advantages: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling: advantages [B], group_ids [B] -> keep [B] bool, False for every row of a
    group that carries no learning signal (all advantages zero: rewards that all agree under a
    group-relative estimator, or a BRPO group dropped by the skew filter)."""
    keep = torch.ones(advantages.shape, dtype=torch.bool)
    for g in torch.unique(group_ids):
        rows = group_ids == g
        if bool((advantages[rows] == 0).all()):
            keep[rows] = False
    return keep

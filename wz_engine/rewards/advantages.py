"""Advantages from rewards: BRPO (skew filter) or a group-relative estimator, via wz_kernels."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Advantages:
    values: torch.Tensor
    """[B] float32 advantage per rollout."""
    kept: torch.Tensor
    """[B] bool: False for rows of groups dropped by BRPO's skew filter (all True otherwise)."""


def compute_advantages(estimator: str, rewards: torch.Tensor, group_ids: torch.Tensor,
                       skew_threshold: float = 0.6) -> Advantages:
    """rewards [B], group_ids [B] -> Advantages. "brpo" takes the +1/-1/0 pairwise rewards as they
    are (A = r) and zeroes groups failing the skew filter; the others are group-relative."""
    from wz_kernels.advantage import brpo_advantages, group_advantages

    if estimator == "brpo":
        values, kept = brpo_advantages(rewards, group_ids, skew_threshold=skew_threshold)
        return Advantages(values.float(), kept.bool())
    values = group_advantages(rewards.float(), group_ids, estimator)
    return Advantages(values.float(), torch.ones_like(values, dtype=torch.bool))

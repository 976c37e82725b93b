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


def loss_rows(estimator: str, is_reference: torch.Tensor, keep_reference: bool) -> torch.Tensor:
    """[B] bool rows that enter the loss: BRPO leaves each group's reference out unless
    `keep_reference` (then it stays in with A = 0); other estimators keep every row."""
    if estimator == "brpo" and not keep_reference:
        return ~is_reference
    return torch.ones_like(is_reference, dtype=torch.bool)

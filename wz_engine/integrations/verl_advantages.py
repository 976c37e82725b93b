"""verl's outcome advantage estimators by verl's names and signatures, backed by wz group statistics.

Semantics follow `verl/trainer/ppo/core_algos.py` of verl 0.9.1: the score of a row is the sum of its
`token_level_rewards` (every column, masked or not), rows are grouped by `index` (uids: strings, UUIDs,
ints, a tensor or ndarray), the advantage is broadcast over the tokens and multiplied by `response_mask`;
`(advantages, returns)` are the same tensor, as in verl.

Precision and dtypes: float64 rewards are computed in float64 throughout (the vectorised float64
reference of `wz_kernels.advantage`: no float32 rounding before the group statistics, so rewards like
1e4 + 0.01 x noise lose nothing); float32 / bf16 / fp16 rewards go through `group_advantages` (the
one-launch Triton kernel on CUDA, float32 out). The result has the dtype torch's promotion of the
rewards' and the mask's dtypes gives (float64 for float64 rewards), as verl's does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from wz_kernels.advantage import group_advantages, group_advantages_reference

__all__ = [
    "ADV_ESTIMATORS",
    "compute_gpg_outcome_advantage",
    "compute_grpo_outcome_advantage",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_rloo_vectorized_outcome_advantage",
    "get_adv_estimator_fn",
    "index_to_group_ids",
]


def index_to_group_ids(index: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """verl's `index` (uids per row: ints, strings, UUIDs, a tensor or ndarray) -> int64 group ids [B].

    Integer input passes through unchanged (our kernels accept any ints as group ids); anything else is
    factorised with `numpy.unique(..., return_inverse=True)`, vectorised, no Python loop over rows.
    Mixed, unorderable types fall back to factorising their `str()`.
    """
    if isinstance(index, torch.Tensor):
        flat = index.reshape(-1)
        if flat.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
            return flat.to(device=device, dtype=torch.long)
        _, inverse = torch.unique(flat, return_inverse=True)
        return inverse.to(device=device, dtype=torch.long)
    arr = np.asarray(index)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype.kind in "iub":
        return torch.from_numpy(arr.astype(np.int64)).to(device)
    try:
        _, inverse = np.unique(arr, return_inverse=True)
    except TypeError:  # e.g. a mix of str and int uids: not orderable together
        _, inverse = np.unique(np.array([str(x) for x in arr.tolist()], dtype=object), return_inverse=True)
    return torch.from_numpy(inverse.reshape(-1).astype(np.int64)).to(device)


def _check_padded(name_to_tensor: dict[str, torch.Tensor]) -> tuple[int, int]:
    shapes = {name: tuple(t.shape) for name, t in name_to_tensor.items()}
    first_name, first = next(iter(shapes.items()))
    if len(first) != 2:
        raise ValueError(f"{first_name} must be a padded [B, T] tensor, got shape {first}")
    for name, shape in shapes.items():
        if shape != first:
            raise ValueError(f"{name} has shape {shape} but {first_name} has {first}: all must be [B, T]")
    return first


def _outcome_scores(token_level_rewards, response_mask, index):
    _check_padded({"token_level_rewards": token_level_rewards, "response_mask": response_mask})
    scores = token_level_rewards.sum(dim=-1)  # verl sums every column, masked or not
    group_ids = index_to_group_ids(index, scores.device)
    if group_ids.numel() != scores.numel():
        raise ValueError(f"index has {group_ids.numel()} entries for {scores.numel()} rows")
    return scores, group_ids


def _advantages(scores: torch.Tensor, group_ids: torch.Tensor, estimator: str, **kwargs) -> torch.Tensor:
    """[B] in scores' dtype: float64 math for float64 scores, the float32 kernel otherwise."""
    if scores.dtype == torch.float64:
        return group_advantages_reference(scores, group_ids, estimator, upcast=True, **kwargs)
    return group_advantages(scores.float(), group_ids, estimator=estimator, **kwargs).to(scores.dtype)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl_F.masked_mean: sum(values * mask) / (mask.sum() + 1e-8)."""
    m = mask.to(values.dtype)
    return (torch.where(mask.bool(), values, 0.0) * m).sum() / (m.sum() + 1e-8)


@torch.no_grad()
def compute_grpo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any,
                                   epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True,
                                   config: Any = None):
    """verl's GRPO outcome advantage -> (advantages [B, T], returns [B, T]).

    A = (score - mean_g) / (std_g + epsilon) with the unbiased std, or score - mean_g when
    `norm_adv_by_std_in_grpo` is False (Dr. GRPO); a singleton group uses mean 0, std 1.
    """
    scores, group_ids = _outcome_scores(token_level_rewards, response_mask, index)
    if norm_adv_by_std_in_grpo:
        adv = _advantages(scores, group_ids, "grpo", eps=epsilon)
    else:
        adv = _advantages(scores, group_ids, "dr_grpo")  # a singleton keeps its score, as in verl
    out = adv.unsqueeze(-1) * response_mask
    return out, out


@torch.no_grad()
def compute_rloo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any,
                                   epsilon: float = 1e-6, config: Any = None, **kwargs):
    """verl's RLOO: score minus the mean of the other rows of its group; a singleton keeps its score."""
    scores, group_ids = _outcome_scores(token_level_rewards, response_mask, index)
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    # the kernel gives a singleton 0 (no "others"); verl's loop version passes its score through
    adv = torch.where(counts[inverse] > 1, _advantages(scores, group_ids, "rloo"), scores)
    out = adv.unsqueeze(-1) * response_mask
    return out, out


@torch.no_grad()
def compute_rloo_vectorized_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                                              index: Any, epsilon: float = 1e-6, config: Any = None,
                                              **kwargs):
    """verl's vectorised RLOO: as RLOO, but a singleton gets 0 (the kernel's own convention)."""
    scores, group_ids = _outcome_scores(token_level_rewards, response_mask, index)
    out = _advantages(scores, group_ids, "rloo").unsqueeze(-1) * response_mask
    return out, out


@torch.no_grad()
def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards: torch.Tensor,
                                                           response_mask: torch.Tensor, index: Any,
                                                           epsilon: float = 1e-6, config: Any = None,
                                                           **kwargs):
    """verl's REINFORCE++-baseline: score - mean_g (singleton: score), broadcast over tokens, then whitened
    over the valid TOKENS of the batch (verl's `masked_whiten`: token-weighted mean, unbiased variance,
    rsqrt(var + 1e-8)) and multiplied by the mask.

    The group baseline runs in the wz group statistics; the whitening stays token-weighted as in verl, which
    is why the kernel's own `reinforce_pp_baseline` (whitened once per sequence) is not used here.
    """
    scores, group_ids = _outcome_scores(token_level_rewards, response_mask, index)
    centred = _advantages(scores, group_ids, "dr_grpo")  # a singleton keeps its score, as in verl
    values = centred.unsqueeze(-1) * response_mask
    mask = response_mask.to(values.dtype)
    count = mask.sum()
    if count <= 1:
        raise ValueError(f"response_mask must select at least 2 tokens for whitening, "
                         f"got {int(count.item())}")
    mean = _masked_mean(values, mask)
    var = _masked_mean((values - mean) ** 2, mask) * count / (count - 1)
    out = (values - mean) * torch.rsqrt(var + 1e-8) * mask
    return out, out


@torch.no_grad()
def compute_gpg_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any,
                                  epsilon: float = 1e-6, f_norm: float = 1.0, alpha: float = 1.0,
                                  config: Any = None, **kwargs):
    """verl's GPG: A = alpha * (score - mean_g) / f_norm with alpha = B / max(#rows with a non-zero score, 1)
    (verl recomputes alpha and ignores the argument; so does this); a singleton keeps its score. alpha is
    exact here (verl's is the float32 quotient)."""
    scores, group_ids = _outcome_scores(token_level_rewards, response_mask, index)
    alpha = scores.numel() / max(int(torch.count_nonzero(scores)), 1)
    adv = _advantages(scores, group_ids, "dr_grpo") * (alpha / f_norm)
    out = adv.unsqueeze(-1) * response_mask
    return out, out


ADV_ESTIMATORS: dict[str, Callable] = {
    "grpo": compute_grpo_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "rloo_vectorized": compute_rloo_vectorized_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
    "gpg": compute_gpg_outcome_advantage,
}
# verl's other names, and why they are not here (grpo_vectorized is GRPO with a variance floor of eps and
# float32 sums: use "grpo", the same estimator computed exactly)
NOT_PROVIDED = {
    "grpo_vectorized": "use 'grpo' (the same estimator; verl's vectorised one floors the variance at "
                       "epsilon)",
    "gae": "needs a value model", "reinforce_plus_plus": "token-level discounted returns, no group baseline",
    "remax": "needs greedy-baseline rewards", "opo": "length-weighted baseline", "grpo_passk": "pass@k",
    "gdpo": "per-dimension rewards", "optimal_token_baseline": "needs per-token variances",
    "tir_optimal_token_baseline": "needs per-token variances",
}


def get_adv_estimator_fn(name_or_enum: Any) -> Callable:
    """verl's `get_adv_estimator_fn` for the estimators implemented here (a name or an AdvantageEstimator).

    Any other name is a ValueError listing the ones provided (and, for verl's others, why not)."""
    name = getattr(name_or_enum, "value", name_or_enum)
    if name in ADV_ESTIMATORS:
        return ADV_ESTIMATORS[name]
    why = f" ({NOT_PROVIDED[name]})" if name in NOT_PROVIDED else ""
    raise ValueError(f"advantage estimator {name!r} is not provided by wz{why}; "
                     f"available: {sorted(ADV_ESTIMATORS)}")

"""verl's policy-loss, KL and advantage functions, by verl's names and semantics, backed by wz kernels.

A verl user swaps an import::

    # from verl.trainer.ppo.core_algos import compute_policy_loss, agg_loss, kl_penalty, ...
    from wz_engine.integrations.verl import compute_policy_loss, agg_loss, kl_penalty, ...

Semantics follow `verl/trainer/ppo/core_algos.py` (volcengine/verl, Jan 2026): inputs are padded
[B, T] tensors with a `response_mask`, advantage estimators group rows by an `index` array of uids
(strings, UUIDs or ints, as verl's `uid` column). Differences from verl, all deliberate:

- Nothing loops over samples in Python: uids are factorised once with `numpy.unique(return_inverse=True)`
  and the group statistics run in `wz_kernels.group_advantages` (one segmented launch on GPU).
- The policy loss runs in `wz_kernels.policy_loss` over the packed valid tokens; the returned metrics
  (`pg_clipfrac`, `ppo_kl`, `pg_clipfrac_lower`) are computed exactly as verl does, on the padded tensors.
- Arguments after `response_mask` are keyword-only in `compute_policy_loss`: verl's deprecated function
  takes `cliprange` fifth while its registered `vanilla` loss takes `loss_agg_mode` fifth, so a positional
  call is ambiguous; a keyword-only signature turns that ambiguity into a TypeError instead of a silent
  wrong answer.
- Bad input raises ValueError (verl asserts or raises NotImplementedError). `kl_penalty("k3+")` follows
  verl's documentation (k3 value, k2 gradient).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

# Imported from the defining modules: `wz_kernels.policy_loss` is both a module and a lazily exported
# function, and once the module is imported the package attribute is the module.
from wz_kernels.advantage import group_advantages
from wz_kernels.policy_loss import aggregation_weights, policy_loss

__all__ = [
    "ADV_ESTIMATORS",
    "KL_PENALTIES",
    "LOSS_AGG_MODES",
    "agg_loss",
    "compute_grpo_outcome_advantage",
    "compute_policy_loss",
    "compute_policy_loss_vanilla",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "get_adv_estimator_fn",
    "index_to_group_ids",
    "kl_penalty",
]

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_PENALTIES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")


# ----------------------------------------------------------------------------------------------------------
# uids -> group ids
# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# shared input checks and packing
# ----------------------------------------------------------------------------------------------------------
def _check_padded(name_to_tensor: dict[str, torch.Tensor]) -> tuple[int, int]:
    shapes = {name: tuple(t.shape) for name, t in name_to_tensor.items()}
    first_name, first = next(iter(shapes.items()))
    if len(first) != 2:
        raise ValueError(f"{first_name} must be a padded [B, T] tensor, got shape {first}")
    for name, shape in shapes.items():
        if shape != first:
            raise ValueError(f"{name} has shape {shape} but {first_name} has {first}: all must be [B, T]")
    return first


def _packed_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean selector of the valid tokens and the row (sequence) id of each selected token."""
    valid = mask.bool()
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(valid)
    return valid, rows[valid]


def _agg_options(loss_agg_mode: str, *, dp_size: int, batch_num_tokens, global_batch_size,
                 loss_scale_factor, response_length: int) -> dict:
    """verl's `agg_loss` arguments -> wz `policy_loss` aggregation keywords (same agg names)."""
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if loss_agg_mode == "token-mean":
        # verl: sum / batch_num_tokens * dp_size
        gt = None if batch_num_tokens is None else float(batch_num_tokens) / dp_size
        if gt is None and dp_size != 1:
            raise ValueError("dp_size != 1 needs batch_num_tokens (verl scales a global count, not a local one)")
        return {"agg": "token-mean", "global_tokens": gt}
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        # verl: sum over non-empty rows / (global_batch_size or #non-empty rows) * dp_size
        gs = None if global_batch_size is None else float(global_batch_size) / dp_size
        if gs is None and dp_size != 1:
            raise ValueError("dp_size != 1 needs global_batch_size (verl scales a global count, not a local one)")
        return {"agg": loss_agg_mode, "global_seqs": gs}
    # seq-mean-token-sum-norm: verl divides the plain token sum by the constant alone (no row count)
    scale = response_length if loss_scale_factor is None else loss_scale_factor
    return {"agg": "seq-mean-token-sum-norm", "global_seqs": 1, "loss_scale": float(scale)}


# ----------------------------------------------------------------------------------------------------------
# aggregation, KL, policy loss
# ----------------------------------------------------------------------------------------------------------
def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens: int | None = None, global_batch_size: int | None = None,
             loss_scale_factor: int | None = None) -> torch.Tensor:
    """verl's `agg_loss`: a [B, T] per-token loss and mask -> scalar, through wz `aggregation_weights`.

    token-mean: sum / (batch_num_tokens or mask.sum()) * dp_size; seq-mean-token-sum / -token-mean: mean over
    rows with at least one token (or / global_batch_size * dp_size); seq-mean-token-sum-norm: token sum /
    loss_scale_factor (default T). Differentiable in `loss_mat`.
    """
    _check_padded({"loss_mat": loss_mat, "loss_mask": loss_mask})
    opts = _agg_options(loss_agg_mode, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                        global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor,
                        response_length=loss_mask.shape[-1])
    valid, seq_ids = _packed_rows(loss_mask)
    weights = aggregation_weights(torch.ones_like(seq_ids, dtype=loss_mat.dtype), seq_ids=seq_ids,
                                             **opts)
    return (weights.to(loss_mat.dtype) * loss_mat[valid]).sum()


def _kl_value(logprob: torch.Tensor, ref_logprob: torch.Tensor, name: str) -> torch.Tensor:
    if name in ("kl", "k1"):
        return logprob - ref_logprob
    if name == "abs":
        return (logprob - ref_logprob).abs()
    if name in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    if name in ("low_var_kl", "k3"):
        # verl clamps the log-ratio to +-20 before exp and the estimate to +-10
        log_ratio = torch.clamp(ref_logprob - logprob, min=-20, max=20)
        return torch.clamp(torch.exp(log_ratio) - log_ratio - 1, min=-10, max=10)
    raise ValueError(f"kl_penalty must be one of {KL_PENALTIES} (optionally with a '+' suffix), got {name!r}")


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty: str) -> torch.Tensor:
    """verl's per-token KL estimate between the policy and the reference, by estimator name.

    "kl"/"k1": d; "abs": |d|; "mse"/"k2": d^2/2; "low_var_kl"/"k3": exp(-d) + d - 1 (d = logprob - ref_logprob,
    -d clamped to +-20, the estimate to +-10). A "+" suffix (e.g. "k3+") keeps the estimator's value and uses
    the k2 gradient (straight-through), as verl documents. "full" needs whole-vocabulary logits: ValueError.
    """
    if logprob.shape != ref_logprob.shape:
        raise ValueError(f"logprob {tuple(logprob.shape)} and ref_logprob {tuple(ref_logprob.shape)} differ")
    if kl_penalty == "full":
        raise ValueError("kl_penalty='full' needs whole-vocabulary logits, which this integration never builds")
    straight_through = kl_penalty.endswith("+") and kl_penalty not in ("mse+", "k2+")
    value = _kl_value(logprob, ref_logprob, kl_penalty.rstrip("+"))
    if not straight_through:
        return value
    k2 = 0.5 * (logprob - ref_logprob).square()
    return k2 - k2.detach() + value.detach()


def compute_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, *, loss_agg_mode: str = "token-mean",
                        cliprange: float | None = None, cliprange_low: float | None = None,
                        cliprange_high: float | None = None, clip_ratio_c: float = 3.0, dp_size: int = 1,
                        batch_num_tokens: int | None = None, global_batch_size: int | None = None,
                        loss_scale_factor: int | None = None):
    """verl's dual-clip PPO policy loss on padded [B, T] tensors -> (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower).

    ratio = exp(clamp(log_prob - old_log_prob, +-20)); per token max(-A*ratio, -A*clip(ratio, 1-low, 1+high)),
    and for A < 0 additionally capped at -A*clip_ratio_c; aggregated by `loss_agg_mode` (see `agg_loss`, whose
    global-batch keywords are accepted here too). `pg_loss` is differentiable in `log_prob`; the three metrics are
    0-d tensors: fraction of valid tokens where the clipped term is active, mean of old - new log-prob, fraction
    where the dual clip is active.
    """
    _check_padded({"old_log_prob": old_log_prob, "log_prob": log_prob, "advantages": advantages,
                   "response_mask": response_mask})
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1.0 for dual-clip PPO, got {clip_ratio_c}")
    cliprange_low = cliprange if cliprange_low is None else cliprange_low
    cliprange_high = cliprange if cliprange_high is None else cliprange_high
    if cliprange_low is None or cliprange_high is None:
        raise ValueError("give cliprange, or both cliprange_low and cliprange_high")
    opts = _agg_options(loss_agg_mode, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                        global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor,
                        response_length=response_mask.shape[-1])
    valid, seq_ids = _packed_rows(response_mask)
    dtype = log_prob.dtype
    pg_loss, _ = policy_loss(
        log_prob[valid], old_log_prob[valid].to(dtype), advantages[valid].to(dtype),
        torch.ones_like(seq_ids, dtype=dtype), seq_ids=seq_ids, clip_low=float(cliprange_low),
        clip_high=float(cliprange_high), dual_clip=float(clip_ratio_c), kl_coef=0.0, **opts)
    with torch.no_grad():
        pg_clipfrac, ppo_kl, pg_clipfrac_lower = _ppo_metrics(
            old_log_prob, log_prob.detach(), advantages, response_mask, cliprange_low, cliprange_high, clip_ratio_c)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def compute_policy_loss_vanilla(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                                rollout_is_weights: torch.Tensor | None = None):
    """verl's registered "vanilla" policy loss -> (pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl",
    "actor/pg_clipfrac_lower": float}).

    `config` is verl's ActorConfig or anything with `clip_ratio`, `clip_ratio_low`, `clip_ratio_high`, optional
    `clip_ratio_c` (default 3.0) and optional `global_batch_info` (dict of `agg_loss` keywords).
    `rollout_is_weights` [B, T] (non-negative, no gradient) multiply the per-token loss; since the dual-clip
    objective is positively homogeneous in A, that equals scaling the advantages, which is how it is applied.
    """
    if config is None:
        raise ValueError("config is required (verl's ActorConfig or an object with clip_ratio* fields)")

    def field(name, default=None):
        return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)

    clip_ratio = field("clip_ratio")
    low = field("clip_ratio_low") if field("clip_ratio_low") is not None else clip_ratio
    high = field("clip_ratio_high") if field("clip_ratio_high") is not None else clip_ratio
    clip_ratio_c = field("clip_ratio_c", 3.0)
    global_info = dict(field("global_batch_info", None) or {})
    if rollout_is_weights is not None:
        _check_padded({"advantages": advantages, "rollout_is_weights": rollout_is_weights})
        if (rollout_is_weights < 0).any():
            raise ValueError("rollout_is_weights must be non-negative")
        advantages = advantages * rollout_is_weights.detach()
    pg_loss, clipfrac, ppo_kl, clipfrac_lower = compute_policy_loss(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode=loss_agg_mode, cliprange_low=low,
        cliprange_high=high, clip_ratio_c=clip_ratio_c, **global_info)
    return pg_loss, {"actor/pg_clipfrac": clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
                     "actor/pg_clipfrac_lower": clipfrac_lower.item()}


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl_F.masked_mean: sum(values * mask) / (mask.sum() + 1e-8)."""
    m = mask.to(values.dtype)
    return (torch.where(mask.bool(), values, 0.0) * m).sum() / (m.sum() + 1e-8)


def _ppo_metrics(old_log_prob, log_prob, advantages, mask, low, high, clip_ratio_c):
    """verl's three PPO diagnostics, exactly as verl computes them."""
    neg_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    loss1 = -advantages * ratio
    loss2 = -advantages * torch.clamp(ratio, 1 - low, 1 + high)
    clipped = torch.maximum(loss1, loss2)
    pg_clipfrac = _masked_mean(torch.gt(loss2, loss1).to(log_prob.dtype), mask)
    lower = torch.gt(clipped, -advantages * clip_ratio_c) & (advantages < 0)
    return pg_clipfrac, _masked_mean(-neg_kl, mask), _masked_mean(lower.to(log_prob.dtype), mask)


# ----------------------------------------------------------------------------------------------------------
# outcome advantage estimators
# ----------------------------------------------------------------------------------------------------------
def _outcome_scores(token_level_rewards, response_mask, index):
    _check_padded({"token_level_rewards": token_level_rewards, "response_mask": response_mask})
    scores = token_level_rewards.sum(dim=-1)  # verl sums every column, masked or not
    group_ids = index_to_group_ids(index, scores.device)
    if group_ids.numel() != scores.numel():
        raise ValueError(f"index has {group_ids.numel()} entries for {scores.numel()} rows")
    return scores, group_ids


def _group_sizes(group_ids: torch.Tensor) -> torch.Tensor:
    """Size of each row's group [B] (vectorised)."""
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    return counts[inverse]


def _advantages(scores, group_ids, estimator: str, **kwargs) -> torch.Tensor:
    adv = group_advantages(scores.float(), group_ids, estimator=estimator, **kwargs)
    return adv.to(scores.dtype)


@torch.no_grad()
def compute_grpo_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any,
                                   epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True, config: Any = None):
    """verl's GRPO outcome advantage -> (advantages [B, T], returns [B, T]) (the same tensor twice, as verl).

    score = row sum of `token_level_rewards`; A = (score - mean_g) / (std_g + epsilon) with the unbiased std, or
    score - mean_g when `norm_adv_by_std_in_grpo` is False (Dr. GRPO); a singleton group uses mean 0, std 1.
    Broadcast over the tokens and multiplied by `response_mask`.
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
    """verl's RLOO outcome advantage: score minus the mean of the other rows of its group (a singleton keeps its
    score) -> (advantages [B, T], returns [B, T])."""
    scores, group_ids = _outcome_scores(token_level_rewards, response_mask, index)
    # the kernel gives a singleton 0 (no "others"); verl passes its score through
    adv = torch.where(_group_sizes(group_ids) > 1, _advantages(scores, group_ids, "rloo"), scores)
    out = adv.unsqueeze(-1) * response_mask
    return out, out


@torch.no_grad()
def compute_reinforce_plus_plus_baseline_outcome_advantage(token_level_rewards: torch.Tensor,
                                                           response_mask: torch.Tensor, index: Any,
                                                           epsilon: float = 1e-6, config: Any = None, **kwargs):
    """verl's REINFORCE++-baseline: score - mean_g (singleton: score), broadcast over tokens, then whitened over
    the valid TOKENS of the batch (verl's `masked_whiten`: token-weighted mean, unbiased variance, rsqrt(var +
    1e-8)) and multiplied by the mask -> (advantages [B, T], returns [B, T]).

    The group baseline runs in `group_advantages`; the whitening stays token-weighted as in verl, which is why the
    kernel's own `reinforce_pp_baseline` (whitened once per sequence) is not used here.
    """
    scores, group_ids = _outcome_scores(token_level_rewards, response_mask, index)
    centred = _advantages(scores, group_ids, "dr_grpo")  # a singleton keeps its score, as in verl
    values = centred.unsqueeze(-1) * response_mask
    mask = response_mask.to(values.dtype)
    count = mask.sum()
    if count <= 1:
        raise ValueError(f"response_mask must select at least 2 tokens for whitening, got {int(count.item())}")
    mean = _masked_mean(values, mask)
    var = _masked_mean((values - mean) ** 2, mask) * count / (count - 1)
    out = (values - mean) * torch.rsqrt(var + 1e-8) * mask
    return out, out


ADV_ESTIMATORS: dict[str, Callable] = {
    "grpo": compute_grpo_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline_outcome_advantage,
}


def get_adv_estimator_fn(name: str) -> Callable:
    """verl's `get_adv_estimator_fn` for the estimators implemented here (ValueError naming the others)."""
    key = getattr(name, "value", name)
    if key not in ADV_ESTIMATORS:
        raise ValueError(f"advantage estimator {key!r} is not provided by wz; available: {sorted(ADV_ESTIMATORS)}")
    return ADV_ESTIMATORS[key]

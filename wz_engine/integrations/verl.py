"""verl's policy-loss, KL and advantage functions by verl's names, signatures and semantics, on wz kernels.

A verl user swaps an import::

    # from verl.trainer.ppo.core_algos import compute_policy_loss, agg_loss, kl_penalty, ...
    from wz_engine.integrations.verl import compute_policy_loss, agg_loss, kl_penalty, ...

Semantics and signatures (names and positional order) follow `verl/trainer/ppo/core_algos.py` of verl 0.9.1
(tests/engine/test_integration_verl_peer.py calls verl's own functions side by side): inputs are padded
[B, T] tensors with a `response_mask` (a float mask weights tokens, as verl's masked sums do), advantage
estimators group rows by an `index` array of uids (`wz_engine.integrations.verl_advantages`). Differences
from verl, all deliberate:

- Nothing loops over samples in Python: uids are factorised once with `numpy.unique(return_inverse=True)`
  and the group statistics are one vectorised pass (the Triton kernel on CUDA for float32 rewards).
- The policy loss runs in `wz_kernels.policy_loss` over the valid tokens; `pg_clipfrac`, `ppo_kl` and
  `pg_clipfrac_lower` are computed exactly as verl does, on the padded tensors and the unweighted advantages.
- `compute_policy_loss` takes verl's positional arguments (`cliprange` fifth, `loss_agg_mode` ninth) plus,
  keyword-only, `agg_loss`'s global-batch arguments and `rollout_is_weights` (verl's deprecated function
  has neither).
- Bad input raises ValueError (verl asserts or raises NotImplementedError). Garbage (NaN) in the padding
  never reaches a result (verl's seq-* modes turn it into NaN).

Precision and return dtypes: float64 inputs are computed in float64 end to end (the float64 policy-loss
reference, float64 aggregation weights, float64 group statistics); float32 / bf16 / fp16 inputs run the
float32 kernels. `compute_policy_loss` returns pg_loss as float64 for float64 `log_prob`, else float32 (the
kernel accumulates in float32; verl keeps the input dtype), and the three metrics in `log_prob`'s dtype;
`agg_loss` returns float64 for float64 `loss_mat`, else float32; `kl_penalty` keeps its inputs' dtype;
the advantage functions return the promotion of the rewards' and the mask's dtypes, as verl.
"""

from __future__ import annotations

from typing import Any

import torch

# Imported from the defining modules: `wz_kernels.policy_loss` is both a module and a lazily exported
# function, and once the module is imported the package attribute is the module.
from wz_engine.integrations.verl_advantages import (
    ADV_ESTIMATORS,
    _check_padded,
    _masked_mean,
    compute_gpg_outcome_advantage,
    compute_grpo_outcome_advantage,
    compute_reinforce_plus_plus_baseline_outcome_advantage,
    compute_rloo_outcome_advantage,
    compute_rloo_vectorized_outcome_advantage,
    get_adv_estimator_fn,
    index_to_group_ids,
)
from wz_kernels.policy_loss import policy_loss, policy_loss_reference

__all__ = [
    "ADV_ESTIMATORS",
    "KL_PENALTIES",
    "LOSS_AGG_MODES",
    "agg_loss",
    "compute_gpg_outcome_advantage",
    "compute_grpo_outcome_advantage",
    "compute_policy_loss",
    "compute_policy_loss_vanilla",
    "compute_reinforce_plus_plus_baseline_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_rloo_vectorized_outcome_advantage",
    "get_adv_estimator_fn",
    "index_to_group_ids",
    "kl_penalty",
]

LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                  "seq-mean-token-sum-norm")
KL_PENALTIES = ("kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3")


# ----------------------------------------------------------------------------------------------------------
# verl's aggregation as per-token weights
# ----------------------------------------------------------------------------------------------------------
def _token_weights(loss_mask: torch.Tensor, loss_agg_mode: str, dtype: torch.dtype, *, dp_size: int = 1,
                   batch_num_tokens=None, global_batch_size=None, loss_scale_factor=None) -> torch.Tensor:
    """[B, T] weights w with verl 0.9.1's `agg_loss(L, mask, mode, ...) == sum(w * L)` (masked tokens 0), in
    `dtype`, verl's arithmetic included (seq-mean-token-mean divides by the row's mask sum + 1e-8)."""
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {loss_agg_mode!r}")
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    m = loss_mask.to(dtype)
    if loss_agg_mode == "token-sum":
        return m * dp_size
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None and dp_size != 1:
            raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        tokens = m.sum() if batch_num_tokens is None else batch_num_tokens
        return m / tokens * dp_size
    if global_batch_size is None and dp_size != 1:
        raise ValueError("global_batch_size is required when dp_size > 1")
    row_tokens = m.sum(-1, keepdim=True)  # [B, 1]
    rows = (row_tokens > 0).to(dtype)  # rows with at least one token
    per_row = m / (row_tokens + 1e-8) if loss_agg_mode == "seq-mean-token-mean" else m
    weights = per_row * rows / (rows.sum() if global_batch_size is None else global_batch_size) * dp_size
    if loss_agg_mode == "seq-mean-token-sum-norm":
        weights = weights / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
    return weights


# ----------------------------------------------------------------------------------------------------------
# aggregation, KL, policy loss
# ----------------------------------------------------------------------------------------------------------
def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str, dp_size: int = 1,
             batch_num_tokens: int | None = None, global_batch_size: int | None = None,
             loss_scale_factor: int | None = None) -> torch.Tensor:
    """verl's `agg_loss`: a [B, T] per-token loss and mask -> scalar.

    token-mean: masked sum / (batch_num_tokens or mask.sum()) * dp_size; token-sum: masked sum * dp_size;
    seq-mean-token-sum / -token-mean: mean over rows with at least one token (or / global_batch_size *
    dp_size); seq-mean-token-sum-norm: seq-mean-token-sum / loss_scale_factor (default T). A fractional mask
    weights tokens, as in verl. Differentiable in `loss_mat`; float64 for float64 `loss_mat`, else float32.
    """
    _check_padded({"loss_mat": loss_mat, "loss_mask": loss_mask})
    dtype = torch.float64 if loss_mat.dtype == torch.float64 else torch.float32
    weights = _token_weights(loss_mask, loss_agg_mode, dtype, dp_size=dp_size,
                             batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size,
                             loss_scale_factor=loss_scale_factor)
    valid = loss_mask.bool()
    return (weights[valid] * loss_mat[valid].to(dtype)).sum()


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

    "kl"/"k1": d; "abs": |d|; "mse"/"k2": d^2/2; "low_var_kl"/"k3": exp(-d) + d - 1 (d = logprob - ref,
    -d clamped to +-20, the estimate to +-10). A "+" suffix (e.g. "k3+") keeps the estimator's value and uses
    the k2 gradient (straight-through), as verl documents. "full" needs whole-vocabulary logits: ValueError.
    """
    if logprob.shape != ref_logprob.shape:
        raise ValueError(f"logprob {tuple(logprob.shape)} and ref_logprob {tuple(ref_logprob.shape)} differ")
    if kl_penalty == "full":
        raise ValueError("kl_penalty='full' needs whole-vocabulary logits, which this integration never "
                         "builds")
    straight_through = kl_penalty.endswith("+") and kl_penalty not in ("mse+", "k2+")
    value = _kl_value(logprob, ref_logprob, kl_penalty.rstrip("+"))
    if not straight_through:
        return value
    k2 = 0.5 * (logprob - ref_logprob).square()
    return k2 - k2.detach() + value.detach()


def compute_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                        response_mask: torch.Tensor, cliprange: float | None = None,
                        cliprange_low: float | None = None, cliprange_high: float | None = None,
                        clip_ratio_c: float = 3.0, loss_agg_mode: str = "token-mean", *, dp_size: int = 1,
                        batch_num_tokens: int | None = None, global_batch_size: int | None = None,
                        loss_scale_factor: int | None = None, rollout_is_weights: torch.Tensor | None = None):
    """verl's dual-clip PPO policy loss on padded [B, T] tensors
    -> (pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower).

    Positional arguments as verl's (`compute_policy_loss(old, new, adv, mask, 0.2)`). ratio =
    exp(clamp(log_prob - old_log_prob, +-20)); per token max(-A*ratio, -A*clip(ratio, 1-low, 1+high)), and
    for A < 0 additionally capped at -A*clip_ratio_c; times `rollout_is_weights` [B, T] when given (verl's
    vanilla loss; any sign, no gradient); aggregated by `loss_agg_mode` (see `agg_loss`, whose global-batch
    keywords are accepted here too).
    `pg_loss` is differentiable in `log_prob`. The metrics are 0-d tensors computed as verl does, on the
    unweighted advantages: fraction of valid tokens where the clipped term is active, mean of old - new
    log-prob, fraction where the dual clip is active (A < 0).
    """
    _check_padded({"old_log_prob": old_log_prob, "log_prob": log_prob, "advantages": advantages,
                   "response_mask": response_mask})
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1.0 for dual-clip PPO, got {clip_ratio_c}")
    cliprange_low = cliprange if cliprange_low is None else cliprange_low
    cliprange_high = cliprange if cliprange_high is None else cliprange_high
    if cliprange_low is None or cliprange_high is None:
        raise ValueError("give cliprange, or both cliprange_low and cliprange_high")
    exact = log_prob.dtype == torch.float64  # float64 in: the float64 reference, float64 out
    weights = _token_weights(response_mask, loss_agg_mode, torch.float64 if exact else torch.float32,
                             dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                             global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor)
    valid = response_mask.bool()
    policy_mask = None
    if rollout_is_weights is not None:
        _check_padded({"advantages": advantages, "rollout_is_weights": rollout_is_weights})
        policy_mask = rollout_is_weights.detach()[valid]
    dtype = torch.float64 if exact else log_prob.dtype
    # verl's aggregation weights as the kernel's per-token mask weights: token-mean over a global count of 1
    kwargs = {"clip_low": float(cliprange_low), "clip_high": float(cliprange_high),
              "dual_clip": float(clip_ratio_c), "policy_mask": policy_mask, "agg": "token-mean",
              "global_tokens": 1.0}
    args = (log_prob[valid], old_log_prob[valid].to(dtype), advantages[valid].to(dtype), weights[valid])
    if exact:
        pg_loss, _ = policy_loss_reference(*args, upcast=True, **kwargs)
    else:
        pg_loss, _ = policy_loss(*args, **kwargs)
    with torch.no_grad():
        pg_clipfrac, ppo_kl, pg_clipfrac_lower = _ppo_metrics(
            old_log_prob, log_prob.detach(), advantages, response_mask, cliprange_low, cliprange_high,
            clip_ratio_c)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def compute_policy_loss_vanilla(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean",
                                config: Any = None, rollout_is_weights: torch.Tensor | None = None):
    """verl's registered "vanilla" policy loss -> (pg_loss, {"actor/pg_clipfrac", "actor/ppo_kl",
    "actor/pg_clipfrac_lower": float}).

    `config` is verl's ActorConfig or anything with `clip_ratio`, `clip_ratio_low`, `clip_ratio_high`,
    optional `clip_ratio_c` (default 3.0) and optional `global_batch_info` (dict of `agg_loss` keywords).
    `rollout_is_weights` [B, T] (no gradient) multiply the per-token loss after the clipping, as verl; the
    clip metrics are those of the unweighted advantages, as verl's.
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
    pg_loss, clipfrac, ppo_kl, clipfrac_lower = compute_policy_loss(
        old_log_prob, log_prob, advantages, response_mask, cliprange_low=low, cliprange_high=high,
        clip_ratio_c=clip_ratio_c, loss_agg_mode=loss_agg_mode, rollout_is_weights=rollout_is_weights,
        **global_info)
    return pg_loss, {"actor/pg_clipfrac": clipfrac.item(), "actor/ppo_kl": ppo_kl.item(),
                     "actor/pg_clipfrac_lower": clipfrac_lower.item()}


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

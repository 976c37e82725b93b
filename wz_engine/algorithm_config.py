"""The `[algorithm]` section of a run: estimator, policy loss and their settings (`AlgorithmConfig`), with
the soft policy losses' sub-sections (`algorithm.sapo`, `algorithm.vespo`, TRL 1.16's defaults).

Importable without torch (wz_engine.config imports it); the losses check their settings
(wz_engine/algorithms/losses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from wz_engine.envs.config import GiGPOConfig


@dataclass
class SAPOConfig:
    temperature_pos: float = 1.0
    """Gate temperature tau of tokens with A > 0 (TRL's sapo_temperature_pos): L = -sigmoid(tau (ratio - 1))
    * 4 / tau * A; a larger tau makes the gate steeper (closer to a hard clip). > 0."""
    temperature_neg: float = 1.05
    """Gate temperature of tokens with A <= 0 (TRL's sapo_temperature_neg). > 0."""

    def as_kernel(self) -> tuple[float, float]:
        return (self.temperature_pos, self.temperature_neg)


@dataclass
class VESPOConfig:
    k_pos: float = 2.0
    """Power k of the gamma weight phi(w) = exp(lambda + k log w - lambda w) for A >= 0 (TRL's vespo_k_pos):
    how hard sequences with a low ratio w (< 1) are down-weighted."""
    lambda_pos: float = 3.0
    """Decay lambda for A >= 0 (TRL's vespo_lambda_pos): how hard sequences with w > 1 are down-weighted. > 0."""
    k_neg: float = 3.0
    """Power k for A < 0 (TRL's vespo_k_neg)."""
    lambda_neg: float = 2.0
    """Decay lambda for A < 0 (TRL's vespo_lambda_neg). > 0."""

    def as_kernel(self) -> tuple[float, float, float, float]:
        return (self.k_pos, self.lambda_pos, self.k_neg, self.lambda_neg)


def check_soft_loss_config(key: str, values: dict[str, float], positive: tuple[str, ...]) -> None:
    """Raise ConfigError naming `key.field` for a non-finite value or a non-positive one in `positive`."""
    from wz_engine.config_loader import ConfigError

    for name, value in values.items():
        if not math.isfinite(value) or (name in positive and value <= 0):
            need = "a finite number > 0" if name in positive else "a finite number"
            raise ConfigError(f"{key}.{name}: must be {need}, got {value}")


@dataclass
class AlgorithmConfig:
    estimator: str = "brpo"
    """Advantage estimator (wz_engine.algorithms): "brpo" needs a pairwise judge; "grpo", "dr_grpo",
    "rloo", "reinforce_pp_baseline" take scalar rewards (with an env: episode returns, one row per
    trajectory); "gigpo" needs an env (see `gigpo`). Or a module path "pkg.module:name"."""
    gigpo: GiGPOConfig = field(default_factory=GiGPOConfig)
    """GiGPO settings (estimator = "gigpo", multi-turn runs with an `env`)."""
    policy_loss: str = "ppo_clip"
    """Policy loss (wz_engine.algorithms), each fused with the lm_head (clip, dual clip, delta, KL, `agg`):
    "ppo_clip" (token ratio), "gspo" (GSPO: one ratio per sequence, exp of its mean token log-ratio,
    clipped per sequence; the paper aggregates with agg = "seq-mean-token-mean"), "gspo_token" (GSPO-token:
    the sequence ratio's value, each token's own gradient), "luspo" (GSPO with each sequence's loss
    scaled by its length: agg "seq-mean-token-sum"), "cispo" (MiniMax-M1: -sg(clip(ratio, 1 - clip_low,
    1 + clip_high)) * A * logp, no gradient clipped away; clip_low = 1: no lower bound, as TRL; ScaleRL
    uses clip_high = 4), "sapo" (a sigmoid gate instead of the clip: `sapo`), "vespo" (a gamma weight of
    each sequence's summed log-ratio, no clip: `vespo`); or a module path "pkg.module:name" to a
    PolicyLoss of your own."""
    sapo: SAPOConfig = field(default_factory=SAPOConfig)
    """SAPO's gate temperatures (policy_loss = "sapo")."""
    vespo: VESPOConfig = field(default_factory=VESPOConfig)
    """VESPO's gamma-weight parameters (policy_loss = "vespo")."""
    custom: dict[str, Any] = field(default_factory=dict)
    """Options of a custom estimator or loss (a table, e.g. custom = { beta = 0.5 }); built-ins ignore it."""
    ppo_epochs: int = 1
    """Passes over each rollout batch. More than one optimizer step per rollout batch (epochs x
    mini-batches) turns on the old-logprob pass, and with it the ratio and clipping."""
    ppo_mini_batch_size: int | None = None
    """Prompts (whole groups) per optimizer step over all ranks, as verl's ppo_mini_batch_size; None:
    rollout.prompts_per_step (one mini-batch). Must divide prompts_per_step; the mini-batches are a
    seeded shuffle of the step's prompts (the same for any world size), the same ones in every epoch."""
    votes: int = 1
    """BRPO: judge calls per order; a rollout wins only by winning all 2 x votes comparisons.
    With judge.kind = "genrm" this and `judge.genrm.votes` are one setting: 1 counts as unset, so
    setting either one sets both (validate() copies it over); two different values > 1 are an error."""
    recompute_old_logprobs: bool = False
    """Run the separate old-logprob pass even on-policy. With one optimizer step per rollout batch
    the trainer skips that pass by default (old = the current log-probs: ratio 1, no clipping, one
    vocabulary pass fewer). The pass always runs with vLLM IS correction or several updates."""
    inconsistent: Literal["lose", "tie"] = "lose"
    """BRPO: a rollout that wins some but not all comparisons scores -1 ("lose") or 0 ("tie")."""
    skew_threshold: float = 0.6
    """BRPO: groups with |sum r| / G above this are dropped (their reference was an outlier)."""
    keep_reference: bool = False
    """BRPO: keep the reference rollout in the loss with A = 0 (it then dilutes token-mean)."""
    clip_low: float = 0.2
    """Lower clip range: the probability ratio is clipped to [1 - clip_low, 1 + clip_high] (PPO)."""
    clip_high: float = 0.2
    """Upper clip range; DAPO's clip-higher uses e.g. 0.28."""
    dual_clip: float | None = None
    """Dual-clip constant c (> 1) bounding the loss of negative-advantage tokens; None disables."""
    delta: float | None = None
    """Two-sided clipping (INTELLECT-2; TRL's `delta`): the unclipped ratio is capped at delta, i.e.
    max(-A min(ratio, delta), -A clip(ratio)); above 1 + clip_high this equals dual_clip = delta for
    A < 0. None disables. Not with "cispo"."""
    top_entropy_quantile: float = 1.0
    """Keep the policy-gradient term of only this top quantile of tokens by entropy (Beyond the 80/20
    Rule; TRL's `top_entropy_quantile`, 0.2 in the paper); the KL term and the aggregation still count
    every token. The quantile is taken over each micro-batch's tokens on its rank (TRL: over the
    micro-batch of all processes). 1.0 keeps all; < 1 costs a second vocabulary sweep. Built-in losses
    only."""
    off_policy_mask_threshold: float | None = None
    """Off-policy sequence mask (DeepSeek-V3.2; TRL's option of that name): drop the policy term of sequences
    with A < 0 whose mean per-token KL(old || current) = mean(old_logp - logp) exceeds this (e.g. 0.5).
    Acts only with an old-logprob pass (several updates per batch); costs a second vocabulary sweep. None: off."""
    kl_coef: float = 0.0
    """KL penalty against the frozen initial policy; > 0 builds the reference model."""
    kl_importance_weighted: bool = False
    """Multiply the KL term by the (differentiable) importance ratio (DeepSeek-V3.2's unbiased KL gradient;
    TRL's use_bias_correction_kl, which TRL turns on by default); not with "vespo"."""
    kl_estimator: Literal["k1", "k2", "k3", "k3+"] = "k3"
    """Per-token estimator of the KL penalty (used when kl_coef > 0)."""
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"] = (
        "token-mean"
    )
    """Loss aggregation; token counts are global over the step so accumulation is exact. "luspo" always
    aggregates with "seq-mean-token-sum" (it accepts only that or the default here)."""
    loss_scale: float | None = None
    """Constant divisor of "seq-mean-token-sum-norm" (Dr. GRPO); None uses rollout.max_new_tokens."""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards all agree and sample more prompts until the batch is full."""
    max_sampling_rounds: int = 3
    """DAPO: cap on rollout rounds per step with dynamic sampling (then train on what was kept)."""
    overlong_buffer: int = 0
    """DAPO overlong shaping: linear penalty over the last `overlong_buffer` tokens before
    max_new_tokens; 0 disables."""
    overlong_penalty: float = 1.0
    """DAPO: penalty at max_new_tokens (reached linearly across the buffer)."""

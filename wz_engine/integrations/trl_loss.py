"""TRL 1.16's GRPO objective (`GRPOTrainer._compute_loss`) in wz kernel terms, on the scored tokens only.

    loss_type  per-token objective   TRL normalisation                      wz aggregation (/ GA: divisor)
    grpo       ppo                   mean_b(sum_t L m / max(n_b, 1)) / GA   seq-mean-token-mean, global_seqs=B
    bnpo       ppo                   sum(L m) / max(sum m, 1) / GA          token-mean (local tokens)
    dr_grpo    ppo                   sum(L m) / (B * max_len) / GA          seq-mean-token-sum-norm,
                                                                            global_seqs=B, loss_scale=max_len
    dapo       ppo                   sum(L m) / D                           token-mean, global_tokens=D
    cispo      cispo                 sum(L m) / D                           token-mean, global_tokens=D
    luspo      ppo                   mean_b(sum_t L m) / GA                 seq-mean-token-sum, global_seqs=B
    sapo       sapo                  as grpo                                as grpo
    vespo      vespo                 sum(L m) / D                           token-mean, global_tokens=D

    max_len = max_completion_length; D = num_items_in_batch / processes * GA / steps_per_generation (TRL's
    global normaliser; no GA division);
    cispo's cap is epsilon_high itself, with no lower bound: clip_high = epsilon_high - 1, clip_low = 1
    (wz clips cispo's weight to [1 - clip_low, 1 + clip_high]).

`epsilon` / `epsilon_high` -> clip_low / clip_high; `delta` -> delta (two-sided clipping; TRL applies it to
the clipped losses only, not to cispo); `importance_sampling_level` "token" / "sequence" -> the same level
(GSPO; TRL's seq-level ratio is the mean log-ratio over the row's mask, as ours); vespo's weight is its own
summed sequence ratio whatever the level (TRL's level then only shapes the KL's importance weight), so the
kernel runs it at "token". `sapo_temperature_pos/neg` -> sapo_temperatures, `vespo_k_pos, vespo_lambda_pos,
vespo_k_neg, vespo_lambda_neg` -> vespo_gamma. `beta` -> TRL's KL, k3 =
exp(ref - logp) - (ref - logp) - 1 unclamped (the kernel's k3 is clamped at 10, as verl's), times the
differentiable importance weight exp(log_w) with `use_bias_correction_kl` (a per-sequence weight at
sequence level, as TRL broadcasts it), added after the masks, aggregated like the policy term.
`top_entropy_quantile` / `off_policy_mask_threshold` -> a `policy_mask` on the policy term (TRL's own
`get_high_entropy_mask` / `get_off_policy_mask` build it, in the trainer).

Routes: token level, beta = 0, no mask: one `fused_linear_policy_loss` pass (gradients formed in the
forward, no recompute; on-policy old = each chunk's own detached log-probs). Otherwise the log-probs
(+ entropy) come from `fused_linear_logprobs` (differentiable, chunked) and the objective from
`policy_loss` on [N] vectors, plus TRL's KL in torch on [N] vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Imported from the defining modules: `wz_kernels.policy_loss` is both a module and a lazily exported
# function, and once the module is imported the package attribute is the module.
from wz_kernels import logprob as _logprob
from wz_kernels.policy_loss import (
    SAPO_TEMPERATURES,
    VESPO_GAMMA,
    aggregation_weights,
    log_importance_weights,
    policy_loss,
)

KERNEL_LOSS_TYPES = {"grpo": "ppo", "bnpo": "ppo", "dr_grpo": "ppo", "dapo": "ppo", "luspo": "ppo",
                     "cispo": "cispo", "sapo": "sapo", "vespo": "vespo"}
SUPPORTED_LOSS_TYPES = tuple(KERNEL_LOSS_TYPES)
SUPPORTED_IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
PolicyMaskFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None]
"""(logprobs [N] detached, entropy [N] | None) -> the policy-term mask [N] (or None)."""


@dataclass(frozen=True)
class TRLLossNormalisation:
    """How one TRL loss_type aggregates the per-token loss, in `wz_kernels.policy_loss` terms."""

    agg: str
    """wz aggregation mode."""
    global_tokens: float | torch.Tensor | None = None
    """token-mean denominator (None: the tokens of this micro-batch)."""
    global_seqs: float | None = None
    """Sequence count of the seq-* modes (None: sequences with at least one token)."""
    loss_scale: float | None = None
    """Dr. GRPO's constant."""
    divisor: float = 1.0
    """Applied after aggregation: TRL's gradient-accumulation division."""

    def agg_kwargs(self) -> dict:
        return {"agg": self.agg, "global_tokens": self.global_tokens, "global_seqs": self.global_seqs,
                "loss_scale": self.loss_scale}


def trl_loss_normalisation(loss_type: str, *, num_sequences: int, max_completion_length: int,
                           num_items_in_batch: torch.Tensor | float | None, num_processes: int,
                           grad_accum_steps: int, steps_per_generation: int,
                           training: bool) -> TRLLossNormalisation:
    """TRL 1.16's normalisation for `loss_type` (see the module docstring's table)."""
    accum = float(grad_accum_steps) if training else 1.0
    if loss_type in ("grpo", "sapo"):
        return TRLLossNormalisation("seq-mean-token-mean", global_seqs=float(num_sequences), divisor=accum)
    if loss_type == "bnpo":
        return TRLLossNormalisation("token-mean", divisor=accum)
    if loss_type == "dr_grpo":
        return TRLLossNormalisation("seq-mean-token-sum-norm", global_seqs=float(num_sequences),
                                    loss_scale=float(max_completion_length), divisor=accum)
    if loss_type == "luspo":
        return TRLLossNormalisation("seq-mean-token-sum", global_seqs=float(num_sequences), divisor=accum)
    if loss_type in ("dapo", "cispo", "vespo"):
        if num_items_in_batch is None:
            raise ValueError(f"loss_type={loss_type!r} needs inputs['num_items_in_batch']")
        normaliser = torch.as_tensor(num_items_in_batch, dtype=torch.float32).clamp(min=1.0) / num_processes
        if training:
            normaliser = normaliser * grad_accum_steps / steps_per_generation
        return TRLLossNormalisation("token-mean", global_tokens=normaliser)
    raise ValueError(f"loss_type must be one of {SUPPORTED_LOSS_TYPES}, got {loss_type!r}")


@dataclass(frozen=True)
class TRLObjective:
    """TRL's per-token objective for one configuration, as `wz_kernels.policy_loss` options."""

    loss_type: str = "ppo"
    """Kernel loss type ("ppo" | "cispo" | "sapo" | "vespo")."""
    importance_sampling_level: str = "token"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    """TRL's values: the clip range [1 - epsilon_low, 1 + epsilon_high]; cispo's cap is epsilon_high."""
    delta: float | None = None
    kl_coef: float = 0.0
    kl_importance_weighted: bool = False
    """TRL's `use_bias_correction_kl`: the KL term times the differentiable importance weight."""
    sapo_temperatures: tuple[float, float] = SAPO_TEMPERATURES
    """TRL's (sapo_temperature_pos, sapo_temperature_neg)."""
    vespo_gamma: tuple[float, float, float, float] = VESPO_GAMMA
    """TRL's (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)."""

    @classmethod
    def from_trl(cls, loss_type: str, args, beta: float) -> TRLObjective:
        """From a GRPOConfig (`args`) and the trainer's beta; loss_type must be supported."""
        kernel = KERNEL_LOSS_TYPES[loss_type]
        epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        return cls(kernel, args.importance_sampling_level, args.epsilon, epsilon_high,
                   args.delta if kernel == "ppo" else None, beta,
                   bool(getattr(args, "use_bias_correction_kl", False)),
                   (args.sapo_temperature_pos, args.sapo_temperature_neg),
                   (args.vespo_k_pos, args.vespo_lambda_pos, args.vespo_k_neg, args.vespo_lambda_neg))

    def kernel_options(self) -> dict:
        if self.loss_type == "cispo":  # TRL: sg(min(ratio, epsilon_high)), no lower bound
            clip_low, clip_high = 1.0, self.epsilon_high - 1.0
        else:
            clip_low, clip_high = self.epsilon_low, self.epsilon_high
        level = "token" if self.loss_type == "vespo" else self.importance_sampling_level
        soft = {"sapo": {"sapo_temperatures": self.sapo_temperatures},
                "vespo": {"vespo_gamma": self.vespo_gamma}}.get(self.loss_type, {})
        return {"clip_low": clip_low, "clip_high": clip_high, "delta": self.delta,
                "loss_type": self.loss_type, "importance_sampling_level": level, **soft}


def fused_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    old_logprobs: torch.Tensor | None, advantages: torch.Tensor, seq_ids: torch.Tensor, *,
                    norm: TRLLossNormalisation, objective: TRLObjective | None = None,
                    bias: torch.Tensor | None = None, ref_logprobs: torch.Tensor | None = None,
                    temperature: float = 1.0, policy_mask_fn: PolicyMaskFn | None = None):
    """TRL's GRPO-family loss from hidden states, never forming [N, V] logits -> (loss 0-d, metrics dict,
    (logprobs [N], entropy [N]) detached, for TRL's metrics).

    hidden [N, H] (the scored tokens only), weight [V, H], targets [N], old_logprobs [N] or None (on-policy:
    TRL's `per_token_logps.detach()`), advantages [N], seq_ids [N] (the row of each token), ref_logprobs [N]
    when objective.kl_coef != 0. `policy_mask_fn(logprobs [N] detached, entropy [N] | None) -> [N] | None`
    builds the policy-term mask (TRL's entropy / off-policy masks) once the log-probs exist. The loss is
    before `norm.divisor`. The entropy comes from the same vocabulary tiles as the log-probs.

    metrics: the kernel's (`wz_kernels.policy_loss`, token means), plus `kl_mean` (TRL's KL term, with its
    importance weight, mean over tokens) when kl_coef != 0.
    """
    objective = objective or TRLObjective()
    ones = torch.ones_like(targets, dtype=torch.float32)
    options = dict(seq_ids=seq_ids, **objective.kernel_options(), **norm.agg_kwargs())
    one_pass = (objective.kl_coef == 0.0 and objective.importance_sampling_level == "token"
                and policy_mask_fn is None)
    if one_pass:  # one vocabulary pass; old_logprobs None = on-policy inside the kernel
        loss, metrics, entropy, logprobs = _logprob.fused_linear_policy_loss(
            hidden, weight, targets, old_logprobs, advantages, ones, bias=bias, temperature=temperature,
            return_entropy=True, return_logprobs=True, **options)
        return loss, metrics, (logprobs, entropy)
    logprobs, entropy = _logprob.fused_linear_logprobs(hidden, weight, targets, bias=bias,
                                                       temperature=temperature, return_entropy=True)
    entropy = entropy.detach()
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    policy_mask = None if policy_mask_fn is None else policy_mask_fn(logprobs.detach(), entropy)
    loss, metrics = policy_loss(logprobs, old, advantages, ones, policy_mask=policy_mask, **options)
    per_token = (logprobs.detach().float(), entropy)
    if objective.kl_coef == 0.0:
        return loss, metrics, per_token
    if ref_logprobs is None:
        raise ValueError("ref_logprobs is required when kl_coef != 0")
    log_ref_ratio = ref_logprobs - logprobs
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # [N]
    if objective.kl_importance_weighted:  # TRL's coef_1 (before delta), unclamped, differentiable
        log_w = log_importance_weights(logprobs, old, ones, seq_ids, objective.importance_sampling_level)
        kl = kl * torch.exp(log_w)
    weights = aggregation_weights(ones, seq_ids, **norm.agg_kwargs())
    loss = loss + objective.kl_coef * (weights * kl).sum()
    kl_mean = kl.detach().mean() if kl.numel() else kl.new_zeros(())
    return loss, dict(metrics, kl_mean=kl_mean), per_token

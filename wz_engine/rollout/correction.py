"""Truncated importance sampling (TIS) for the rollout/trainer mismatch.

The engine that sampled (vLLM: other kernels, bf16 KV cache, maybe another precision) assigns
slightly different log-probabilities than the trainer's forward pass, so the "on-policy" samples are
in fact drawn from a nearby policy pi_engine. The PPO ratio is computed against the trainer's
`old_logp` (pi_old); the correction reweights each token by pi_old / pi_engine, truncated at `cap`:

    w_t = min(exp(old_logp_t - engine_logp_t), cap)        (detached: a constant per token)

and multiplies the per-token advantage: A_t <- w_t * A_t. For w_t >= 0 the clipped surrogate
L(A, r) = max(-A r, -A clip(r)) (and its dual clip min(L, -A c)) is positively homogeneous in A,
so this equals weighting each token's policy-gradient loss by w_t (tests/engine/test_vllm_correction.py
checks it against the float64 reference of wz_kernels.policy_loss). The KL penalty is NOT reweighted,
which is what TIS prescribes (Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training"; verl's `tis_imp_ratio_cap`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOG_RATIO_CLAMP = 20.0  # same clamp as the policy loss: exp(20) ~ 4.9e8, finite in float32


@dataclass
class TISMetrics:
    mean_abs_logp_diff: float
    """Mean over valid tokens of |old_logp - engine_logp| (the mismatch to watch)."""
    max_ratio: float
    """Largest untruncated ratio exp(old_logp - engine_logp) over valid tokens."""
    frac_capped: float
    """Fraction of valid tokens whose ratio exceeded the cap."""
    tokens: int

    def as_log(self, prefix: str = "rollout/tis_") -> dict[str, float]:
        return {f"{prefix}mean_abs_logp_diff": self.mean_abs_logp_diff, f"{prefix}max_ratio": self.max_ratio,
                f"{prefix}frac_capped": self.frac_capped}


def tis_weights(
    trainer_logp: torch.Tensor,  # [N] old log-probs from the trainer's forward (no grad needed)
    engine_logp: torch.Tensor,  # [N] the sampler's log-probs of the same tokens
    mask: torch.Tensor,  # [N] bool/int/float, nonzero = a sampled (trained) token
    cap: float,
) -> tuple[torch.Tensor, TISMetrics]:  # weights [N] float32 or wider (0 on masked tokens), metrics
    """Truncated IS weights w = min(exp(trainer_logp - engine_logp), cap), detached.

    Masked tokens get weight 0 and are ignored by the metrics, even when their inputs are NaN/Inf
    (prompt or padding positions carry no engine log-prob). Multiply the advantages by the result.
    """
    if not isinstance(trainer_logp, torch.Tensor) or trainer_logp.dim() != 1:
        raise ValueError("trainer_logp: must be a 1-D tensor [N]")
    for name, t in (("engine_logp", engine_logp), ("mask", mask)):
        if not isinstance(t, torch.Tensor) or t.shape != trainer_logp.shape:
            raise ValueError(f"{name}: must be a tensor of shape {tuple(trainer_logp.shape)}")
        if t.device != trainer_logp.device:
            raise ValueError(f"{name}: on {t.device}, trainer_logp is on {trainer_logp.device}")
    if not cap >= 1.0:
        raise ValueError(f"cap={cap}: must be >= 1")
    valid = mask != 0
    dtype = torch.promote_types(torch.promote_types(trainer_logp.dtype, engine_logp.dtype), torch.float32)
    diff = torch.where(valid, trainer_logp.detach().to(dtype) - engine_logp.detach().to(dtype), 0.0)
    if not bool(torch.isfinite(diff).all()):
        raise ValueError("engine_logp/trainer_logp: non-finite values on unmasked tokens")
    ratio = torch.exp(diff.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    weights = torch.where(valid, ratio.clamp(max=cap), 0.0)
    n = int(valid.sum())
    if n == 0:
        return weights, TISMetrics(0.0, 0.0, 0.0, 0)
    metrics = TISMetrics(
        mean_abs_logp_diff=float(diff.abs().sum() / n),
        max_ratio=float(ratio[valid].max()),
        frac_capped=float((ratio[valid] > cap).sum() / n),
        tokens=n,
    )
    return weights, metrics


def apply_tis(advantages: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A_t * w_t ([N] each); advantages broadcast per token beforehand (sequence A -> its tokens)."""
    if advantages.shape != weights.shape:
        raise ValueError(f"advantages: shape {tuple(advantages.shape)} != weights {tuple(weights.shape)}")
    return advantages * weights.to(advantages.dtype)

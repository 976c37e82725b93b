"""BRPO (Writing-Zero): A = the pairwise reward against the group's reference, with the skew filter."""

from __future__ import annotations

from wz_engine.algorithms.estimator import Advantages, register_estimator


@register_estimator("brpo", pairwise=True)
def brpo(inputs, cfg) -> Advantages:
    """+1 / -1 / 0 verdicts taken as they are (no normalisation); groups with |sum r| / G above
    `algorithm.skew_threshold` are dropped (A = 0, kept False): their reference was an outlier."""
    from wz_kernels.advantage import brpo_advantages

    values, kept = brpo_advantages(inputs.rewards, inputs.group_ids, skew_threshold=cfg.skew_threshold,
                                   validate=False)  # checked on the host by Estimator.check_rewards
    return Advantages(values, kept)

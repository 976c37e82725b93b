"""VESPO (Variational Sequence-Level Soft Policy Optimization; TRL's loss_type="vespo"): no clip; every token
of sequence b gets L = -sg(phi_b) * A * logp with the gamma weight phi(w) = exp(lambda + k log w - lambda w)
of the sequence's importance ratio w = exp(sum of its tokens' log-ratios) (a SUM, clamped to [1e-8, e^20]),
normalised so phi(1) = 1: sequences far from the sampling policy either way fade out smoothly.
(k, lambda) = algorithm.vespo.(k_pos, lambda_pos) for A >= 0, (k_neg, lambda_neg) for A < 0. TRL aggregates
it like dapo / cispo (agg = "token-mean"). No clip bounds; kl_importance_weighted does not apply (phi is not
a token's ratio). With vLLM, TRL folds the sampler's ratio into w; here vLLM's IS correction would scale the
advantages instead, so that combination is refused."""

from dataclasses import asdict

from wz_engine.algorithm_config import check_soft_loss_config
from wz_engine.algorithms.loss import register_policy_loss
from wz_engine.algorithms.losses.ppo_clip import FusedClipLoss


def _validate(cfg) -> None:
    from wz_engine.config import ConfigError

    a = cfg.algorithm
    for key in ("dual_clip", "delta"):
        if getattr(a, key) is not None:
            raise ConfigError(f"algorithm.{key}: bounds the clipped PPO objective; policy_loss 'vespo' has none")
    if a.kl_importance_weighted:
        raise ConfigError("algorithm.kl_importance_weighted: not defined for policy_loss 'vespo' (its weight "
                          "is not a token's importance ratio)")
    if cfg.rollout.sampler == "vllm" and cfg.rollout.vllm.is_correction:
        raise ConfigError("rollout.vllm.is_correction: policy_loss 'vespo' would need the sampler's ratio "
                          "inside its sequence weight (TRL's way), not on the advantages; set it to false")
    check_soft_loss_config("algorithm.vespo", asdict(a.vespo), positive=("lambda_pos", "lambda_neg"))


class VESPOLoss(FusedClipLoss):
    def options(self, a, max_new_tokens: int) -> dict:
        return {**super().options(a, max_new_tokens), "vespo_gamma": a.vespo.as_kernel()}


VESPO = register_policy_loss("vespo")(VESPOLoss(
    "vespo", metrics=("ratio_mean", "kl_mean"), validate=_validate, kernel_options=(("loss_type", "vespo"),)))

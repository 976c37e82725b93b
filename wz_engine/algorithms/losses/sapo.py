"""SAPO (Soft Adaptive Policy Optimization; TRL's loss_type="sapo"): the hard clip replaced by a smooth gate,
L = -sigmoid(tau * (ratio - 1)) * 4 / tau * A per token, tau = algorithm.sapo.temperature_pos for A > 0 and
temperature_neg otherwise. The gradient, 4 A s (1 - s) ratio with s the gate, fades smoothly as the ratio
leaves 1 instead of dropping to 0 at a clip bound. Token ratios (the kernel also takes sequence ratios:
wz_kernels.policy_loss); TRL aggregates it like "grpo" (agg = "seq-mean-token-mean"). No clip bounds:
clip_low / clip_high / dual_clip / delta do not apply, and nothing is clipped in the metrics."""

from dataclasses import asdict

from wz_engine.algorithm_config import check_soft_loss_config
from wz_engine.algorithms.loss import register_policy_loss
from wz_engine.algorithms.losses.ppo_clip import FusedClipLoss


def _validate(cfg) -> None:
    from wz_engine.config import ConfigError

    a = cfg.algorithm
    for key in ("dual_clip", "delta"):
        if getattr(a, key) is not None:
            raise ConfigError(f"algorithm.{key}: bounds the clipped PPO objective; policy_loss 'sapo' has none")
    check_soft_loss_config("algorithm.sapo", asdict(a.sapo), positive=("temperature_pos", "temperature_neg"))


class SAPOLoss(FusedClipLoss):
    def options(self, a, max_new_tokens: int) -> dict:
        return {**super().options(a, max_new_tokens), "sapo_temperatures": a.sapo.as_kernel()}


SAPO = register_policy_loss("sapo")(SAPOLoss(
    "sapo", metrics=("ratio_mean", "kl_mean"), validate=_validate, kernel_options=(("loss_type", "sapo"),)))

"""CISPO (MiniMax-M1; TRL's and verl's loss_type "cispo"): L = -sg(clip(ratio, 1 - clip_low, 1 + clip_high))
* A * logp per token. The importance weight is clipped and detached, so no token's gradient is ever
clipped away (PPO drops the gradient of clipped tokens). TRL caps at its epsilon_high (= 1 + clip_high;
ScaleRL: 5, i.e. clip_high = 4) with no lower bound (clip_low = 1, as MiniMax-M1 runs it); verl clips
both sides. The KL term and the aggregation are the config's. `clip_frac_high` reports the capped tokens
with A > 0 (TRL's cispo_clip_ratio)."""

from wz_engine.algorithms.loss import register_policy_loss
from wz_engine.algorithms.losses.ppo_clip import FusedClipLoss


def _validate(cfg) -> None:
    from wz_engine.config import ConfigError

    for key in ("dual_clip", "delta"):
        if getattr(cfg.algorithm, key) is not None:
            raise ConfigError(f"algorithm.{key}: bounds the clipped PPO objective; "
                              "policy_loss 'cispo' has none")


CISPO = register_policy_loss("cispo")(FusedClipLoss(
    "cispo", metrics=("clip_frac_high", "ratio_mean", "kl_mean"), validate=_validate,
    kernel_options=(("loss_type", "cispo"),)))

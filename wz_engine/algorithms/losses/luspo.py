"""LUSPO (Length-Unbiased Sequence Policy Optimization; TRL's loss_type="luspo"): GSPO's clipped
sequence-level ratio with each sequence's loss scaled by its length, i.e. summed over its tokens and
averaged over sequences (agg "seq-mean-token-sum", whatever algorithm.agg says when that is left at
its default; any other explicit agg is an error)."""

from wz_engine.algorithms.loss import register_policy_loss
from wz_engine.algorithms.losses.ppo_clip import CLIP_METRICS, FusedClipLoss

AGG = "seq-mean-token-sum"


def _validate(cfg) -> None:
    from wz_engine.config import ConfigError

    if cfg.algorithm.agg not in ("token-mean", AGG):  # token-mean: the config's default
        raise ConfigError(f"algorithm.agg: policy_loss 'luspo' aggregates with {AGG!r} (each sequence's loss "
                          f"scaled by its length), got {cfg.algorithm.agg!r}")


LUSPO = register_policy_loss("luspo")(FusedClipLoss(
    "luspo", metrics=CLIP_METRICS, validate=_validate,
    kernel_options=(("importance_sampling_level", "sequence"), ("agg", AGG))))

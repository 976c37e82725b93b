"""Pointwise reward sources: a rule function by import path, or a scalar reward model."""

from __future__ import annotations

from wz_engine.algorithms.reward_source import register_reward_source


def _check_callable_path(cfg) -> None:
    from wz_engine.config import ConfigError

    if ":" not in cfg.judge.callable:
        raise ConfigError(f"judge.callable: expected an import path 'pkg.module:function', got {cfg.judge.callable!r}")


@register_reward_source("rule", pairwise=False, validate=_check_callable_path)
def rule(ctx):
    """`judge.callable`: (prompt, response, reference) -> float."""
    from wz_engine.rewards.rules import RuleReward

    return RuleReward(ctx.cfg.judge.callable)


def _check_scalar_rm(cfg) -> None:
    from wz_engine.config import ConfigError

    if not cfg.judge.scalar_rm_path:
        raise ConfigError("judge.scalar_rm_path: is required when judge.kind = 'scalar_rm'")


@register_reward_source("scalar_rm", pairwise=False, validate=_check_scalar_rm)
def scalar_rm(ctx):
    """A sequence classifier's first logit (`judge.scalar_rm_path`)."""
    from wz_engine.rewards.scalar_rm import ScalarRewardModel

    j = ctx.cfg.judge
    return ScalarRewardModel(j.scalar_rm_path, device=ctx.device, batch_size=j.scalar_rm_batch_size)

"""Reward sources (`judge.kind`): build a judge or scorer from the config, and turn one step's groups
of completions into per-rollout rewards.

A pairwise source builds a `PairwiseJudge` and its rewards are BRPO's verdicts against a seeded
reference per group (`wz_engine.rewards.brpo.assemble_brpo_rewards`); a pointwise source builds an
object with `score(prompts, responses, references) -> list[float]`. A source with another protocol
passes its own `assemble`; one that brings its own prompts (e.g. judge prompts rendered from preference
pairs) passes `prompt_rows`, which replaces the rows of `data.*`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from wz_engine.algorithms.registry import Registry

if TYPE_CHECKING:
    from wz_engine.config import RunConfig


@dataclass
class RewardContext:
    """What a reward source may build from."""

    cfg: RunConfig
    lm: Any
    """The policy's HF causal LM (CPU, before sharding), or None (e.g. the demo's evaluation)."""
    tokenizer: Any
    device: Any
    gather: Callable | None
    """Context-manager factory that gathers the FSDP2-sharded policy for generation."""
    sampler: Any = None
    """The rollout sampler (a vLLM engine can also serve the judge)."""


@dataclass
class GroupRewards:
    rewards: torch.Tensor
    """[B] float32, rows prompt-major."""
    is_reference: torch.Tensor
    """[B] bool: the rollout that was its group's reference (pairwise sources)."""
    stats: dict
    """Judge monitors, averaged over ranks and logged (e.g. judge/position_bias)."""


def pairwise_rewards(judge, prompts, groups, step: int, cfg: RunConfig) -> GroupRewards:
    from wz_engine.rewards.brpo import assemble_brpo_rewards

    out = assemble_brpo_rewards(judge, [p.text for p in prompts], [[c.text for c in g] for g in groups],
                                [p.uid for p in prompts], step=step, seed=cfg.train.seed,
                                votes=cfg.algorithm.votes, inconsistent=cfg.algorithm.inconsistent,
                                references=[p.reference for p in prompts])
    return GroupRewards(out.rewards, out.is_reference, out.stats)


def pointwise_rewards(scorer, prompts, groups, step: int, cfg: RunConfig) -> GroupRewards:
    flat_prompts = [p.text for p, g in zip(prompts, groups) for _ in g]
    flat_refs = [p.reference for p, g in zip(prompts, groups) for _ in g]
    scores = scorer.score(flat_prompts, [c.text for g in groups for c in g], flat_refs)
    r = torch.tensor(scores, dtype=torch.float32)
    return GroupRewards(r, torch.zeros_like(r, dtype=torch.bool), {})


@dataclass(frozen=True)
class RewardSource:
    """A registered reward source: `build(ctx)` -> judge / scorer, and its rewards for a step."""

    name: str
    build: Callable[[RewardContext], Any]
    pairwise: bool
    """Pairwise verdicts against a reference (pairs with a pairwise estimator such as brpo)."""
    validate: Callable[[RunConfig], None] | None = None
    """Extra config checks and derived settings (raise ConfigError naming the key)."""
    assemble: Callable[..., GroupRewards] | None = None
    """(built, prompts [P], groups [P][G], step, cfg) -> GroupRewards; None: by `pairwise`."""
    prompt_rows: Callable[[RunConfig], list[dict]] | None = None
    """cfg -> the run's prompt rows (as `wz_engine.data.load_rows` returns), instead of data.path's."""

    def group_rewards(self, built, prompts, groups, step: int, cfg: RunConfig) -> GroupRewards:
        assemble = self.assemble or (pairwise_rewards if self.pairwise else pointwise_rewards)
        return assemble(built, prompts, groups, step, cfg)


REWARD_SOURCES: Registry[RewardSource] = Registry(
    "reward source", "wz_engine.algorithms.reward_sources", RewardSource,
    hint=" (decorate the builder with wz_engine.algorithms.register_reward_source; for a plain reward "
         "function use judge.kind = 'rule' and judge.callable)")


def register_reward_source(name: str, *, pairwise: bool, validate=None, assemble=None, prompt_rows=None):
    """Decorator: `@register_reward_source("my_rm", pairwise=False)` over `build(ctx) -> scorer`."""

    def wrap(build) -> RewardSource:
        return REWARD_SOURCES.register(name, RewardSource(name, build, pairwise, validate, assemble, prompt_rows))

    return wrap


def load_prompt_rows(cfg: RunConfig) -> list[dict]:
    """The run's prompt rows: the reward source's own (`prompt_rows`), else data.path's."""
    from wz_engine.data import load_rows

    source = REWARD_SOURCES.get(cfg.judge.kind)
    return source.prompt_rows(cfg) if source.prompt_rows is not None else load_rows(cfg.data)

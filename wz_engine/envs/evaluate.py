"""Held-out evaluation of an agent: success rate on task seeds never used in training."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from wz_engine.envs.base import eval_task_seeds
from wz_engine.envs.pool import EnvPool
from wz_engine.rollout.base import SamplingParams
from wz_engine.rollout.multiturn import RolloutStats, run_episodes


@dataclass
class AgentEval:
    success_rate: float
    episodes: int
    episode_length: float
    invalid_action_rate: float
    return_mean: float


def evaluate_agent(sampler, tokenizer, env_cfg, params: SamplingParams, *, episodes_per_seed: int = 4,
                   seed: int = 1234, episode_return: str | None = None) -> AgentEval:
    """Run `episodes_per_seed` episodes on each of the `env.eval_seeds` held-out (odd) task seeds with a fresh
    env pool (instance seeds from `seed`), sampling with `params`, one call per turn seeded from `seed` and
    the turn: the same episodes for the same policy, whatever ran before."""
    seeds = eval_task_seeds(env_cfg.eval_seeds)
    if not seeds:
        raise ValueError("env.eval_seeds: 0 held-out seeds; evaluation needs at least one")
    pool = EnvPool.from_config(env_cfg, len(seeds) * episodes_per_seed, run_seed=seed)
    stats = RolloutStats()
    episodes = run_episodes(sampler, tokenizer, pool, env_cfg, list(enumerate(seeds)), episodes_per_seed,
                            dataclasses.replace(params, seed=None), stats=stats,
                            turn_seed=lambda turn: seed * 1_000_003 + turn)
    pool.close()
    turns = [t for e in episodes for t in e.turns]
    kind = episode_return or env_cfg.episode_return
    returns = [float(e.success) if kind == "success" else sum(t.reward for t in e.turns) for e in episodes]
    n = len(episodes)
    return AgentEval(sum(e.success for e in episodes) / n, n, len(turns) / n,
                     sum(t.invalid for t in turns) / max(len(turns), 1), sum(returns) / n)

"""The environment protocol, the registry of environments, task seeds and config checks.

An environment is text in, text out, one episode at a time per instance:

    reset(seed) -> (observation, info)                  seed: the task; same seed, same task
    step(action) -> (observation, reward, done, info)   action: the parsed action text, or None when the
                                                        response held no tagged action span

`info` is a dict. Keys the engine reads (all optional):
    reset:  "instruction"  the task statement, shown at the top of every turn's prompt
    step:   "invalid"      True: the action was not valid here (the env's observation says so);
                           env.invalid_penalty is subtracted from the reward
            "success"      True on the step that solved the task (episode_return = "success", metrics)

Optional methods: `state_dict()` / `load_state_dict(state)` for state carried across episodes (an RNG of
the env's own): saved in the trainer's checkpoints, so a resumed run continues bit for bit; `corpus()`
-> list of texts to train a tiny model's tokenizer on (default: observations of a few resets).

The factory (`env.name`) is a class or function called once per instance as `factory(**env.kwargs)`;
when it takes a `seed` keyword, each instance also gets its own seed for that own randomness
(from train.seed and the instance's global episode slot, so independent of the world size).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from wz_engine.algorithms.registry import Registry

if TYPE_CHECKING:
    from wz_engine.config import RunConfig
    from wz_engine.envs.config import EnvConfig


@runtime_checkable
class TextEnv(Protocol):
    def reset(self, seed: int) -> tuple[str, dict]:
        """Start the task `seed`: (first observation, info)."""
        ...

    def step(self, action: str | None) -> tuple[str, float, bool, dict]:
        """Apply the action (None: no action could be parsed): (observation, reward, done, info)."""
        ...


@dataclass(frozen=True)
class EnvSpec:
    """A registered environment: `factory(**kwargs)` builds one instance."""

    name: str
    factory: Callable[..., TextEnv]

    def takes_seed(self) -> bool:
        try:
            params = inspect.signature(self.factory).parameters
        except (TypeError, ValueError):
            return False
        return "seed" in params

    def make(self, kwargs: dict[str, Any], seed: int) -> TextEnv:
        env = self.factory(**kwargs, **({"seed": seed} if self.takes_seed() else {}))
        missing = [m for m in ("reset", "step") if not callable(getattr(env, m, None))]
        if missing:
            raise TypeError(f"environment {self.name!r}: the factory returned {type(env).__name__}, which has no "
                            f"{' or '.join(missing)} method (see wz_engine/envs/base.py for the protocol)")
        return env


ENVS: Registry[EnvSpec] = Registry("environment", "wz_engine.envs.builtin", EnvSpec,
                                   from_function=lambda path, fn: EnvSpec(path, fn),
                                   hint=" (expected a class or function that builds an environment)")


def register_env(name: str) -> Callable:
    """Decorator over an environment class or factory: `@register_env("my_env")`."""

    def wrap(factory):
        ENVS.register(name, EnvSpec(name, factory))
        return factory

    return wrap


# ----------------------------------------------------------------------------- task seeds


def train_task_seed(run_seed: int, step: int, slot: int) -> int:
    """Task seed of global task slot `slot` (0 .. prompts_per_step - 1) at rollout step `step`: even, and a
    function of (run seed, step, slot) only, so it is the same for any world size and after a resume."""
    return 2 * int(np.random.default_rng([int(run_seed), int(step), int(slot), 0x656E76]).integers(0, 2**40))


def turn_call_seed(run_seed: int, step: int, group: int, turn: int) -> int:
    """Sampling seed of task `group`'s call at `turn` of rollout step `step` (rollout.seed_per_prompt)."""
    return int(np.random.default_rng([int(run_seed), int(step), int(group), int(turn), 0x747572]).integers(0, 2**62))


def eval_task_seeds(count: int) -> list[int]:
    """Held-out task seeds: odd, so never a training task's."""
    return [2 * i + 1 for i in range(count)]


def instance_seed(run_seed: int, slot: int) -> int:
    """Seed of the env instance of global episode slot `slot` (task slot x group_size + trajectory) for its own
    randomness (when its factory takes `seed`): the same for any world size."""
    return int(np.random.default_rng([int(run_seed), int(slot), 0x696E73]).integers(0, 2**31))


# ----------------------------------------------------------------------------- config


def validate_env_config(cfg: RunConfig) -> None:
    """Checks of an agent run's config (raise ConfigError naming the key)."""
    from wz_engine.algorithms import RegistryError
    from wz_engine.config import ConfigError

    env = cfg.env
    try:
        ENVS.get(env.name)
    except RegistryError as e:
        raise ConfigError(f"env.name: {e}") from None
    for key, value, low in [("env.max_turns", env.max_turns, 1), ("env.history", env.history, 0),
                            ("env.max_prompt_tokens", env.max_prompt_tokens, 1), ("env.workers", env.workers, 0),
                            ("env.eval_seeds", env.eval_seeds, 0)]:
        if value < low:
            raise ConfigError(f"{key}: must be >= {low}, got {value}")
    if env.invalid_penalty < 0:
        raise ConfigError(f"env.invalid_penalty: is subtracted from the reward, so must be >= 0, "
                          f"got {env.invalid_penalty}")
    if any(c in env.action_tag for c in "<>/ "):
        raise ConfigError(f"env.action_tag: the tag's name only (e.g. \"action\" for <action>...</action>), "
                          f"got {env.action_tag!r}")
    if env.max_prompt_tokens + cfg.rollout.max_new_tokens > cfg.train.micro_batch_tokens:
        raise ConfigError(f"train.micro_batch_tokens: a turn can take env.max_prompt_tokens + rollout.max_new_tokens "
                          f"= {env.max_prompt_tokens + cfg.rollout.max_new_tokens} tokens, more than "
                          f"{cfg.train.micro_batch_tokens}; raise it or lower env.max_prompt_tokens")
    unsupported = [("algorithm.dynamic_sampling", cfg.algorithm.dynamic_sampling),
                   ("algorithm.overlong_buffer", cfg.algorithm.overlong_buffer > 0)]
    for key, on in unsupported:
        if on:
            raise ConfigError(f"{key}: not supported with an environment (env.name) yet")
    g = cfg.algorithm.gigpo
    if not 0 <= g.gamma <= 1:
        raise ConfigError(f"algorithm.gigpo.gamma: must be in [0, 1], got {g.gamma}")


def env_corpus(env_cfg: EnvConfig, samples: int = 64) -> list[str]:
    """Texts for training a tiny model's tokenizer: the env's `corpus()` when it has one, else the
    instructions and first observations of `samples` task seeds."""
    env = ENVS.get(env_cfg.name).make(env_cfg.kwargs, seed=0)
    if callable(getattr(env, "corpus", None)):
        texts = list(env.corpus())
    else:
        texts = []
        for seed in range(samples):
            obs, info = env.reset(seed)
            texts += [obs, str(info.get("instruction", ""))]
    tag = env_cfg.action_tag
    # as the tiny model's ChatML template renders them (role names, newlines, tags), so that a tokenizer
    # trained without the full byte alphabet can spell every prompt and merges what recurs
    wrap = (lambda t: f"<{tag}>{t}</{tag}>") if tag else (lambda t: t)
    return [f"system\nuser\n{t}\nassistant\n{wrap(t)}" for t in texts]

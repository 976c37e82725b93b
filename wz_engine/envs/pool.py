"""Many environment instances stepped as one batch (one call per turn for all active episodes)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from wz_engine.envs.base import ENVS, TextEnv, instance_seed


@dataclass
class Transition:
    """One env step of one episode, as the env returned it (the penalty is applied by the caller)."""

    observation: str
    reward: float
    done: bool
    info: dict = field(default_factory=dict)


class EnvPool:
    """`size` instances of one environment; instance i runs episode slot i.

    reset / step take the slots to act on and run them in the calling thread, or on `workers` threads
    for envs that wait on I/O. Instances persist across rollout steps, so an env's own state (an RNG)
    carries over; `state_dict` holds every instance's state (for those that have one)."""

    def __init__(self, factory: Callable[[int], TextEnv], size: int, workers: int = 0):
        self.envs = [factory(i) for i in range(size)]
        self._executor = ThreadPoolExecutor(workers) if workers > 0 else None

    @classmethod
    def from_config(cls, env_cfg, size: int, run_seed: int, first_slot: int = 0) -> EnvPool:
        """`size` instances of `env.name` for the global episode slots first_slot .. first_slot + size - 1."""
        spec = ENVS.get(env_cfg.name)
        return cls(lambda i: spec.make(env_cfg.kwargs, instance_seed(run_seed, first_slot + i)), size,
                   env_cfg.workers)

    def __len__(self) -> int:
        return len(self.envs)

    def _map(self, fn, *args):
        if self._executor is None:
            return list(map(fn, *args))
        return list(self._executor.map(fn, *args))

    def reset(self, slots: Sequence[int], seeds: Sequence[int]) -> list[tuple[str, dict]]:
        """Reset instance slots[k] to task seeds[k] -> (observation, info) per slot."""
        def one(slot, seed):
            obs, info = self.envs[slot].reset(int(seed))
            return _check_text(obs, slot, "reset"), dict(info or {})

        return self._map(one, slots, seeds)

    def step(self, slots: Sequence[int], actions: Sequence[str | None]) -> list[Transition]:
        """Step instance slots[k] with actions[k] -> one Transition per slot."""
        def one(slot, action):
            out = self.envs[slot].step(action)
            if not (isinstance(out, tuple) and len(out) == 4):
                raise TypeError(f"env instance {slot}: step must return (observation, reward, done, info), "
                                f"got {type(out).__name__}")
            obs, reward, done, info = out
            reward = float(reward)
            if not math.isfinite(reward):
                raise ValueError(f"env instance {slot}: step returned a non-finite reward {reward}")
            return Transition(_check_text(obs, slot, "step"), reward, bool(done), dict(info or {}))

        return self._map(one, slots, actions)

    def state_dict(self) -> dict:
        return {"instances": [env.state_dict() if hasattr(env, "state_dict") else None for env in self.envs]}

    def load_state_dict(self, state: dict) -> None:
        saved = state["instances"]
        if len(saved) != len(self.envs):
            raise ValueError(f"env state: the checkpoint holds {len(saved)} instances, this run has {len(self.envs)} "
                             "(rollout.prompts_per_step x group_size per rank must match the saved run)")
        for env, s in zip(self.envs, saved):
            if s is not None:
                env.load_state_dict(s)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
        for env in self.envs:
            if callable(getattr(env, "close", None)):
                env.close()


def _check_text(obs, slot: int, where: str) -> str:
    if not isinstance(obs, str):
        raise TypeError(f"env instance {slot}: {where} must return the observation as a str, got {type(obs).__name__}")
    return obs

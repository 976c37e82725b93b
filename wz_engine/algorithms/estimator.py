"""Advantage estimators: a step's per-rollout rewards -> per-rollout advantages."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from wz_engine.algorithms.registry import Registry

if TYPE_CHECKING:
    from wz_engine.config import AlgorithmConfig, RunConfig


@dataclass
class AdvantageInputs:
    """One rank's rollouts of a step (rows prompt-major, all [B] on the host). An estimator that needs
    another per-row input (e.g. GiGPO's step returns and anchor ids) adds it here as an optional field."""

    rewards: torch.Tensor
    """[B] float32 rewards; pairwise estimators get +1 / -1 / 0 verdicts against each group's reference."""
    group_ids: torch.Tensor
    """[B] int64: the prompt uid of each row (rows of one prompt form a group)."""
    is_reference: torch.Tensor
    """[B] bool: the rollout that served as its group's reference (all False for pointwise sources)."""
    lengths: torch.Tensor
    """[B] int64 response lengths in tokens."""
    # Multi-turn runs (an env), for estimators registered with per_step=True: one row per environment
    # step, `rewards` holding the return of the step's episode and `group_ids` its task.
    step_returns: torch.Tensor | None = None
    """[B] float32 discounted return-to-go from each step (gamma = algorithm.gigpo.gamma)."""
    anchor_ids: torch.Tensor | None = None
    """[B] int64 anchor state of each step: equal ids = the same observation within the same task group."""
    trajectory_ids: torch.Tensor | None = None
    """[B] int64 episode of each step (distinct across the batch)."""


@dataclass
class Advantages:
    values: torch.Tensor
    """[B] float32 advantage per rollout."""
    kept: torch.Tensor
    """[B] bool: False for rows of groups the estimator dropped (e.g. BRPO's skew filter)."""
    components: dict[str, torch.Tensor] = field(default_factory=dict)
    """Optional [B] parts of `values` for monitoring (GiGPO: "episode" and the weighted "step" term)."""


EstimatorFn = Callable[[AdvantageInputs, "AlgorithmConfig"], "torch.Tensor | Advantages"]


@dataclass(frozen=True)
class Estimator:
    """A registered advantage estimator. `fn(inputs, cfg.algorithm)` returns [B] values or Advantages;
    the rewards are checked on the host before it runs, so it may call wz_kernels with validate=False."""

    name: str
    fn: EstimatorFn
    pairwise: bool = False
    """Takes pairwise rewards (+1 / -1 / 0 against a reference): needs a pairwise reward source."""
    per_step: bool = False
    """Multi-turn runs: takes one row per environment step (step_returns, anchor_ids, trajectory_ids set).
    Without it an estimator sees one row per trajectory (its episode return), broadcast to its steps."""
    validate: Callable[[RunConfig], None] | None = None
    """Extra config checks (raise ConfigError naming the key)."""

    def check_rewards(self, rewards: torch.Tensor) -> None:
        """Host-side check of what the trainer hands in (rewards [B] on the CPU): finite, and in
        {-1, 0, +1} for pairwise estimators. Raises ValueError naming the estimator and bad values."""
        values = rewards.detach().double().cpu()
        if self.pairwise:
            bad = values[(values != 0) & (values != 1) & (values != -1)]
            if bad.numel():
                raise ValueError(f"estimator {self.name!r}: pairwise rewards must be -1, 0 or +1; "
                                 f"found {bad[:4].tolist()}")
        elif values.numel() and not math.isfinite(float(values.sum())):
            rows = torch.nonzero(~torch.isfinite(values)).flatten()[:4].tolist()
            raise ValueError(f"estimator {self.name!r}: rewards must be finite; rows {rows} are "
                             f"{values[rows].tolist()}")

    def __call__(self, inputs: AdvantageInputs, cfg: AlgorithmConfig) -> Advantages:
        self.check_rewards(inputs.rewards)
        out = self.fn(inputs, cfg)
        if isinstance(out, Advantages):
            return Advantages(out.values.float(), out.kept.bool(), out.components)
        values = torch.as_tensor(out).float()
        if values.shape != inputs.rewards.shape:
            raise ValueError(f"estimator {self.name!r} returned shape {tuple(values.shape)} for "
                             f"{tuple(inputs.rewards.shape)} rewards")
        return Advantages(values, torch.ones_like(values, dtype=torch.bool))


ESTIMATORS: Registry[Estimator] = Registry("estimator", "wz_engine.algorithms.estimators", Estimator,
                                           from_function=Estimator)  # a plain function: pointwise


def register_estimator(name: str, *, pairwise: bool = False, per_step: bool = False,
                       validate=None) -> Callable[[EstimatorFn], Estimator]:
    """Decorator: `@register_estimator("my_name")` over `fn(inputs, cfg) -> [B] advantages`."""

    def wrap(fn: EstimatorFn) -> Estimator:
        return ESTIMATORS.register(name, Estimator(name, fn, pairwise=pairwise, per_step=per_step,
                                                   validate=validate))

    return wrap
